"""The DAM runtime: artifact loading, planning, transformers integration.

Imports only torch, triton, safetensors, transformers, ``dam.kernels`` and the compiler's IR and
artifact reader (never zarr or scikit-learn).
"""

from .errors import DamRuntimeError
from .integration import MIN_LENGTH, DamHandle, RuntimeConfig, apply, load, runtime_config
from .planner import Planner, ProgramTable, mask_to_layout, plan

__all__ = [
    "MIN_LENGTH",
    "DamHandle",
    "DamRuntimeError",
    "Planner",
    "ProgramTable",
    "RuntimeConfig",
    "apply",
    "load",
    "mask_to_layout",
    "plan",
    "runtime_config",
]
