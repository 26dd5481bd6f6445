"""Block-sparse attention kernels (Triton + CPU path), the block layout, and references."""

from .layout import BlockLayout, LayoutError

__all__ = ["BlockLayout", "LayoutError"]
