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
  is covered when the best rank over its interval of verticals or of slashes is ``< m`` (range
  minima, no loop over blocks);
* ``m`` is the largest count whose *new* blocks (not in the given mask) stay within
  ``floor(fraction · causal blocks)``. Each block is covered from the best rank among its
  elements on (a range minimum), so that ``m`` is one order statistic of those ranks over the
  free blocks: one sort, vectorised over rows and heads, no search loop.

Cost: ``n · Nk · D`` multiply-adds per head (in the inputs' dtype) plus a few passes of
``nQB · nKB`` and a sort of ``2 · Nk`` elements per head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import DamRuntimeError

#: how a layer's estimate budget is shared among its heads (see :func:`last_query_mask`)
SHARES = ("uniform", "adaptive")


def head_scores(q: torch.Tensor, k: torch.Tensor, heads: Sequence[int], groups: int) -> torch.Tensor:
    """``q · kᵀ`` of some query heads, float32 ``[Bt, He, c, Nk]``, computed in the inputs' dtype.

    Args:
        q: ``[Bt, Hkv, G * c, D]``: the ``c`` query rows of the ``G = groups`` query heads of each
            KV head (head ``hkv * G + g`` is rows ``[g * c, (g + 1) * c)``); k: ``[Bt, Hkv, Nk, D]``.
        heads: the query heads wanted (host ints, ascending).

    One matmul per KV head group: k is never copied per query head or up-cast. On the CPU the
    product is taken key-major (``linear(k, q)`` gives ``[Nk, G * c]``), which reads k as it
    lies; the batched ``q @ kᵀ`` is several times slower there when k is not in the CPU's
    caches (a long prompt's K; measured in bf16 and fp32, see issue 11's notes).
    """
    Bt, Hkv, M, D = q.shape
    Nk, G = k.shape[2], int(groups)
    c = M // G
    heads = list(heads)
    if q.device.type != "cpu":
        s = torch.matmul(q, k.transpose(-1, -2)).view(Bt, Hkv * G, c, Nk)
        if len(heads) != Hkv * G:
            s = s.index_select(1, torch.tensor(heads, device=q.device))
        return s.float()
    out = torch.empty((Bt, len(heads), c, Nk), dtype=torch.float32, device=q.device)
    for b in range(Bt):
        last, rt = -1, None
        for j, h in enumerate(heads):
            if h // G != last:
                last = h // G
                rt = F.linear(k[b, last], q[b, last]).t().view(G, c, Nk)
            out[b, j].copy_(rt[h % G])
    return out


def last_query_scores(
    q: torch.Tensor, k: torch.Tensor, heads: Sequence[int] | torch.Tensor, last_q: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element scores of the last queries: ``vert [Bt, He, Nk]`` and ``slash [Bt, He, Nk]`` (float32).

    Args:
        q: ``[Bt, Hq, Nq, D]``, the last ``Nq`` of ``Nk`` positions; k: ``[Bt, Hkv, Nk, D]``.
        heads: the query heads to score (GQA by index), distinct and ascending: host ints (a
            tensor is read on the host).
    """
    Bt, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    n = min(int(last_q), Nq)
    heads = heads.tolist() if isinstance(heads, torch.Tensor) else list(heads)
    # all query heads, grouped by KV head (no copy of k per query head), in the inputs' dtype
    # (bf16 stays bf16: no up-cast copy of k), scores scaled in fp32
    qs = q[:, :, Nq - n:].reshape(Bt, Hkv, G * n, D)
    s = head_scores(qs, k, heads, G).mul_(scale)
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
    ncausal = causal_blocks(Nq, Nk, B)  # host arithmetic: no read of a tensor
    budget: int | torch.Tensor = math.floor(fraction * ncausal)
    if share == "adaptive":
        kept = cur[:, :, -1].repeat_interleave(B, -1)[..., :Nk]  # [Bt, He, Nk]: last row's kept keys
        miss = (vert.sum(-1) - (vert * kept).sum(-1)).clamp(min=0)  # [Bt, He]
        w = miss / miss.mean(-1, keepdim=True).clamp(min=1e-12)
        budget = torch.floor(fraction * ncausal * w).clamp(max=ncausal).to(torch.int64)
    order = torch.cat([vert, slash], -1).argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(2 * Nk, device=dev).expand_as(order))
    # block (a, b) is covered by the top m elements iff the best rank among its verticals
    # [v_lo, v_hi] or its slashes [s_lo, s_hi] is < m: tau[a, b] = that best rank (range minima
    # from sparse tables). Then the blocks new for m are the free blocks with tau < m, and the
    # largest m within budget is the (budget+1)-th smallest tau of the free blocks: one sort, no
    # search loop.
    big = 2 * Nk
    span = min(Nk, 2 * B - 1)  # the longest range (a slash range spans a query block + B - 1)
    tau = torch.minimum(_range_min(rank[..., :Nk], v_lo, v_hi, big, span),
                        _range_min(rank[..., Nk:], s_lo, s_hi, big, span))
    tau_free = torch.where(free, tau, torch.full_like(tau, big)).flatten(-2)  # [Bt, He, nqb * nkb]
    srt = tau_free.sort(-1).values
    k = torch.as_tensor(budget, device=dev).expand(Bt, He).clamp(min=0)
    m = torch.where(k < srt.shape[-1], srt.gather(-1, k.clamp(max=srt.shape[-1] - 1).unsqueeze(-1)).squeeze(-1),
                    torch.full_like(k, big))
    return (tau < m[..., None, None]) & causal


def causal_blocks(q_len: int, kv_len: int, block_size: int) -> int:
    """Causal (query block, KV block) pairs of ``q_len`` queries at the last positions of
    ``kv_len`` keys, from the lengths alone (host ints)."""
    B, off = int(block_size), int(kv_len) - int(q_len)
    return sum((off + min((a + 1) * B, q_len) - 1) // B + 1 for a in range(-(-int(q_len) // B)))


def _range_min(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, empty: int, max_len: int) -> torch.Tensor:
    """``min(x[..., lo:hi + 1])`` for every range: ``x`` int64 ``[..., N]``, ``lo``/``hi`` int64
    ``[nqb, nkb]`` (``empty`` where ``lo > hi`` after clamping to ``[0, N - 1]``), no range longer
    than ``max_len`` (host int) -> ``[..., nqb, nkb]``. A sparse table of minima over
    power-of-two spans, two gathers per range."""
    N = x.shape[-1]
    lo_c, hi_c = lo.clamp(min=0), hi.clamp(max=N - 1)
    ok = lo_c <= hi_c
    length = (hi_c - lo_c + 1).clamp(min=1)
    levels = max(1, min(N, max_len).bit_length())  # tables[j]: minima over spans of 2 ** j
    lev = sum((length >= (1 << j)).long() for j in range(1, levels))  # floor(log2(length))
    tables = [x]
    for j in range(1, levels):
        prev, span = tables[-1], 1 << (j - 1)
        nxt = prev.clone()
        nxt[..., : N - span] = torch.minimum(prev[..., : N - span], prev[..., span:])
        tables.append(nxt)
    st = torch.stack(tables, -2).flatten(-2)  # [..., levels * N]
    base = lev * N
    i1 = (base + lo_c.clamp(max=N - 1)).reshape(-1)
    i2 = (base + (hi_c - (1 << lev) + 1).clamp(min=0, max=N - 1)).reshape(-1)
    flat = (*x.shape[:-1], i1.numel())
    r = torch.minimum(torch.gather(st, -1, i1.expand(flat)), torch.gather(st, -1, i2.expand(flat)))
    r = r.view(*x.shape[:-1], *lo.shape)
    return torch.where(ok, r, torch.full_like(r, empty))


__all__ = ["SHARES", "causal_blocks", "head_scores", "last_query_mask", "last_query_scores", "select_blocks"]
