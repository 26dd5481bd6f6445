"""The DAM compiler: mask-program IR, per-head fitting, clustering, artifact read/write."""

from .artifact import SCHEMA, Artifact
from .ir import ArtifactError, MaskProgram

__all__ = ["SCHEMA", "Artifact", "ArtifactError", "MaskProgram"]
