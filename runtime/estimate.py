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
  the KV blocks overlapping ``[i0 - d, i1 - d]`` (one or two). Both are interval tests done with a
  prefix count over the selected elements (no loop over blocks);
* ``m`` is the largest count whose *new* blocks (not in the given mask) stay within
  ``floor(fraction · causal blocks)``; found by bisection, vectorised over rows and heads.

Cost: ``n · Nk · D`` multiply-adds per head plus ``O(log Nk)`` mask passes of ``nQB · nKB``.
"""

from __future__ import annotations

import math

import torch

from .errors import DamRuntimeError

#: how a layer's estimate budget is shared among its heads (see :func:`last_query_mask`)
SHARES = ("uniform", "adaptive")


def last_query_scores(
    q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor, last_q: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element scores of the last queries: ``vert [Bt, He, Nk]`` and ``slash [Bt, He, Nk]`` (float32).

    Args:
        q: ``[Bt, Hq, Nq, D]``, the last ``Nq`` of ``Nk`` positions; k: ``[Bt, Hkv, Nk, D]``.
        heads: int64 ``[He]`` query heads to score (GQA by index).
    """
    Bt, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    n = min(int(last_q), Nq)
    # all query heads, grouped by KV head (no copy of k per query head), then the wanted heads
    qs = (q[:, :, Nq - n:].float() * scale).reshape(Bt, Hkv, G * n, D)  # not in place: q is the caller's
    s = torch.matmul(qs, k.float().transpose(-1, -2)).view(Bt, Hq, n, Nk)
    if heads.numel() != Hq or not bool((heads == torch.arange(Hq, device=heads.device)).all()):
        s = s.index_select(1, heads)
    # causal: only the last n keys can lie after a last query (query t sits at Nk - n + t)
    tri = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
    s[..., Nk - n:].masked_fill_(tri, float("-inf"))
    p = torch.softmax(s, -1)  # [Bt, He, n, Nk]
    vert = p.sum(2)
    # slash[d] = sum_t p[t, i_t - d] with i_t = Nk - n + t: flip the keys and skew the rows, so
    # that row t starts at column n - 1 - t (a strided view, no gather)
    He, W = p.shape[1], Nk + n
    pf = torch.zeros((Bt, He, n, W), dtype=p.dtype, device=p.device)
    pf[..., :Nk] = p.flip(-1)
    skew = pf.as_strided((Bt, He, n, Nk), (He * n * W, n * W, W - 1, 1), n - 1)
    slash = skew.sum(2)
    return vert, slash


def _covered(sel: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Any selected element in ``[lo, hi]``: ``sel`` bool ``[..., N]``, ``lo``/``hi`` int64
    ``[nqb, nkb]`` (empty where ``lo > hi``) -> bool ``[..., nqb, nkb]``."""
    N = sel.shape[-1]
    cs = torch.nn.functional.pad(sel.to(torch.int32).cumsum(-1), (1, 0))  # cs[x] = #selected < x
    lo_c, hi_c = lo.clamp(0, N), (hi + 1).clamp(0, N)
    flat = (*sel.shape[:-1], lo.numel())
    cnt = torch.gather(cs, -1, hi_c.reshape(-1).expand(flat)) - torch.gather(cs, -1, lo_c.reshape(-1).expand(flat))
    return (cnt > 0).view(*sel.shape[:-1], *lo.shape) & (lo <= hi)


def last_query_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    current: torch.Tensor,
    heads: torch.Tensor,
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
        heads: int64 ``[He]`` query-head indices.
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
    He = int(heads.shape[0])
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
    # geometry of query block a (absolute positions [i0, i1]) against KV block b ([b0, b0 + B - 1])
    a = torch.arange(nqb, device=dev)
    i0 = (Nk - Nq + a * B)[:, None]
    i1 = (Nk - Nq + torch.clamp((a + 1) * B, max=Nq) - 1)[:, None]
    b0 = (torch.arange(nkb, device=dev) * B)[None, :]
    v_lo, v_hi = b0.expand(nqb, nkb), torch.minimum(b0 + B - 1, i1)  # verticals j in the block, j <= i1
    s_lo, s_hi = (i0 - b0 - B + 1).clamp(min=0).expand(nqb, nkb), (i1 - b0).expand(nqb, nkb)  # offsets d
    causal = (b0 <= i1).expand(nqb, nkb)
    cur = current.expand(Bt, He, nqb, nkb)
    free = causal & ~cur  # blocks that would cost budget
    ncausal = int(causal.sum())
    budget: int | torch.Tensor = math.floor(fraction * ncausal)
    if share == "adaptive":
        kept = cur[:, :, -1].repeat_interleave(B, -1)[..., :Nk]  # [Bt, He, Nk]: last row's kept keys
        miss = (vert.sum(-1) - (vert * kept).sum(-1)).clamp(min=0)  # [Bt, He]
        w = miss / miss.mean(-1, keepdim=True).clamp(min=1e-12)
        budget = torch.floor(fraction * ncausal * w).clamp(max=ncausal).to(torch.int64)
    order = torch.cat([vert, slash], -1).argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(2 * Nk, device=dev).expand_as(order))

    def build(m: torch.Tensor) -> torch.Tensor:  # m int64 [Bt, He] -> bool [Bt, He, nqb, nkb]
        sel = rank < m[..., None]
        return _covered(sel[..., :Nk], v_lo, v_hi) | _covered(sel[..., Nk:], s_lo, s_hi)

    lo = torch.zeros((Bt, He), dtype=torch.int64, device=dev)  # invariant: build(lo) within budget
    hi = torch.full((Bt, He), 2 * Nk, dtype=torch.int64, device=dev)
    for _ in range(max(1, math.ceil(math.log2(2 * Nk + 1)))):
        mid = (lo + hi + 1) // 2
        fits = (build(mid) & free).sum((-1, -2)) <= budget
        lo = torch.where(fits, mid, lo)
        hi = torch.where(fits, hi, mid - 1)
    return build(lo) & causal


__all__ = ["SHARES", "last_query_mask", "last_query_scores", "select_blocks"]
