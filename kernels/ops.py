"""Public launchers: ``block_sparse_attention`` (prefill) and ``block_sparse_decode``.

Each checks its inputs, picks a backend and calls either the Triton kernels
(``dam.kernels.triton_kernels``, imported lazily so that ``TRITON_INTERPRET`` is read when the
first Triton call happens) or the CPU path (``dam.kernels.cpu``).

Backends: ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``"cpu"``
(CPU tensors: gathered blocks + PyTorch's fused CPU flash kernel) and ``"auto"`` (Triton on
CUDA tensors; on CPU tensors the CPU path, unless ``TRITON_INTERPRET=1`` is set, then Triton).
"""

from __future__ import annotations

import os

import torch

from ._checks import (
    check_backend,
    check_is_layout,
    check_layout_for,
    check_qkv,
    resolve_scale,
    resolve_softcap,
)
from .layout import BlockLayout, LayoutError

__all__ = ["block_sparse_attention", "block_sparse_decode"]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _resolve_backend(backend: str, device: torch.device) -> str:
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        return "triton" if _interpret() else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise LayoutError(f"backend='cpu' needs CPU tensors, got {device}; use backend='triton'")
    if backend == "triton" and device.type != "cuda" and not _interpret():
        raise LayoutError(
            f"backend='triton' needs CUDA tensors (got {device}), or TRITON_INTERPRET=1 set "
            "before dam.kernels runs its first kernel; use backend='cpu' for CPU tensors"
        )
    return backend


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    validate: bool = True,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention over the KV blocks a layout keeps (prefill, chunked prefill).

    Args:
        q: ``[B, Hq, Nq, D]``, the queries at the *last* ``Nq`` of the ``Nk`` positions.
        k, v: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0``; query head ``h`` reads KV head
            ``h // (Hq // Hkv)`` (K/V are never repeated). ``Nq <= Nk``.
        layout: ``BlockLayout`` with ``ceil(Nq / block_m)`` query blocks, batch 1 or B, heads 1
            or Hq, on q's device.
        causal: keep key ``j`` for query row ``r`` only when ``j <= Nk - Nq + r``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp (natural log) of the scaled scores.
        backend: ``"auto"``, ``"triton"`` or ``"cpu"`` (see the module docstring).
        out, lse_out: optional preallocated results (``[B, Hq, Nq, D]`` in q's dtype, float32
            ``[B, Hq, Nq]``); every element is overwritten.
        validate: on the CPU path, check the layout's contents first (sorted, in range; a host
            read of the layout). Pass False for layouts known to be valid (``dam.runtime`` does
            for the planner's); the GPU path never reads them on the host.
        softcap: attention-logit soft-capping (Gemma 2): the scaled scores ``s`` become
            ``softcap * tanh(s / softcap)`` before the softmax (and the LSE). None: none.

    Returns:
        ``out [B, Hq, Nq, D]`` in q's dtype, and ``lse float32 [B, Hq, Nq]`` when
        ``return_lse``. A query row with no kept key gives 0 and ``lse = -inf``.

    Raises:
        LayoutError: malformed inputs or layout (the message says what to fix).
    """
    check_qkv(q, k, v)
    check_is_layout(layout)
    bsz, hq, nq, d = q.shape
    nk = k.shape[2]
    if nq > nk:
        raise LayoutError(
            f"Nq ({nq}) must not exceed Nk ({nk}): the queries are the last Nq key positions"
        )
    check_layout_for(layout, bsz, hq, -(-nq // layout.block_m), q.device)
    scale = resolve_scale(scale, d)
    softcap = resolve_softcap(softcap)
    which = _resolve_backend(backend, q.device)
    want_lse = return_lse or lse_out is not None
    out, lse_out = _check_outs(q, out, lse_out, (bsz, hq, nq))
    if nq == 0:
        pass
    elif which == "cpu":
        from . import cpu_flex, cpu_native
        from .cpu import attention_cpu

        if validate:
            layout.validate(nk)
        lse_want = lse_out if want_lse else None
        kw = dict(causal=bool(causal), scale=scale, out=out, lse=lse_want)
        # DAM's AMX kernel where it can serve; the compiled FlexAttention kernel only where it
        # cannot (never both built in one process); the ATen path for the rest
        done = softcap is None and (cpu_native.try_attention(q, k, v, layout, **kw) or (
            not cpu_native.usable() and cpu_flex.try_attention(q, k, v, layout, **kw)))
        if not done:
            attention_cpu(q, k, v, layout, causal=bool(causal), scale=scale, out=out, lse=lse_want, softcap=softcap)
    else:
        from .triton_kernels import attention_triton

        attention_triton(q, k, v, layout, causal=bool(causal), scale=scale, out=out, lse=lse_out, softcap=softcap)
    return (out, lse_out) if return_lse else out


def block_sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: BlockLayout,
    *,
    cache_seqlens: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    validate: bool = True,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse decode: one new query per sequence against a padded KV cache.

    Args:
        q: ``[B, Hq, 1, D]``, the query of sequence ``b`` sits at position ``cache_seqlens[b] - 1``.
        k_cache, v_cache: ``[B, Hkv, S_max, D]``; keys at positions ``>= cache_seqlens[b]`` are
            ignored. ``Hq % Hkv == 0`` (GQA, no repeat).
        layout: one query block per sequence (``nQB == 1``), batch 1 or B, heads 1 or Hq; kept
            block indices refer to ``block_n``-blocks of the cache.
        cache_seqlens: int32/int64 ``[B]`` in ``[0, S_max]``, on q's device.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return ``lse float32 [B, Hq, 1]``.
        backend: ``"auto"``, ``"triton"`` or ``"cpu"``.
        out, lse_out: optional preallocated results (``[B, Hq, 1, D]``, float32 ``[B, Hq, 1]``).
        validate, softcap: as in :func:`block_sparse_attention`.

    Returns:
        ``out [B, Hq, 1, D]`` in q's dtype (and lse). Split-KV over the kept blocks on GPU
        (flash-decoding), then a merge. An empty sequence or row gives 0 and ``lse = -inf``.
    """
    check_qkv(q, k_cache, v_cache, decode=True)
    check_is_layout(layout)
    bsz, hq, nq, d = q.shape
    if nq != 1:
        raise LayoutError(f"decode takes one query per sequence: q must be [B, Hq, 1, D], got {tuple(q.shape)}")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise LayoutError("cache_seqlens must be an int32/int64 tensor [B]")
    if tuple(cache_seqlens.shape) != (bsz,):
        raise LayoutError(f"cache_seqlens must have shape [{bsz}], got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise LayoutError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    check_layout_for(layout, bsz, hq, 1, q.device)
    scale = resolve_scale(scale, d)
    which = _resolve_backend(backend, q.device)
    out, lse_out = _check_outs(q, out, lse_out, (bsz, hq, 1))
    kw = dict(cache_seqlens=cache_seqlens, scale=scale, out=out, lse=lse_out, softcap=resolve_softcap(softcap))
    if which == "cpu":
        from .cpu import decode_cpu

        if validate:
            layout.validate(k_cache.shape[2])
        decode_cpu(q, k_cache, v_cache, layout, **kw)
    else:
        from .triton_kernels import decode_triton

        decode_triton(q, k_cache, v_cache, layout, **kw)
    return (out, lse_out) if return_lse else out


def _check_outs(
    q: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None, lse_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise LayoutError(
            f"out must be {q.dtype} {tuple(q.shape)} on {q.device}, got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}"
        )
    if lse is None:
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    elif tuple(lse.shape) != lse_shape or lse.dtype != torch.float32 or lse.device != q.device:
        raise LayoutError(
            f"lse_out must be float32 {lse_shape} on {q.device}, got {lse.dtype} "
            f"{tuple(lse.shape)} on {lse.device}"
        )
    return out, lse
