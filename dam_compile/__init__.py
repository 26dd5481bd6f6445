"""The DAM compiler: mask-program IR, per-head fitting, clustering, artifact read/write."""

from .ir import ArtifactError, MaskProgram

__all__ = ["ArtifactError", "MaskProgram"]
