"""The one place the runtime calls the block-sparse kernels (and the dense fallback).

``backend`` is passed to ``dam.kernels`` ("auto" | "triton" | "cpu"); "reference" runs the
kernels' dense float64 reference (tests and debugging only: it materialises [B, H, Nq, Nk]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dam.kernels import BlockLayout

from .errors import DamRuntimeError

BACKENDS = ("auto", "triton", "cpu", "reference")


def _kernels():
    try:
        from dam.kernels import block_sparse_attention, block_sparse_decode
    except ImportError as exc:  # pragma: no cover - depends on the kernels being built
        raise DamRuntimeError(
            f"dam.kernels has no block-sparse kernels ({exc}); install a complete dam-attention "
            "or use backend='reference' for a (slow) dense check"
        ) from exc
    return block_sparse_attention, block_sparse_decode


def sparse_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *, scale: float, backend: str,
    softcap: float | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention; q ``[B, Hq, Nq, D]`` (the last Nq of Nk), k/v ``[B, Hkv, Nk, D]``
    -> ``[B, Hq, Nq, D]`` in q's dtype. ``softcap``: attention-logit soft-capping (Gemma 2)."""
    if backend == "reference":
        from dam.kernels.reference import attention_reference

        return attention_reference(q, k, v, layout, causal=True, scale=scale, softcap=softcap)[0].to(q.dtype)
    attn, _ = _kernels()
    return attn(q, k, v, layout, causal=True, scale=scale, backend=backend, validate=False,  # planner-made
                softcap=softcap)


def sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    cache_seqlens: torch.Tensor,
    scale: float,
    backend: str,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query per row at position ``cache_seqlens[b] - 1``; q ``[B, Hq, 1, D]``, k/v
    ``[B, Hkv, S, D]``, cache_seqlens int32 ``[B]`` -> ``[B, Hq, 1, D]``."""
    if backend == "reference":
        from dam.kernels.reference import decode_reference

        out = decode_reference(q, k, v, layout, cache_seqlens=cache_seqlens, scale=scale, softcap=softcap)[0]
        return out.to(q.dtype)
    _, dec = _kernels()
    return dec(q, k, v, layout, cache_seqlens=cache_seqlens, scale=scale, backend=backend, validate=False,
               softcap=softcap)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    key_valid: torch.Tensor | None = None,
    mask4d: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Dense causal SDPA (queries the last Nq of Nk) -> ``[B, Hq, Nq, D]``.

    Args:
        key_valid: optional bool ``[B, Nk]`` (False = padding, never attended).
        mask4d: a 4D mask prepared by the caller (bool or additive), used as given.
        sliding_window: keep only keys with ``i - j < sliding_window``.
        softcap: attention-logit soft-capping (see :func:`sdpa`).
    """
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    kw = dict(scale=scale, softcap=softcap)
    if mask4d is not None:
        return sdpa(q, k, v, attn_mask=mask4d, **kw)
    if key_valid is None and sliding_window is None and Nq in (1, Nk):  # one query sees every key
        return sdpa(q, k, v, is_causal=Nq > 1, **kw)
    i = torch.arange(Nk - Nq, Nk, device=q.device)[:, None]
    j = torch.arange(Nk, device=q.device)[None, :]
    m = (j <= i)[None, None]
    if sliding_window is not None:
        m = m & (i - j < sliding_window)
    if key_valid is not None:
        m = m & key_valid[:, None, None, :].to(torch.bool)
        m = m | ~m.any(-1, keepdim=True)  # padded query rows: any finite output (discarded)
    return sdpa(q, k, v, attn_mask=m, **kw)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int,
                             chunk: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Exact causal sliding-window attention (keys ``i - w < j <= i``), O(Nq * (window + chunk)) work
    instead of masked O(Nq * Nk): queries the last Nq of Nk, in chunks of ``chunk`` queries (default
    ``max(window, 256)``), each against only the keys its window reaches. -> ``[B, Hq, Nq, D]``."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    if window < 1:
        raise DamRuntimeError(f"sliding window must be positive, got {window}")
    if Nq == 1:  # decode: the last `window` keys, no mask
        lo = max(0, Nk - window)
        return sdpa(q, k[:, :, lo:], v[:, :, lo:], scale=scale, softcap=softcap)
    C = chunk or max(window, 256)
    out = q.new_empty(B, Hq, Nq, v.shape[-1])
    for r0 in range(0, Nq, C):
        r1 = min(Nq, r0 + C)
        p0, p1 = Nk - Nq + r0, Nk - Nq + r1  # absolute positions of the chunk's queries
        lo = max(0, p0 - window + 1)
        i = torch.arange(p0, p1, device=q.device)[:, None]
        j = torch.arange(lo, p1, device=q.device)[None, :]
        m = (j <= i) & (i - j < window)
        out[:, :, r0:r1] = sdpa(q[:, :, r0:r1], k[:, :, lo:p1], v[:, :, lo:p1], attn_mask=m, scale=scale,
                                softcap=softcap)
    return out


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, attn_mask: torch.Tensor | None = None,
         is_causal: bool = False, softcap: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (GQA by index), or, with attention-logit soft-capping
    (which SDPA has no hook for), :func:`dam.kernels.reference.softcapped_attention` (explicit
    scores, chunked). ``attn_mask``: bool (True = keep) or additive, broadcastable to
    ``[B, Hq, Nq, Nk]``; ``is_causal``: top-left aligned, as SDPA's."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    from dam.kernels.reference import softcapped_attention

    return softcapped_attention(q, k, v, scale=scale, softcap=softcap, attn_mask=attn_mask, is_causal=is_causal)[0]
