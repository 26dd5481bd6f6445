"""Input checks shared by the launchers (shapes, dtypes, devices); no host sync here."""

from __future__ import annotations

import math

import torch

from .layout import BlockLayout, LayoutError

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_backend(backend: str) -> None:
    if backend not in ("auto", "triton", "cpu"):
        raise LayoutError(f"backend must be 'auto', 'triton' or 'cpu', got {backend!r}")


def check_is_layout(layout: object) -> None:
    if not isinstance(layout, BlockLayout):
        raise LayoutError(f"layout must be a dam.kernels.BlockLayout, got {type(layout).__name__}")


def check_layout_for(layout: BlockLayout, batch: int, hq: int, nqb: int, device: torch.device) -> None:
    if layout.batch not in (1, batch):
        raise LayoutError(
            f"layout batch dim is {layout.batch}; it must be 1 (shared) or the batch size {batch}"
        )
    if layout.heads not in (1, hq):
        raise LayoutError(
            f"layout has {layout.heads} heads; it must have 1 (shared) or one per query head ({hq})"
        )
    if layout.num_q_blocks != nqb:
        raise LayoutError(
            f"layout has {layout.num_q_blocks} query blocks but the queries need {nqb} "
            f"(block_m={layout.block_m}); plan the layout for this query length"
        )
    if layout.kv_indices.device != device:
        raise LayoutError(
            f"layout is on {layout.kv_indices.device} but the tensors are on {device}; "
            f"call layout.to({str(device)!r})"
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decode: bool = False) -> None:
    names = ("q", "k_cache", "v_cache") if decode else ("q", "k", "v")
    for name, t in zip(names, (q, k, v), strict=True):
        if not isinstance(t, torch.Tensor):
            raise LayoutError(f"{name} must be a torch tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise LayoutError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise LayoutError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise LayoutError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise LayoutError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise LayoutError(f"{names[1]} {tuple(k.shape)} and {names[2]} {tuple(v.shape)} must have one shape")
    b, hq, _, d = q.shape
    if k.shape[0] != b:
        raise LayoutError(f"batch mismatch: q has {b}, {names[1]} has {k.shape[0]}")
    if k.shape[3] != d:
        raise LayoutError(f"head dim mismatch: q has {d}, {names[1]} has {k.shape[3]}")
    if d < 1:
        raise LayoutError("head dim must be >= 1")
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv:
        raise LayoutError(
            f"query heads ({hq}) must be a positive multiple of KV heads ({hkv}) "
            "(query head h reads KV head h // (Hq // Hkv))"
        )


def resolve_scale(scale: float | None, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise LayoutError(f"scale must be a positive finite number, got {scale}")
    return scale


def resolve_softcap(softcap: float | None) -> float | None:
    """None (no soft-capping) or a positive finite cap."""
    if softcap is None:
        return None
    cap = float(softcap)
    if not math.isfinite(cap) or cap <= 0:
        raise LayoutError(f"softcap must be None or a positive finite number, got {softcap}")
    return cap
