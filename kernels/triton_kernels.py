"""Triton kernels (private) and their launchers for block-sparse prefill and decode.

Prefill, ``_block_sparse_fwd_kernel``: one program per (kernel query tile, batch x query head),
one launch for all heads. A kernel tile of ``BLOCK_M`` rows lies inside one layout query block
(``BLOCK_M`` divides ``block_m``), reads that block's kept KV block list and walks it in
``BLOCK_N``-key tiles (``BLOCK_N`` divides ``block_n``): fp32 scores from ``tl.dot``, online
softmax in base 2, fp32 accumulator, causal (queries are the last ``Nq`` of ``Nk`` positions) and
ragged-tail masks, GQA by indexing KV head ``h // group`` (no repeat). Empty rows end with
``l == 0`` and are written as 0 with ``lse = -inf``. Head dims that are not a power of two are
padded to one by masked loads (``BLOCK_D = next_pow2(D)``, D <= 256).

Decode, ``_block_sparse_decode_kernel`` + ``_decode_merge_kernel``: flash-decoding. The kept
block list of each (sequence, query head) is cut into ``num_splits`` contiguous ranges; each
program reduces its range to a partial (out, lse) in fp32, and the merge kernel combines the
splits by their LSE.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors; there the operands of
``tl.dot`` are upcast to fp32 (``UPCAST``), because the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import inspect
import math
import os

import torch
import triton
import triton.language as tl

from .layout import BlockLayout, LayoutError

_LOG2E = 1.4426950408889634


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _full_configs() -> bool:
    """``DAM_TRITON_CONFIGS=full``: the interpreter runs the GPU autotune list (prune hook
    included), so CPU tests cover what only a GPU launch otherwise does."""
    return os.environ.get("DAM_TRITON_CONFIGS", "") == "full"


def _fwd_configs() -> list[triton.Config]:
    if _interpret() and not _full_configs():  # one config (16x16 tiles, valid for every layout)
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return _gpu_fwd_configs()


def _interpreter_bench(kernel_call, quantiles=None):
    """The autotuner's timing under the interpreter: run the config once (so that every config is
    launched and checked) and report it as equally fast (times there mean nothing)."""
    kernel_call()
    return [1.0, 1.0, 1.0] if quantiles else 1.0


def _autotune_extra() -> dict:
    if _interpret() and "do_bench" in inspect.signature(triton.autotune).parameters:
        return {"do_bench": _interpreter_bench}
    return {}


def _gpu_fwd_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


def _prune_fwd(configs, named_args, **kwargs):
    """Clamp tile shapes to the layout's blocks (powers of two, so a clamped tile divides the
    block: a kernel tile never straddles two layout blocks) and drop duplicates.

    Triton's autotuner passes the positional arguments as ``named_args`` and the keyword ones
    (``LAYOUT_M``/``LAYOUT_N`` here) as ``kwargs``: both are read."""
    args = {**named_args, **kwargs}
    lm, ln = args["LAYOUT_M"], args["LAYOUT_N"]
    kept = []
    for c in configs:
        bm = min(c.kwargs["BLOCK_M"], lm)
        bn = min(c.kwargs["BLOCK_N"], ln)
        cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=c.num_warps, num_stages=c.num_stages)
        if all(
            (k.kwargs, k.num_warps, k.num_stages) != (cfg.kwargs, cfg.num_warps, cfg.num_stages)
            for k in kept
        ):
            kept.append(cfg)
    return kept


@triton.jit
def _log2_scores(dot, scale_log2e, cap_in, cap_log2e, SOFTCAP: tl.constexpr):
    """Scaled scores in base 2: ``dot * scale * log2(e)``, or soft-capped ``cap * tanh(dot * scale
    / cap) * log2(e)`` (``cap_in`` = scale / cap, ``cap_log2e`` = cap * log2(e)); tanh through
    exp2, saturating to +-1 where exp2 overflows or vanishes."""
    if SOFTCAP:
        t = 1.0 - 2.0 / (tl.exp2(dot * (cap_in * 2.8853900817779268)) + 1.0)  # 2 * log2(e)
        return t * cap_log2e
    else:
        return dot * scale_log2e


@triton.autotune(
    configs=_fwd_configs(),
    key=["LAYOUT_M", "LAYOUT_N", "BLOCK_D", "CAUSAL", "IEEE", "SOFTCAP"],
    prune_configs_by={"early_config_prune": _prune_fwd},
    **_autotune_extra(),
)
@triton.jit
def _block_sparse_fwd_kernel(
    Q, K, V, Out, Lse, KvIdx, KvCnt,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_m, so_d,
    sl_b, sl_h, sl_m,
    si_b, si_h, si_q,
    sc_b, sc_h,
    Hq, Nq, Nk, D, group, q_off, scale_log2e, cap_in, cap_log2e,
    LAYOUT_M: tl.constexpr, LAYOUT_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    qb = (pid_m * BLOCK_M) // LAYOUT_M

    # int64 rows: row x stride passes 2^31 for [B, N, H, D] views at a few hundred K tokens
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    d_ok = offs_d < D
    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qpos = q_off + offs_m  # absolute positions of this tile's queries

    cnt = tl.load(KvCnt + b * sc_b + h * sc_h + qb)
    idx_row = KvIdx + b * si_b + h * si_h + qb * si_q
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, cnt):
        kb = tl.load(idx_row + j).to(tl.int64)
        for sub in tl.static_range(LAYOUT_N // BLOCK_N):
            offs_n = kb * LAYOUT_N + sub * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = (offs_n < Nk) & (offs_n >= 0)  # a bad index never reads out of bounds
            k = tl.load(
                k_base + offs_n[None, :] * sk_n + offs_d[:, None] * sk_d,
                mask=n_ok[None, :] & d_ok[:, None], other=0.0,
            )
            v = tl.load(
                v_base + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee")
            else:
                s = tl.dot(q, k)
            s = _log2_scores(s, scale_log2e, cap_in, cap_log2e, SOFTCAP)
            valid = n_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= qpos[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    out = tl.where(empty[:, None], 0.0, out)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = Out + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b * sl_b + h * sl_h + offs_m * sl_m, lse, mask=m_ok)


@triton.jit
def _block_sparse_decode_kernel(
    Q, K, V, Opart, Lpart, KvIdx, KvCnt, Seqlens,
    sq_b, sq_h, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    si_b, si_h,
    sc_b, sc_h,
    Hq, D, S, group, scale_log2e, cap_in, cap_log2e, blocks_per_split, num_splits,
    LAYOUT_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + offs_d * sq_d, mask=d_ok, other=0.0).to(tl.float32)
    seqlen = tl.load(Seqlens + b)
    cnt = tl.load(KvCnt + b * sc_b + h * sc_h)
    j0 = pid_s * blocks_per_split
    j1 = tl.minimum(cnt, j0 + blocks_per_split)
    idx_row = KvIdx + b * si_b + h * si_h
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h

    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(j0, j1):
        kb = tl.load(idx_row + j).to(tl.int64)
        for sub in tl.static_range(LAYOUT_N // BLOCK_N):
            offs_n = kb * LAYOUT_N + sub * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = (offs_n < seqlen) & (offs_n < S) & (offs_n >= 0)
            k = tl.load(
                k_base + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0,
            ).to(tl.float32)
            s = _log2_scores(tl.sum(k * q[None, :], 1), scale_log2e, cap_in, cap_log2e, SOFTCAP)
            s = tl.where(n_ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use)
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 0)
            v = tl.load(
                v_base + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0,
            ).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty, 0.0, acc / l_safe)
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))  # base-2 lse of this split
    part = pid_bh * num_splits + pid_s
    tl.store(Opart + part * BLOCK_D + offs_d, out)
    tl.store(Lpart + part + tl.arange(0, 1), lse2)


@triton.jit
def _decode_merge_kernel(
    Opart, Lpart, Out, Lse,
    so_b, so_h, so_d,
    sl_b, sl_h,
    Hq, D, num_splits,
    SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lp = tl.load(Lpart + pid_bh * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lp, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lp - m_use)
    tot = tl.sum(w, 0)
    op = tl.load(
        Opart + (pid_bh * num_splits + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
        mask=s_ok[:, None], other=0.0,
    )
    empty = tot == 0.0
    tot_safe = tl.where(empty, 1.0, tot)
    out = tl.sum(op * w[:, None], 0) / tot_safe
    out = tl.where(empty, 0.0, out)
    lse = tl.where(empty, float("-inf"), (m_use + tl.log2(tot_safe)) * 0.6931471805599453)
    tl.store(Out + b * so_b + h * so_h + offs_d * so_d, out.to(Out.dtype.element_ty), mask=offs_d < D)
    tl.store(Lse + b * sl_b + h * sl_h + tl.arange(0, 1), tl.zeros([1], dtype=tl.float32) + lse)


def _block_d(d: int) -> int:
    if d > 256:
        raise LayoutError(f"the Triton kernels support head dims up to 256, got {d}")
    return max(16, triton.next_power_of_2(d))


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LayoutError(
            f"the Triton kernels take float16/bfloat16/float32, got {t.dtype}; "
            "use backend='cpu' for float64"
        )


def _layout_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides with broadcast (size-1) batch/head dims set to 0."""
    return tuple(0 if (i < 2 and t.shape[i] == 1) else t.stride(i) for i in range(t.dim()))


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    softcap: float | None = None,
) -> None:
    """Launch the prefill kernel: q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]`` into
    ``out [B, Hq, Nq, D]`` and ``lse`` float32 ``[B, Hq, Nq]`` (``softcap``: soft-capped scores)."""
    _check_dtype(q)
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    block_d = _block_d(d)
    idx = layout.kv_indices.contiguous()
    cnt = layout.kv_counts.contiguous()
    si = _layout_strides(idx)
    sc = _layout_strides(cnt)
    upcast = _interpret()
    ieee = q.dtype == torch.float32

    def grid(meta):
        return (triton.cdiv(nq, meta["BLOCK_M"]), bsz * hq)

    _block_sparse_fwd_kernel[grid](
        q, k, v, out, lse, idx, cnt,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *lse.stride(),
        si[0], si[1], si[2],
        sc[0], sc[1],
        hq, nq, nk, d, hq // hkv, nk - nq, scale * _LOG2E, *_cap_args(scale, softcap),
        LAYOUT_M=layout.block_m, LAYOUT_N=layout.block_n, BLOCK_D=block_d,
        CAUSAL=causal, UPCAST=upcast, IEEE=ieee, SOFTCAP=softcap is not None,
    )


def _cap_args(scale: float, softcap: float | None) -> tuple[float, float]:
    """``(scale / cap, cap * log2(e))`` for :func:`_log2_scores` (unused without a cap)."""
    return (scale / softcap, softcap * _LOG2E) if softcap is not None else (1.0, 1.0)


def _num_splits(bh: int, max_blocks: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = math.ceil(2 * sms / max(bh, 1))
    else:
        want = 2
    return max(1, min(want, max_blocks, 64))


def decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: BlockLayout,
    *,
    cache_seqlens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    softcap: float | None = None,
) -> None:
    """Launch split-KV decode + merge: q ``[B, Hq, 1, D]``, cache ``[B, Hkv, S, D]`` into
    ``out [B, Hq, 1, D]`` and ``lse`` float32 ``[B, Hq, 1]``."""
    _check_dtype(q)
    bsz, hq, _, d = q.shape
    hkv = k_cache.shape[1]
    block_d = _block_d(d)
    bn = layout.block_n
    block_n = min(bn, 64)
    mb = layout.max_blocks
    splits = _num_splits(bsz * hq, mb, q.device)
    per = triton.cdiv(mb, splits)
    splits = triton.cdiv(mb, per)
    opart = torch.empty((bsz * hq * splits, block_d), dtype=torch.float32, device=q.device)
    lpart = torch.empty((bsz * hq * splits,), dtype=torch.float32, device=q.device)
    idx = layout.kv_indices.contiguous()
    cnt = layout.kv_counts.contiguous()
    si = _layout_strides(idx)
    sc = _layout_strides(cnt)
    seqlens = cache_seqlens.to(torch.int32)
    _block_sparse_decode_kernel[(bsz * hq, splits)](
        q, k_cache, v_cache, opart, lpart, idx, cnt, seqlens,
        q.stride(0), q.stride(1), q.stride(3),
        *k_cache.stride(), *v_cache.stride(),
        si[0], si[1],
        sc[0], sc[1],
        hq, d, k_cache.shape[2], hq // hkv, scale * _LOG2E, *_cap_args(scale, softcap), per, splits,
        LAYOUT_N=bn, BLOCK_N=block_n, BLOCK_D=block_d, SOFTCAP=softcap is not None,
    )
    _decode_merge_kernel[(bsz * hq,)](
        opart, lpart, out, lse,
        out.stride(0), out.stride(1), out.stride(3),
        lse.stride(0), lse.stride(1),
        hq, d, splits,
        SPLITS_P2=triton.next_power_of_2(splits), BLOCK_D=block_d,
    )
