"""Dense float64 references for the block-sparse kernels, built from ``BlockLayout.to_dense``.

They materialise the full ``[B, Hq, Nq, Nk]`` score matrix, so they are for tests and small
sizes only. Conventions shared with the kernels:

* queries are the last ``Nq`` of the ``Nk`` key positions (query row ``r`` sits at absolute
  position ``Nk - Nq + r``); ``causal`` keeps key ``j <= Nk - Nq + r``;
* query head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA);
* ``lse`` is the natural-log sum of ``exp(scale * q.k)`` over the kept keys;
* a query row with no kept key gives output 0 and ``lse = -inf``.
"""

from __future__ import annotations

import math

import torch

from .layout import BlockLayout, LayoutError

__all__ = ["attention_reference", "decode_reference", "dense_mask", "softcap_scores", "softcapped_attention"]


def dense_mask(layout: BlockLayout, q_len: int, kv_len: int, *, causal: bool = True) -> torch.Tensor:
    """bool ``[Bl, H, q_len, kv_len]``: the layout's blocks (AND causal if ``causal``)."""
    if causal:
        return layout.to_dense(q_len, kv_len)
    nkb = -(-kv_len // layout.block_n)
    layout.validate(kv_len)
    bm = layout.block_mask(nkb)
    dense = bm.repeat_interleave(layout.block_m, dim=2)[:, :, :q_len]
    return dense.repeat_interleave(layout.block_n, dim=3)[..., :kv_len]


def softcap_scores(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Scaled scores soft-capped as Gemma 2 does (``softcap * tanh(s / softcap)``), or ``s`` as given."""
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, softcap: float | None,
                         attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                         max_scores: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention from explicit (soft-capped) scores, for the paths whose fused kernel has no score hook:
    q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]`` (GQA by index, never repeated); ``attn_mask`` bool
    (True = keep) or additive, broadcastable to ``[B, Hq, Nq, Nk]``; ``is_causal`` top-left aligned
    (as SDPA's). Float32 scores (float64 for float64 inputs), in chunks of query rows of at most
    ``max_scores`` scores. -> ``(out [B, Hq, Nq, Dv] in q's dtype, lse [B, Hq, Nq] in the compute
    dtype)``; a row with no visible key gives 0 and ``lse = -inf``."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    cdt = torch.promote_types(q.dtype, torch.float32)
    kf, vf = k.to(cdt)[:, :, None], v.to(cdt)[:, :, None]  # [B, Hkv, 1, Nk, D]
    out = q.new_empty(B, Hq, Nq, v.shape[-1])
    lse = torch.empty(B, Hq, Nq, dtype=cdt, device=q.device)
    rows = max(1, max_scores // max(1, B * Hq * Nk))
    for r0 in range(0, Nq, rows):
        r1 = min(Nq, r0 + rows)
        qc = q[:, :, r0:r1].to(cdt).reshape(B, Hkv, g, r1 - r0, D)
        s = softcap_scores(torch.matmul(qc, kf.transpose(-1, -2)) * scale, softcap)  # [B, Hkv, g, r, Nk]
        if is_causal:
            i = torch.arange(r0, r1, device=q.device)[:, None]
            s = s.masked_fill(torch.arange(Nk, device=q.device)[None, :] > i, float("-inf"))
        if attn_mask is not None:
            m = attn_mask[..., r0:r1, :] if attn_mask.shape[-2] == Nq else attn_mask
            m = m.expand(B, Hq, r1 - r0, Nk).reshape(B, Hkv, g, r1 - r0, Nk)
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(cdt)
        lz = torch.logsumexp(s, -1)
        p = torch.exp(s - lz.unsqueeze(-1).clamp(min=torch.finfo(cdt).min))  # -inf rows: 0
        out[:, :, r0:r1] = torch.matmul(p, vf).reshape(B, Hq, r1 - r0, -1).to(q.dtype)
        lse[:, :, r0:r1] = lz.reshape(B, Hq, r1 - r0)
    return out, lse


def _masked_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D], mask bool broadcastable to [B, Hq, Nq, Nk]; scores
    soft-capped (``softcap * tanh(s / softcap)``) when ``softcap`` is given."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise LayoutError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    g = hq // hkv
    q64, k64, v64 = q.double(), k.double(), v.double()
    k64 = k64.repeat_interleave(g, dim=1)  # fine for a reference; kernels never repeat K/V
    v64 = v64.repeat_interleave(g, dim=1)
    s = softcap_scores(torch.einsum("bhqd,bhkd->bhqk", q64, k64) * scale, softcap)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf on empty rows
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float64).min))
    p = torch.nan_to_num(p, nan=0.0)
    p = p.masked_fill(~mask, 0.0)
    out = torch.einsum("bhqk,bhkd->bhqd", p, v64)
    return out, lse


def _check_layout_heads(layout: BlockLayout, batch: int, hq: int) -> None:
    if layout.batch not in (1, batch):
        raise LayoutError(f"layout batch {layout.batch} must be 1 or the batch size {batch}")
    if layout.heads not in (1, hq):
        raise LayoutError(f"layout has {layout.heads} heads; it must have 1 or Hq={hq}")


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 block-sparse attention (``softcap``: soft-capped scores, as the kernels).

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` and ``Nq <= Nk``.
        layout: ``BlockLayout`` with ``ceil(Nq / block_m)`` query blocks, batch 1 or B, heads 1 or Hq.
    Returns:
        ``(out float64 [B, Hq, Nq, D], lse float64 [B, Hq, Nq])``.
    """
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    _check_layout_heads(layout, b, hq)
    mask = dense_mask(layout.to("cpu"), nq, nk, causal=causal).to(q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _masked_softmax_attention(q, k, v, mask, scale, softcap)


def decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: BlockLayout,
    *,
    cache_seqlens: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 block-sparse decode: one query per sequence at position ``cache_seqlens[b] - 1``.

    Args:
        q: ``[B, Hq, 1, D]``; k_cache, v_cache: ``[B, Hkv, S_max, D]``; cache_seqlens: int ``[B]``.
        layout: one query block (``nQB == 1``), batch 1 or B, heads 1 or Hq.
    Returns:
        ``(out float64 [B, Hq, 1, D], lse float64 [B, Hq, 1])``; a sequence of length 0 gives 0 / -inf.
    """
    b, hq, _, d = q.shape
    s_max = k_cache.shape[2]
    _check_layout_heads(layout, b, hq)
    nkb = -(-s_max // layout.block_n)
    bm = layout.to("cpu").block_mask(nkb)  # [Bl, H, 1, nkb]
    keep = bm.repeat_interleave(layout.block_n, dim=3)[..., :s_max]  # [Bl, H, 1, S]
    lens = cache_seqlens.to("cpu", torch.int64).view(b, 1, 1, 1)
    keep = keep & (torch.arange(s_max).view(1, 1, 1, s_max) < lens)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _masked_softmax_attention(q, k_cache, v_cache, keep.to(q.device), scale, softcap)
