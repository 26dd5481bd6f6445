"""The DAM compiler: mask-program IR, per-head fitting, clustering, artifact read/write.

Importing this package needs only numpy and safetensors (the runtime's view: IR + artifact
reader); zarr (``read_profile``) and scikit-learn (clustering) are imported when used.
"""

from .artifact import SCHEMA, Artifact
from .artifact_io import load_artifact, save_artifact
from .compile import CompileConfig, CompileResult, compile_profile
from .ir import ArtifactError, MaskProgram
from .profile import Profile, ProfileReadError, read_profile
from .report import format_summary

__all__ = [
    "SCHEMA", "Artifact", "ArtifactError", "CompileConfig", "CompileResult", "MaskProgram",
    "Profile", "ProfileReadError", "compile_profile", "format_summary", "load_artifact",
    "read_profile", "save_artifact",
]
