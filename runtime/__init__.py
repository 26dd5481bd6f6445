"""The DAM runtime: artifact loading, planning, transformers integration.

Imports only torch, triton, safetensors, transformers, ``dam.kernels`` and the compiler's IR and
artifact reader (never zarr or scikit-learn).
"""

from .errors import DamRuntimeError
from .integration import DamHandle, RuntimeConfig, apply, load
from .planner import Planner, ProgramTable, mask_to_layout, plan

__all__ = [
    "DamHandle",
    "DamRuntimeError",
    "Planner",
    "ProgramTable",
    "RuntimeConfig",
    "apply",
    "load",
    "mask_to_layout",
    "plan",
]
