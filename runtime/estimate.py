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

The slash sums are a strided view of the softmax (laid right of ``n - 1`` zero columns, row
``t`` starts ``t + 1`` elements further on), with no flip or skewed copy of it.

Cost: ``n · Nk · D`` multiply-adds per head (in the inputs' dtype), a softmax over ``n · Nk``
scores, and a few passes of ``nQB · nKB`` per head.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .errors import DamRuntimeError

#: how a layer's estimate budget is shared among its heads (see :func:`last_query_mask`)
SHARES = ("uniform", "adaptive")


def key_scores(k: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``k · colsᵀ`` per KV head, *key-major*: ``[Bt, Hkv, Nk, C]`` in the inputs' dtype.

    Args:
        k: ``[Bt, Hkv, Nk, D]``; cols: ``[Bt, Hkv, C, D]`` (query columns grouped by KV head).

    Keys on dim -2: k is read as it lies (no copy, no up-cast), and the reductions over keys
    that follow run over contiguous rows of C. The batched ``q · kᵀ`` (query-major) is several
    times slower on the CPU when k is not in its caches (a long prompt's K; issue 11's notes),
    and its per-head transposes were the larger part of planning there.
    """
    return torch.matmul(k, cols.transpose(-1, -2))


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
    cols = q[:, :, Nq - n:].reshape(Bt, Hkv, G * n, D)  # row g * n + t: query t of head hkv * G + g
    # causal: key Nk - n + r lies after last query t when r > t
    after = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)  # [t, r]
    W = n - 1 + Nk
    vert = torch.empty((Bt, Hkv, G, Nk), dtype=torch.float32, device=q.device)
    slash = torch.empty_like(vert)
    step = max(1, max_elements // max(1, Bt * G * n * W))
    for c0 in range(0, len(groups), step):
        sel = groups[c0:c0 + step]
        g = torch.tensor(sel, device=q.device) if len(sel) != Hkv else None
        kc = k if g is None else k.index_select(1, g)
        qc = cols if g is None else cols.index_select(1, g)
        # p [Bt, h, G * n, Nk] (query-major, a few queries: the product is small), right of
        # n - 1 zero columns: slash[d] = sum_t p[t, i_t - d] is then a strided view of it (row t
        # starts t + 1 elements further on), summed over contiguous rows
        P = torch.empty((Bt, kc.shape[1], G * n, W), dtype=torch.float32, device=q.device)
        P[..., :n - 1].zero_()
        p = P[..., n - 1:]
        p.copy_(torch.matmul(qc, kc.transpose(-1, -2))).mul_(scale)
        p[..., Nk - n:].view(Bt, -1, G, n, n).masked_fill_(after, float("-inf"))
        p.sub_(p.amax(-1, keepdim=True)).exp_()
        p.div_(p.sum(-1, keepdim=True))  # softmax over the keys of each last query
        st = P.stride()
        # element (t, u) of head g: row g * n + t, column t + u, with u = Nk - 1 - d
        diag = P.as_strided((Bt, P.shape[1], G, n, Nk), (st[0], st[1], n * W, W + 1, 1), P.storage_offset())
        idx = slice(None) if g is None else g
        vert[:, idx] = p.view(Bt, -1, G, n, Nk).sum(-2)
        slash[:, idx] = diag.sum(-2).flip(-1)
    hs = torch.tensor(heads, device=q.device)
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
    causal, v_idx, s_idx = _geometry(Nq, Nk, B, dev)
    cur = current.expand(Bt, He, nqb, nkb)
    free = causal & ~cur  # blocks that would cost budget
    ncausal = causal_blocks(Nq, Nk, B)  # host arithmetic: no read of a tensor
    budget: int | torch.Tensor = max(0, math.floor(fraction * ncausal))
    if share == "adaptive":
        kept = cur[:, :, -1].repeat_interleave(B, -1)[..., :Nk]  # [Bt, He, Nk]: last row's kept keys
        miss = (vert.sum(-1) - (vert * kept).sum(-1)).clamp(min=0)  # [Bt, He]
        w = miss / miss.mean(-1, keepdim=True).clamp(min=1e-12)
        budget = torch.floor(fraction * ncausal * w).clamp(min=0, max=ncausal).to(torch.int64)
    # an element's "rank" is its negated score: block (a, b) is covered by the top m elements
    # iff the best (least) one among its verticals [v_lo, v_hi] or its slashes [s_lo, s_hi] is
    # among them: tau[a, b] = that least value (range minima from sparse tables). The blocks
    # new for a prefix are then the free blocks with tau below its cut, and the longest prefix
    # within budget cuts at the (budget+1)-th smallest tau of the free blocks: one selection, no
    # search loop (no sort of the elements either: ties, which a rank would break, keep or drop
    # together, never over budget)
    inf = float("inf")
    tau = torch.minimum(_range_min(vert.neg(), v_idx, inf), _range_min(slash.neg(), s_idx, inf))
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


class _Ranges(NamedTuple):
    """Index plan of :func:`_range_min` for fixed ranges (length-only, cached)."""

    levels: int
    i1: torch.Tensor  # flat indices into the stacked tables, [nqb * nkb]
    i2: torch.Tensor
    ok: torch.Tensor  # bool [nqb, nkb]: the range is not empty


@functools.lru_cache(maxsize=32)
def _geometry(Nq: int, Nk: int, B: int, dev: torch.device) -> tuple[torch.Tensor, _Ranges, _Ranges]:
    """Length-only geometry of :func:`select_blocks` (cached; never written to): the causal
    blocks and the element ranges of every block (query block a, absolute positions [i0, i1],
    against KV block b, keys [b0, b0 + B - 1])."""
    nqb, nkb = -(-Nq // B), -(-Nk // B)
    a = torch.arange(nqb, device=dev)
    i0 = (Nk - Nq + a * B)[:, None]
    i1 = (Nk - Nq + torch.clamp((a + 1) * B, max=Nq) - 1)[:, None]
    b0 = (torch.arange(nkb, device=dev) * B)[None, :]
    v_lo, v_hi = b0.expand(nqb, nkb), torch.minimum(b0 + B - 1, i1)  # verticals j in the block, j <= i1
    s_lo, s_hi = (i0 - b0 - B + 1).clamp(min=0).expand(nqb, nkb), (i1 - b0).expand(nqb, nkb)  # offsets d
    span = min(Nk, 2 * B - 1)  # the longest range (a slash range spans a query block + B - 1)
    return ((b0 <= i1).expand(nqb, nkb).contiguous(), _range_index(v_lo, v_hi, Nk, span),
            _range_index(s_lo, s_hi, Nk, span))


def _range_index(lo: torch.Tensor, hi: torch.Tensor, N: int, max_len: int) -> _Ranges:
    """The gathers of a sparse table of minima over power-of-two spans for ranges ``[lo, hi]``
    (int64 ``[nqb, nkb]``, clamped to ``[0, N - 1]``; empty where ``lo > hi``), none longer than
    ``max_len``."""
    lo_c, hi_c = lo.clamp(min=0), hi.clamp(max=N - 1)
    ok = lo_c <= hi_c
    length = (hi_c - lo_c + 1).clamp(min=1)
    levels = max(1, min(N, max_len).bit_length())  # tables[j]: minima over spans of 2 ** j
    lev = sum((length >= (1 << j)).long() for j in range(1, levels))  # floor(log2(length))
    base = lev * N
    i1 = (base + lo_c.clamp(max=N - 1)).reshape(-1)
    i2 = (base + (hi_c - (1 << lev) + 1).clamp(min=0, max=N - 1)).reshape(-1)
    return _Ranges(levels, i1, i2, ok.contiguous())


def _range_min(x: torch.Tensor, r: _Ranges, empty: float) -> torch.Tensor:
    """``min(x[..., lo:hi + 1])`` for every range of ``r`` (:func:`_range_index`): ``x`` ``[..., N]``
    -> ``[..., nqb, nkb]``, ``empty`` where a range is empty. Two gathers per range."""
    N = x.shape[-1]
    tables = [x]
    for j in range(1, r.levels):
        prev, span = tables[-1], 1 << (j - 1)
        nxt = prev.clone()
        nxt[..., : N - span] = torch.minimum(prev[..., : N - span], prev[..., span:])
        tables.append(nxt)
    st = torch.stack(tables, -2).flatten(-2)  # [..., levels * N]
    flat = (*x.shape[:-1], r.i1.numel())
    out = torch.minimum(torch.gather(st, -1, r.i1.expand(flat)), torch.gather(st, -1, r.i2.expand(flat)))
    out = out.view(*x.shape[:-1], *r.ok.shape)
    return out.masked_fill_(~r.ok, empty)


__all__ = ["SHARES", "causal_blocks", "key_scores", "last_query_mask", "last_query_scores", "select_blocks"]
