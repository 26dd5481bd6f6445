"""Run-time vertical-and-slash estimate from the last queries (``RuntimeConfig.last_query``).

A static program cannot know where a given input's content-placed hot spots lie (a retrieved
passage, a repeated phrase). MInference's observation is that the last few queries of a prompt
already attend to them: their exact attention, pooled per key (*verticals*: every later query
looks at key ``j``) and per offset (*slashes*: every query looks ``d`` tokens back), ranks the
columns and diagonals worth adding. This module adds that estimate *on top of* a head's static
(and dynamic) blocks, within a budget of new blocks.

Per (row, head), with ``n = min(last_q, Nq)`` last queries at positions ``i_t``:

* ``p = softmax(scale · q_t · k_j)`` over causal keys (float32);
* element scores ``vert[j] = Σ_t p[t, j]`` and ``slash[d] = Σ_t p[t, i_t - d]``;
* the 2·Nk elements are ranked by score together. Ranking *elements* rather than pooled blocks
  is what tells the two apart: a key every last query reads (a needle) scores ``n·a`` as one
  vertical element but only ``a`` per slash element (its offsets differ per query), and a true
  diagonal the other way round;
* the top ``m`` elements become blocks exactly: a vertical ``j`` keeps KV block ``j // B`` for
  the query blocks whose last query is ``>= j``; a slash ``d`` keeps, for query block ``[i0, i1]``,
  the KV blocks overlapping ``[i0 - d, i1 - d]`` (one or two). Both are interval tests: a block
  is covered when the best score over its interval of verticals or of slashes is among the top
  ``m`` (range maxima, no loop over blocks);
* ``m`` is the largest count whose *new* blocks (not in the given mask) stay within
  ``floor(fraction · causal blocks)``. Each block is covered from the best score among its
  elements on, so that the cut is one order statistic of those block scores over the free
  blocks: one selection (``kthvalue``), vectorised over rows and heads, no search loop and no
  sort of the elements. Elements of exactly equal score are kept or dropped together.

The slash sums are a strided view of the softmax (row stride ``Nk + 1``: the entries that view
reads before a row's first key are the previous query's future keys, exact zeros), with no
padding, flip or skewed copy of it.

Cost: ``n · Nk · D`` multiply-adds per head (in the inputs' dtype), a softmax over ``n · Nk``
scores, and a few passes of ``nQB · nKB`` per head.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from dam.kernels import cpu_native
from dam.kernels.cpu import scratch

from .errors import DamRuntimeError

#: how a layer's estimate budget is shared among its heads (see :func:`last_query_mask`)
SHARES = ("uniform", "adaptive")


def key_scores(k: torch.Tensor, cols: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``k · colsᵀ`` per KV head, *key-major*: ``[Bt, Hkv, Nk, C]`` in the inputs' dtype.

    Args:
        k: ``[Bt, Hkv, Nk, D]``; cols: ``[Bt, Hkv, C, D]`` (query columns grouped by KV head).

    ``out``: a buffer of that shape and dtype to write into.

    Keys on dim -2: k is read as it lies (no copy, no up-cast), and the reductions over keys
    that follow run over contiguous rows of C. The batched ``q · kᵀ`` (query-major) is several
    times slower on the CPU when k is not in its caches (a long prompt's K; issue 11's notes),
    and its per-head transposes were the larger part of planning there.
    """
    return torch.matmul(k, cols.transpose(-1, -2), out=out)


def last_query_scores(
    q: torch.Tensor, k: torch.Tensor, heads: Sequence[int] | torch.Tensor, last_q: int, scale: float,
    max_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element scores of the last queries: ``vert [Bt, He, Nk]`` and ``slash [Bt, He, Nk]`` (float32).

    Args:
        q: ``[Bt, Hq, Nq, D]``, the last ``Nq`` of ``Nk`` positions; k: ``[Bt, Hkv, Nk, D]``.
        heads: the query heads to score (GQA by index), distinct and ascending: host ints (a
            tensor is read on the host).
        max_elements: KV heads are scored a few at a time, at most this many fp32 scores each.
    """
    Bt, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    n = min(int(last_q), Nq)
    heads = heads.tolist() if isinstance(heads, torch.Tensor) else list(heads)
    groups = sorted({h // G for h in heads})
    hs = torch.tensor(heads, device=q.device)
    fused = cpu_native.last_query_fn(k)
    if fused is not None:  # DAM's CPU kernel: both sums fused over the keys, scores in fp32
        vert = torch.empty((Bt, Hkv, G, Nk), dtype=torch.float32)
        slash = torch.empty_like(vert)
        fused(q[:, :, Nq - n:].reshape(Bt, Hkv, G * n, D).contiguous(), k, n, float(scale), vert, slash)
        return (vert.view(Bt, Hkv * G, Nk).index_select(1, hs), slash.view(Bt, Hkv * G, Nk).index_select(1, hs))
    # row g * n + t: query t of head hkv * G + g; the scale folded into these few queries
    cols = (q[:, :, Nq - n:] * scale).reshape(Bt, Hkv, G * n, D)
    # causal: key Nk - n + r lies after last query t when r > t
    after = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)  # [t, r]
    vert = torch.empty((Bt, Hkv, G, Nk), dtype=torch.float32, device=q.device)
    slash = torch.empty_like(vert)
    step = max(1, max_elements // max(1, Bt * G * n * Nk))
    for c0 in range(0, len(groups), step):
        sel = groups[c0:c0 + step]
        g = torch.tensor(sel, device=q.device) if len(sel) != Hkv else None
        kc = k if g is None else k.index_select(1, g)
        qc = cols if g is None else cols.index_select(1, g)
        shape = (Bt, qc.shape[1], G * n, Nk)
        s = torch.matmul(qc, kc.transpose(-1, -2), out=scratch("lq-scores", shape, q.dtype, q.device))
        s[..., Nk - n:].view(Bt, -1, G, n, n).masked_fill_(after, float("-inf"))
        # one fused softmax over the keys of each last query, in float32 (contiguous rows), in
        # reused buffers (fresh ones this big page-fault on every call: several times the cost
        # of the softmax itself on the CPU)
        if s.dtype != torch.float32:
            s = scratch("lq-scores32", shape, torch.float32, q.device).copy_(s)
        p = torch.ops.aten._softmax.out(s, -1, False, out=scratch("lq-probs", shape, torch.float32, q.device))
        p = p.view(Bt, -1, G, n, Nk)
        # slash[d] = sum_t p[t, i_t - d], i_t = Nk - n + t. In u = Nk - 1 - d, row t contributes
        # p[t, u + t - (n - 1)]: a strided view with row stride Nk + 1. Where u + t < n - 1 it
        # reads the tail of row t - 1, whose keys lie after query t - 1 (exact zeros of the
        # softmax), so rows t >= 1 need no padding; row 0 (whose previous row is another head's
        # last query, or nothing) is added from its own slice
        st = p.stride()
        diag = p.as_strided((Bt, p.shape[1], G, n - 1, Nk), (st[0], st[1], st[2], Nk + 1, 1),
                            p.storage_offset() + Nk + 1 - (n - 1))
        sl = diag.sum(-2)  # rows t >= 1 (zeros when n == 1)
        sl[..., n - 1:] += p[..., 0, :Nk - n + 1]
        idx = slice(None) if g is None else g
        vert[:, idx] = p.sum(-2)
        slash[:, idx] = sl.flip(-1)
    return (vert.view(Bt, Hkv * G, Nk).index_select(1, hs), slash.view(Bt, Hkv * G, Nk).index_select(1, hs))


def last_query_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    current: torch.Tensor,
    heads: Sequence[int] | torch.Tensor,
    fraction: float,
    last_q: int,
    block_size: int,
    scale: float | None = None,
    share: str = "uniform",
) -> torch.Tensor:
    """The estimated blocks of ``heads``: bool ``[Bt, He, nQB, nKB]`` (see the module docstring).

    Args:
        q: ``[Bt, Hq, Nq, D]`` queries at the last ``Nq`` of ``Nk`` positions (all rows alike).
        k: ``[Bt, Hkv, Nk, D]`` (post-RoPE).
        current: bool ``[1 or Bt, He, nQB, nKB]``, the blocks those heads already keep; blocks
            in it cost nothing against the budget.
        heads: query-head indices, distinct and ascending: host ints (a tensor is read on the host).
        fraction: budget of *new* blocks per (row, head), as a fraction of the causal blocks.
        last_q: how many last queries estimate (``>= 1``).
        block_size: ``B``.
        scale: softmax scale (default ``D ** -0.5``).
        share: ``"uniform"``: every (row, head) gets ``floor(fraction * causal)`` new blocks;
            ``"adaptive"``: the same total per row, shared among the heads in proportion to the
            last queries' attention mass *outside* ``current`` (the last query block's row):
            heads whose kept blocks already hold what the last queries read get little.
    """
    if share not in SHARES:
        raise DamRuntimeError(f"share must be one of {SHARES}, got {share!r}")
    if not 0.0 <= fraction <= 1.0:
        raise DamRuntimeError(f"last-query fraction must lie in [0, 1], got {fraction}")
    if last_q < 1:
        raise DamRuntimeError(f"last-query count must be >= 1, got {last_q}")
    Bt, _, Nq, D = q.shape
    heads = heads.tolist() if isinstance(heads, torch.Tensor) else list(heads)
    He = len(heads)
    if He == 0 or fraction == 0.0:
        B = int(block_size)
        return torch.zeros((Bt, He, -(-Nq // B), -(-k.shape[2] // B)), dtype=torch.bool, device=q.device)
    scale = D ** -0.5 if scale is None else float(scale)
    vert, slash = last_query_scores(q, k, heads, last_q, scale)
    return select_blocks(vert, slash, current, fraction, Nq, block_size, share)


def select_blocks(
    vert: torch.Tensor,
    slash: torch.Tensor,
    current: torch.Tensor,
    fraction: float,
    q_len: int,
    block_size: int,
    share: str = "uniform",
) -> torch.Tensor:
    """The block choice of :func:`last_query_mask` from its element scores (``vert``/``slash``
    ``[Bt, He, Nk]``, :func:`last_query_scores`): bool ``[Bt, He, nQB, nKB]`` for queries at the
    last ``q_len`` of ``Nk`` positions. Separate so that callers trying several budgets on one
    input score it once."""
    B = int(block_size)
    Bt, He, Nk = vert.shape
    Nq = int(q_len)
    nqb, nkb = -(-Nq // B), -(-Nk // B)
    dev = vert.device
    cur = current.expand(Bt, He, nqb, nkb)
    ncausal = causal_blocks(Nq, Nk, B)  # host arithmetic: no read of a tensor
    budget: int | torch.Tensor = max(0, math.floor(fraction * ncausal))
    if share == "adaptive":
        kept = cur[:, :, -1].repeat_interleave(B, -1)[..., :Nk]  # [Bt, He, Nk]: last row's kept keys
        miss = (vert.sum(-1) - (vert * kept).sum(-1)).clamp(min=0)  # [Bt, He]
        w = miss / miss.mean(-1, keepdim=True).clamp(min=1e-12)
        budget = torch.floor(fraction * ncausal * w).clamp(min=0, max=ncausal).to(torch.int64)
    fused = cpu_native.host_fn("select_blocks", vert) if vert.dtype == torch.float32 else None
    if fused is not None:  # DAM's CPU kernel: the same choice, per head on the host
        budgets = (budget.contiguous() if isinstance(budget, torch.Tensor)
                   else torch.full((Bt, He), budget, dtype=torch.int64))
        out = torch.empty((Bt, He, nqb, nkb), dtype=torch.bool)
        fused(vert.contiguous(), slash.contiguous(), cur.contiguous(), budgets, Nq, B, out)
        return out
    geo = _geometry(Nq, Nk, B, dev)
    causal = geo.causal
    free = causal & ~cur  # blocks that would cost budget
    # an element's "rank" is its negated score: block (a, b) is covered by the top m elements
    # iff the best (least) one among its verticals [v_lo, v_hi] or its slashes [s_lo, s_hi] is
    # among them: tau[a, b] = that least value (range minima, :func:`_tau`). The blocks
    # new for a prefix are then the free blocks with tau below its cut, and the longest prefix
    # within budget cuts at the (budget+1)-th smallest tau of the free blocks: one selection, no
    # search loop (no sort of the elements either: ties, which a rank would break, keep or drop
    # together, never over budget)
    inf = float("inf")
    tau = _tau(vert, slash, geo)
    tau_free = torch.where(free, tau, torch.full_like(tau, inf)).flatten(-2)  # [Bt, He, nqb * nkb]
    L = tau_free.shape[-1]
    if isinstance(budget, int):
        cut = (tau_free.kthvalue(budget + 1, -1).values if budget < L
               else torch.full(tau_free.shape[:-1], inf, device=dev))
    else:
        srt = tau_free.sort(-1).values
        cut = torch.where(budget < L, srt.gather(-1, budget.clamp(max=L - 1).unsqueeze(-1)).squeeze(-1),
                          torch.full(srt.shape[:-1], inf, device=dev))
    return (tau < cut[..., None, None]) & causal


def causal_blocks(q_len: int, kv_len: int, block_size: int) -> int:
    """Causal (query block, KV block) pairs of ``q_len`` queries at the last positions of
    ``kv_len`` keys, from the lengths alone (host ints)."""
    B, off = int(block_size), int(kv_len) - int(q_len)
    return sum((off + min((a + 1) * B, q_len) - 1) // B + 1 for a in range(-(-int(q_len) // B)))


class _Geometry(NamedTuple):
    """Length-only geometry of :func:`select_blocks` (cached; never written to)."""

    causal: torch.Tensor  # bool [nqb, nkb]
    v_idx: torch.Tensor  # int64 [nqb * nkb]: where block (a, b)'s vertical minimum lies in the block prefix minima
    s_idx: torch.Tensor  # int64 [nqb * nkb]: where its slash minimum lies in the stacked sliding minima
    widths: tuple[int, ...]  # the slash windows' widths (one per full query block, one for a ragged last)
    block: int


@functools.lru_cache(maxsize=32)
def _geometry(Nq: int, Nk: int, B: int, dev: torch.device) -> _Geometry:
    """The element ranges of every block (query block a, absolute positions [i0, i1], against
    KV block b, keys [bB, bB + B - 1]), as indices into two length-only tables (:func:`_tau`):

    * verticals j in [bB, min(bB + B - 1, i1)]: a prefix of block b, so their minimum is the
      block-prefix minimum at ``min(bB + B - 1, i1)``;
    * slashes d in [max(i0 - bB - B + 1, 0), i1 - bB]: the window of width ``w = i1 - i0 + B``
      ending at ``e = i1 - bB`` (cut at 0), whose minimum is the sliding minimum of width w at e.
      Every full query block has ``w = 2B - 1``; only a ragged last one differs.

    Non-causal blocks (``bB > i1``) point anywhere: the caller masks them."""
    nqb, nkb = -(-Nq // B), -(-Nk // B)
    a = torch.arange(nqb, device=dev)
    i0 = (Nk - Nq + a * B)[:, None]
    i1 = (Nk - Nq + torch.clamp((a + 1) * B, max=Nq) - 1)[:, None]
    b0 = (torch.arange(nkb, device=dev) * B)[None, :]
    causal = (b0 <= i1).expand(nqb, nkb).contiguous()
    v_idx = (b0 + torch.clamp(i1 - b0, min=0, max=B - 1)).reshape(-1)
    w = (i1 - i0 + B).reshape(-1).tolist()  # host ints, once per length (cached)
    widths = tuple(sorted(set(w)))
    wi = torch.tensor([widths.index(x) for x in w], device=dev)[:, None]
    s_idx = (wi * Nk + torch.clamp(i1 - b0, min=0, max=Nk - 1)).reshape(-1)
    return _Geometry(causal, v_idx, s_idx, widths, B)


def _sliding_min(x: torch.Tensor, w: int) -> torch.Tensor:
    """``min(x[..., max(e - w + 1, 0):e + 1])`` for every e (van Herk / Gil-Werman: minima of
    blocks of w from the left and from the right, two per element, any w)."""
    N = x.shape[-1]
    nb = -(-(N + w - 1) // w)
    xp = torch.full((*x.shape[:-1], nb * w), float("inf"), dtype=x.dtype, device=x.device)
    xp[..., w - 1:w - 1 + N] = x  # window [e - w + 1, e] of x = [e, e + w - 1] of xp
    blocks = xp.view(*x.shape[:-1], nb, w)
    pre = blocks.cummin(-1).values.flatten(-2)
    suf = blocks.flip(-1).cummin(-1).values.flip(-1).flatten(-2)
    return torch.minimum(suf[..., :N], pre[..., w - 1:w - 1 + N])


def _tau(vert: torch.Tensor, slash: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """``[Bt, He, nqb, nkb]``: the least negated score among each block's verticals and slashes
    (:func:`_geometry`); arbitrary on non-causal blocks."""
    Bt, He, Nk = vert.shape
    nqb, nkb = geo.causal.shape
    B = geo.block
    vp = torch.full((Bt, He, nkb * B), float("inf"), dtype=vert.dtype, device=vert.device)
    vp[..., :Nk] = vert.neg()
    vmin = vp.view(Bt, He, nkb, B).cummin(-1).values.flatten(-2)
    sn = slash.neg()
    smin = torch.cat([_sliding_min(sn, w) for w in geo.widths], -1)
    flat = (Bt, He, geo.v_idx.numel())
    tau = torch.minimum(vmin.gather(-1, geo.v_idx.expand(flat)), smin.gather(-1, geo.s_idx.expand(flat)))
    return tau.view(Bt, He, nqb, nkb)


__all__ = ["SHARES", "causal_blocks", "key_scores", "last_query_mask", "last_query_scores", "select_blocks"]
