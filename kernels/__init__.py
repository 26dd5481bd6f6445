"""Block-sparse attention kernels (Triton + CPU path), the block layout, and references.

Public API: ``BlockLayout``, ``LayoutError``, ``block_sparse_attention``,
``block_sparse_decode``, ``merge_attention`` and the ``reference`` module (dense float64).
"""

from . import reference
from .layout import BlockLayout, LayoutError
from .merge import merge_attention
from .ops import block_sparse_attention, block_sparse_decode

__all__ = [
    "BlockLayout",
    "LayoutError",
    "block_sparse_attention",
    "block_sparse_decode",
    "merge_attention",
    "reference",
]
