"""Per-head fitting: the cheapest mask program that meets a recall target.

Everything here is at *block granularity*: the kernels compute whole blocks, so a program's recall
is the attention mass inside the blocks its ``block_mask`` keeps, and its cost is the number of
kept blocks. Two fitters:

* ``fit_head`` (``--method recall``): a greedy weighted set cover over candidate components
  (sink sizes, window sizes, slash offsets, vertical positions) ranked by mass gained per added
  block on the profiled ``block_mass``; every prefix of the greedy order is combined with a grid of
  dynamic fractions, the cheapest (at the target length) that meets the target wins, and redundant
  components are then pruned. A head that cannot meet the target under ``max_density`` is dense.
* ``fit_head_dam_paper`` (``--method dam-paper``): the seed paper's procedure (Box-Cox on the
  mean map, threshold tau, diagonal/vertical pattern pool kept at coverage >= mu).

The dynamic part is *estimated*, never measured: see ``estimate_recall``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from .ir import ArtifactError, MaskProgram

DYNAMIC_GRID = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
TOPP_LEVELS = (0.90, 0.95, 0.99)
# the recall targets of a head's trade-off curve for --allocate global
RECALL_LADDER = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999)


@dataclass(frozen=True)
class FitParams:
    """Knobs of the per-head fitter (a subset of CompileConfig).

    recall: target attention-mass recall in (0, 1].  max_density: heads whose cheapest program
    keeps more than this fraction of causal blocks at ``target_length`` *or at the profiled
    length* become dense (a diffuse head fitted at 2K is no cheaper at 8K: its mass spreads).
    dynamic_overselect: rho, how many times more blocks the run-time pooled-q.k selector is
    assumed to need than a mass-ranked oracle (>= 1; see estimate_recall).
    """

    recall: float = 0.95
    target_length: int = 8192
    max_density: float = 0.9
    max_slashes: int = 16
    max_verticals: int = 16
    dynamic_overselect: float = 2.0
    use_dynamic: bool = True
    max_sink: int | None = None
    block_slashes: bool = True

    def __post_init__(self) -> None:
        if not (0.0 < self.recall <= 1.0):
            raise ArtifactError(f"recall target must lie in (0, 1], got {self.recall}")
        if not (0.0 < self.max_density <= 1.0):
            raise ArtifactError(f"max_density must lie in (0, 1], got {self.max_density}")
        if self.target_length < 1:
            raise ArtifactError(f"target_length must be positive, got {self.target_length}")
        if self.max_slashes < 0 or self.max_verticals < 0:
            raise ArtifactError("max_slashes and max_verticals must be >= 0")
        if not (self.dynamic_overselect >= 1.0):
            raise ArtifactError(f"dynamic_overselect must be >= 1, got {self.dynamic_overselect}")
        if self.max_sink is not None and (isinstance(self.max_sink, bool) or self.max_sink < 0):
            raise ArtifactError(f"max_sink must be None or >= 0 tokens, got {self.max_sink!r}")


@dataclass(frozen=True, eq=False)
class HeadStats:
    """One head's mean statistics at the profiled length N (block size B).

    block_mass: float64 ``[nB, nB]`` (sums to ~1).  diag_mass, col_mass: float64 ``[N]``.
    topp: float64 ``[3]`` mean blocks a query block needs for 90/95/99 % of its mass.
    """

    block_mass: np.ndarray
    diag_mass: np.ndarray
    col_mass: np.ndarray
    topp: np.ndarray
    block_size: int

    @property
    def length(self) -> int:
        return int(self.diag_mass.shape[0])

    @staticmethod
    def pooled(members: list[HeadStats]) -> HeadStats:
        """The mean statistics of several heads (for a shared program)."""
        return HeadStats(
            np.mean([m.block_mass for m in members], 0),
            np.mean([m.diag_mass for m in members], 0),
            np.mean([m.col_mass for m in members], 0),
            np.mean([m.topp for m in members], 0),
            members[0].block_size,
        )


@dataclass(frozen=True)
class HeadFit:
    """A fitted program with its calibration figures (recall at N and T, density at T)."""

    program: MaskProgram
    recall: float  # static + estimated dynamic, on block_mass at N
    static_recall: float  # static blocks only, on block_mass at N
    density: float  # kept fraction of causal blocks at the target length (dynamic included)
    recall_at_target: float  # estimated at the target length (``length_recall``); the fit target


# ----------------------------------------------------------------------------------------
# block geometry (shared by all heads: cached per (length, block size))
@lru_cache(maxsize=16)
def _geometry(n: int, B: int) -> tuple[np.ndarray, np.ndarray]:
    """(causal [nB, nB] bool, diagonal [nB, nB] bool) for q_len = kv_len = n."""
    causal = MaskProgram(dense=True).block_mask(n, n, B)
    diag = MaskProgram().block_mask(n, n, B)
    causal.setflags(write=False)
    diag.setflags(write=False)
    return causal, diag


@lru_cache(maxsize=16)
def _shared_candidates(n: int, B: int) -> tuple[tuple[tuple[str, int], ...], np.ndarray]:
    """Candidate components whose masks do not depend on the head: sinks, windows, block slashes."""
    nb = -(-n // B)
    comps: list[tuple[str, int]] = []
    for k in range(1, nb):
        comps += [("sink", k * B), ("window", k * B), ("slash", k * B)]
    masks = np.stack([_component_mask(c, n, B) for c in comps]) if comps else np.zeros((0, nb, nb), bool)
    masks.setflags(write=False)
    return tuple(comps), masks


def _component_program(comp: tuple[str, int]) -> MaskProgram:
    kind, v = comp
    if kind == "sink":
        return MaskProgram(sink=v)
    if kind == "window":
        return MaskProgram(window=v)
    if kind == "slash":
        return MaskProgram(slashes=(v,))
    return MaskProgram(verticals=(v,))


@lru_cache(maxsize=8192)
def _component_mask_cached(comp: tuple[str, int], n: int, B: int) -> np.ndarray:
    m = _component_program(comp).block_mask(n, n, B)
    m.setflags(write=False)
    return m


def _component_mask(comp: tuple[str, int], n: int, B: int) -> np.ndarray:
    return _component_mask_cached(comp, n, B)


def compose(comps: list[tuple[str, int]], dynamic_fraction: float = 0.0) -> MaskProgram:
    """The program whose block mask is the union of the components' masks."""
    sink = max([v for k, v in comps if k == "sink"], default=0)
    window = max([v for k, v in comps if k == "window"], default=0)
    return MaskProgram(
        sink=sink,
        window=window,
        slashes=tuple(v for k, v in comps if k == "slash"),
        verticals=tuple(v for k, v in comps if k == "vertical"),
        dynamic_fraction=dynamic_fraction,
    )


# ----------------------------------------------------------------------------------------
def estimate_recall(
    weights: np.ndarray, mask: np.ndarray, dynamic_fraction: float, topp: np.ndarray,
    overselect: float,
) -> float:
    """Recall of ``mask`` (bool ``[nB, nB]``) plus an estimate for the dynamic budget.

    ``weights`` float64 ``[nB, nB]``: block mass (rows = query blocks, sums to ~1). Static
    recall is exact: ``sum(weights[mask])``. The dynamic budget adds, per query block ``a``,
    ``n_a = max(1, ceil(f * causal_a))`` of the remaining causal blocks, picked at run time by
    block log-sum-exp of the mean query (``dam.runtime.planner``), not by mass. We assume that selector needs ``rho = overselect`` times the blocks
    a mass-ranked oracle needs, and credit the larger of two conservative gains for ``n_a / rho``
    blocks: (1) the heaviest remaining blocks of the calibration *mean* map (a fixed,
    content-agnostic choice); (2) a lower bound for a per-input oracle: the per-input top-m mass
    curve is concave and passes through (count_p, p) for the profile's ``topp`` counts at
    p = 0.90/0.95/0.99, so ``S_a`` static blocks plus ``n_a / rho`` chosen blocks hold at least
    ``curve(|S_a| + n_a / rho)`` of the row (counts scaled up for rows longer than average).
    """
    captured, _ = row_recall(weights, mask, dynamic_fraction, topp, overselect)
    return float(captured.sum())


def row_recall(
    weights: np.ndarray, mask: np.ndarray, dynamic_fraction: float, topp: np.ndarray,
    overselect: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query block: (captured mass, total mass), float64 ``[nB]`` each (see estimate_recall)."""
    w = np.where(mask, weights, 0.0)
    nb_q, nb_k = weights.shape
    row_a = np.where(_causal_square(nb_q), weights, 0.0).sum(1)
    if dynamic_fraction <= 0:
        return w.sum(1), row_a
    causal = _causal_square(nb_q)
    causal_a = causal.sum(1).astype(np.float64)
    kept_a = mask.sum(1).astype(np.float64)
    m_a = w.sum(1)
    budget = np.maximum(np.ceil(dynamic_fraction * causal_a), 1.0)
    n_a = np.minimum(budget, causal_a - kept_a) / overselect
    # (1) heaviest remaining blocks of the mean map
    rem = np.where(causal & ~mask, weights, 0.0)
    srt = -np.sort(-rem, axis=1)
    cum = np.concatenate([np.zeros((nb_q, 1)), np.cumsum(srt, 1)], 1)
    k = np.floor(n_a).astype(np.int64)
    frac = n_a - k
    nxt = np.take_along_axis(cum, np.minimum(k + 1, nb_k)[:, None], 1)[:, 0]
    cur = np.take_along_axis(cum, k[:, None], 1)[:, 0]
    gain_fixed = cur + frac * (nxt - cur)
    # (2) lower bound on a per-input oracle from the concave top-m curve
    scale = np.maximum(1.0, causal_a / max(causal_a.mean(), 1.0))
    xs = [np.zeros_like(causal_a)]
    for c in topp:
        xs.append(np.minimum(np.maximum(float(c), 1.0) * scale, causal_a))
    xs.append(causal_a)
    xs = np.maximum.accumulate(np.stack(xs, 1), axis=1)
    ys = np.array((0.0, *TOPP_LEVELS, 1.0))
    m = kept_a + n_a
    p = np.zeros_like(m)
    for s in range(len(ys) - 1):
        x0, x1 = xs[:, s], xs[:, s + 1]
        span = np.maximum(x1 - x0, 1e-12)
        t = np.clip((m - x0) / span, 0.0, 1.0)
        seg = (m > x0) & (x1 > x0)
        p = np.where(seg, ys[s] + t * (ys[s + 1] - ys[s]), p)
    p = np.where(m >= causal_a, 1.0, p)
    gain_oracle = np.maximum(row_a * p - m_a, 0.0)
    gain = np.minimum(np.maximum(gain_fixed, gain_oracle), np.maximum(row_a - m_a, 0.0))
    return m_a + gain, row_a


def length_recall(captured: np.ndarray, row_mass: np.ndarray, length: int, block_size: int,
                  target_length: int) -> float:
    """Estimated recall at ``target_length`` from per-query-block recall measured at ``length``.

    Attention is causal, so query block ``a`` of a longer sequence sees exactly what it saw in
    the profile: the first ``length`` tokens' rows are measured. Rows beyond are extrapolated:
    the missed fraction ``u(a) = 1 - recall(a)`` is fitted as ``alpha + beta * log(a + 1)`` on the
    last three quarters of the measured rows (``beta`` clipped at >= 0: never assume a program
    gets better with distance) and never below the mean of the last half of those rows.
    """
    B = block_size
    r = np.where(row_mass > 0, captured / np.maximum(row_mass, 1e-300), 1.0)
    nb = r.shape[0]
    q = np.full(nb, float(B))
    q[-1] = length - B * (nb - 1)
    if target_length <= length:
        nbt = -(-target_length // B)
        qt = q[:nbt].copy()
        qt[-1] = target_length - B * (nbt - 1)
        return float((r[:nbt] * qt).sum() / target_length)
    lo = max(1, nb // 4)
    u = 1.0 - r[lo:]
    x = np.log(np.arange(lo, nb) + 1.0)
    if u.size >= 2 and np.ptp(x) > 0:
        beta, alpha = np.polyfit(x, u, 1)
    else:
        beta, alpha = 0.0, float(u.mean()) if u.size else 0.0
    beta = max(float(beta), 0.0)
    floor = float(u[-max(1, u.size // 2):].mean()) if u.size else 0.0
    nbt = -(-target_length // B)
    a2 = np.arange(nb, nbt)
    u2 = np.clip(alpha + beta * np.log(a2 + 1.0), floor, 1.0)
    q2 = np.full(a2.size, float(B))
    q2[-1] = target_length - B * (nbt - 1)
    return float(((r * q).sum() + ((1.0 - u2) * q2).sum()) / target_length)


@lru_cache(maxsize=64)
def _causal_square(nb: int) -> np.ndarray:
    m = np.tril(np.ones((nb, nb), bool))
    m.setflags(write=False)
    return m


# ----------------------------------------------------------------------------------------
def _head_candidates(stats: HeadStats, params: FitParams):
    """All candidate components for one head and their block masks at N (bool [C, nB, nB])."""
    n, B = stats.length, stats.block_size
    nb = -(-n // B)
    comps, masks = _shared_candidates(n, B)
    comps = list(comps)
    if params.max_sink is not None or not params.block_slashes:
        cap = n if params.max_sink is None else params.max_sink
        keep = np.array([(k != "sink" or v <= cap) and (k != "slash" or params.block_slashes)
                         for k, v in comps], bool)
        comps = [c for c, ok in zip(comps, keep, strict=True) if ok]
        masks = masks[keep]
    extra: list[tuple[str, int]] = []
    if params.max_slashes > 0:
        d = stats.diag_mass.copy()
        d[0] = 0.0
        top = np.argsort(-d, kind="stable")[: 2 * params.max_slashes]
        extra += [("slash", int(o)) for o in top if d[o] > 0 and o % B != 0]
    if params.max_verticals > 0:
        col = stats.col_mass
        for b in range(1, nb):
            seg = col[b * B:(b + 1) * B]
            if seg.size and seg.max() > 0:
                extra.append(("vertical", int(b * B + int(np.argmax(seg)))))
    if extra:
        emasks = np.stack([_component_mask(c, n, B) for c in extra])
        masks = np.concatenate([masks, emasks])
    return comps + extra, masks


def _greedy_order(stats: HeadStats, params: FitParams):
    """The greedy component order and the union mask after each prefix."""
    n, B = stats.length, stats.block_size
    causal, diag = _geometry(n, B)
    comps, masks = _head_candidates(stats, params)
    Wm = np.where(causal, stats.block_mass, 0.0)
    nbq = Wm.shape[0]
    # the last quarter of query blocks stands in for the rows beyond N at the target length
    omega = np.ones(nbq)
    nbt = -(-params.target_length // B)
    if nbt > nbq:
        tail = max(1, nbq // 4)
        omega[-tail:] += (nbt - nbq) / tail
    W = (Wm * omega[:, None]).ravel()
    C = len(comps)
    flat = masks.reshape(C, -1).astype(np.float32) if C else np.zeros((0, W.size), np.float32)
    cur = diag.ravel().copy()
    total_causal = causal.sum()
    kinds = np.array([k for k, _ in comps])
    alive = np.ones(C, bool)
    order: list[int] = []
    prefixes = [cur.copy()]
    n_slash = n_vert = 0
    for _ in range(4 * (params.max_slashes + params.max_verticals) + 2 * (-(-n // B)) + 4):
        rec = target_recall(stats, params, cur.reshape(nbq, -1), 0.0)
        if rec >= params.recall or cur.sum() > params.max_density * total_causal or not alive.any():
            break
        free = (~cur).astype(np.float32)
        gain = flat @ (W * free).astype(np.float32)
        cost = flat @ (free * causal.ravel())
        ratio = np.where(alive & (cost > 0) & (gain > 0), gain / np.maximum(cost, 1), -1.0)
        pick = int(np.argmax(ratio))
        if ratio[pick] <= 0:
            break
        order.append(pick)
        cur = cur | masks[pick].ravel()
        prefixes.append(cur.copy())
        if kinds[pick] == "slash":
            n_slash += 1
            if n_slash >= params.max_slashes:
                alive &= kinds != "slash"
        elif kinds[pick] == "vertical":
            n_vert += 1
            if n_vert >= params.max_verticals:
                alive &= kinds != "vertical"
        alive[pick] = False
    return comps, masks, order, prefixes


def fit_head(stats: HeadStats, params: FitParams) -> HeadFit:
    """The cheapest program (blocks at ``params.target_length``) meeting ``params.recall``.

    Falls back to the dense program when nothing within ``params.max_density`` meets it.
    """
    return _select(stats, params, _greedy_order(stats, params), params.recall)


def fit_head_frontier(stats: HeadStats, params: FitParams, targets: tuple[float, ...]) -> list[HeadFit]:
    """``fit_head`` at every recall target of ``targets`` (one greedy order, built up to the
    highest target), plus the dense program: the head's recall-vs-density trade-off curve, from
    which :func:`allocate_global` picks one point per head."""
    top = max(targets)
    greedy = _greedy_order(stats, replace(params, recall=top))
    fits = [_select(stats, params, greedy, r) for r in sorted(set(targets))]
    return [*fits, _dense_fit(stats, params)]


def _select(stats: HeadStats, params: FitParams, greedy, recall: float) -> HeadFit:
    """The cheapest (greedy prefix, dynamic fraction) meeting ``recall``, pruned; dense if none."""
    n, B, T = stats.length, stats.block_size, params.target_length
    causal, diag = _geometry(n, B)
    comps, masks, order, prefixes = greedy
    grid = DYNAMIC_GRID if params.use_dynamic else (0.0,)
    nbq = causal.shape[0]
    n_causal = float(causal.sum())

    def est(mask_flat: np.ndarray, f: float) -> float:
        return target_recall(stats, params, mask_flat.reshape(nbq, -1), f)

    options: list[tuple[float, float, int]] = []  # (density at T, f, prefix length)
    for f in grid:
        # first prefix meeting the target: a linear scan, because the estimate at the target
        # length extrapolates a slope and is not monotone in the prefix
        lo = None
        for t, pm in enumerate(prefixes):
            if pm.sum() / n_causal + 0.9 * f > params.max_density:
                break  # this and every longer prefix exceeds the cap at N
            if est(pm, f) >= recall:
                lo = t
                break
        if lo is None:
            continue
        prog = compose([comps[i] for i in order[:lo]], f)
        if prog.density(n, n, B) <= params.max_density:  # what the head needs where we saw it
            options.append((prog.density(T, T, B), f, lo))
    if not options:
        return _dense_fit(stats, params)
    options.sort()
    _, f, t = options[0]
    chosen = [order[i] for i in range(t)]
    # prune components the target no longer needs (latest first: early picks carry most mass)
    for idx in list(reversed(chosen)):
        rest = [c for c in chosen if c != idx]
        m = diag.ravel().copy()
        for c in rest:
            m |= masks[c].ravel()
        if est(m, f) >= recall:
            chosen = rest
    prog = compose([comps[i] for i in chosen], f)
    return evaluate_program(prog, stats, replace(params, recall=recall), dense_if_over=True)


def allocate_global(frontiers: list[list[HeadFit]], mean_recall: float, floor: float = 0.0) -> list[HeadFit]:
    """One point per head minimising the mean density subject to a *mean* estimated recall (at the
    target length) of at least ``mean_recall``, every head at least ``floor``.

    The Lagrangian relaxation: for a price ``lam`` on density each head takes the point of its
    curve maximising ``recall_at_target - lam * density``; ``lam`` is bisected to the largest
    price whose choice still meets the mean. Heads with a cheap, high-recall curve (local heads)
    end up above the target, diffuse heads below it: at equal density this keeps more attention
    mass than one target for every head (which is :func:`fit_head`).
    """
    if not frontiers:
        return []
    if not 0.0 < mean_recall <= 1.0 or not 0.0 <= floor <= mean_recall:
        raise ArtifactError(f"need 0 <= floor <= mean_recall <= 1, got floor {floor}, mean {mean_recall}")
    pts = []
    for fr in frontiers:
        ok = [f for f in fr if f.recall_at_target >= floor - 1e-12] or [max(fr, key=lambda f: f.recall_at_target)]
        pts.append((np.array([f.recall_at_target for f in ok]), np.array([f.density for f in ok]), ok))

    def choose(lam: float) -> tuple[list[int], float]:
        idx = [int(np.argmax(r - lam * d - 1e-9 * d)) for r, d, _ in pts]
        return idx, float(np.mean([r[i] for (r, _, _), i in zip(pts, idx, strict=True)]))

    lo, hi = 0.0, 1.0
    while choose(hi)[1] >= mean_recall and hi < 1e6:
        lo, hi = hi, hi * 4.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if choose(mid)[1] >= mean_recall:
            lo = mid
        else:
            hi = mid
    idx, _ = choose(lo)
    return [ok[i] for (_, _, ok), i in zip(pts, idx, strict=True)]


def target_recall(stats: HeadStats, params: FitParams, mask: np.ndarray, f: float) -> float:
    """Estimated recall at ``params.target_length`` of block mask ``mask`` [nB, nB] (at N) plus
    dynamic fraction ``f`` (``row_recall`` then ``length_recall``)."""
    causal, _ = _geometry(stats.length, stats.block_size)
    W = np.where(causal, stats.block_mass, 0.0)
    cap, row = row_recall(W, mask, f, stats.topp, params.dynamic_overselect)
    return length_recall(cap, row, stats.length, stats.block_size, params.target_length)


def _dense_fit(stats: HeadStats, params: FitParams) -> HeadFit:
    return HeadFit(MaskProgram(dense=True), 1.0, 1.0, 1.0, 1.0)


def evaluate_program(
    prog: MaskProgram, stats: HeadStats, params: FitParams, dense_if_over: bool = False,
) -> HeadFit:
    """Recall (block_mass at N, dynamic estimated) and density (at T) of a program on a head."""
    n, B, T = stats.length, stats.block_size, params.target_length
    if prog.dense:
        return _dense_fit(stats, params)
    causal, _ = _geometry(n, B)
    W = np.where(causal, stats.block_mass, 0.0)
    mask = prog.block_mask(n, n, B)
    static = float(W[mask].sum())
    cap, row = row_recall(W, mask, prog.dynamic_fraction, stats.topp, params.dynamic_overselect)
    rec = float(cap.sum())
    rec_t = length_recall(cap, row, n, B, T)
    dens = prog.density(T, T, B)
    too_dense = max(dens, prog.density(n, n, B)) > params.max_density
    if dense_if_over and (too_dense or rec_t < params.recall):
        return _dense_fit(stats, params)
    return HeadFit(prog, min(rec, 1.0), min(static, 1.0), dens, min(rec_t, 1.0))


def capture_recall(prog: MaskProgram, attn_mean: np.ndarray, block_size: int, topp: np.ndarray,
                   overselect: float) -> float:
    """Recall on the exact mean map ``attn_mean`` float64 ``[P, P]`` at block granularity.

    Static blocks are exact; the dynamic budget uses the estimator of ``estimate_recall``.
    """
    P = attn_mean.shape[0]
    if prog.dense:
        return 1.0
    pooled = pool_blocks(np.tril(attn_mean), block_size) / max(P, 1)
    mask = prog.block_mask(P, P, block_size)
    return min(estimate_recall(pooled, mask, prog.dynamic_fraction, topp, overselect), 1.0)


def pool_blocks(a: np.ndarray, B: int) -> np.ndarray:
    """Sum-pool the last two dims of ``a`` ``[..., n, m]`` into ``[..., ceil(n/B), ceil(m/B)]``."""
    n, m = a.shape[-2:]
    nb, mb = -(-n // B), -(-m // B)
    pad = np.zeros((*a.shape[:-2], nb * B, mb * B), a.dtype)
    pad[..., :n, :m] = a
    return pad.reshape(*a.shape[:-2], nb, B, mb, B).sum((-3, -1))


# ----------------------------------------------------------------------------------------
def fit_head_dam_paper(attn_mean: np.ndarray, tau: float, mu: float, lam: float = 0.5) -> MaskProgram:
    """The seed paper's pattern matching on one head's mean map ``attn_mean`` ``[P, P]``.

    Box-Cox (``lam``) of the causal probabilities, min-max normalised per query row, thresholded
    at ``tau``; diagonal patterns ``j = i - r`` and vertical patterns ``j = c`` are kept when
    their coverage (fraction of their causal cells above the threshold) is at least ``mu``.
    Kept diagonals ``0..w-1`` form the window, the rest slashes; kept columns ``0..s-1`` form
    the sink, the rest verticals.
    """
    if not (0.0 <= tau <= 1.0) or not (0.0 < mu <= 1.0):
        raise ArtifactError(f"dam-paper needs tau in [0, 1] and mu in (0, 1], got {tau}, {mu}")
    P = attn_mean.shape[0]
    tri = np.tril(np.ones((P, P), bool))
    x = np.clip(attn_mean, 0.0, None)
    y = (np.power(x, lam) - 1.0) / lam if lam != 0 else np.log(np.maximum(x, 1e-30))
    lo = np.where(tri, y, np.inf).min(1, keepdims=True)
    hi = np.where(tri, y, -np.inf).max(1, keepdims=True)
    span = hi - lo
    z = np.where(span > 0, (y - lo) / np.where(span > 0, span, 1.0), 1.0)
    on = (z >= tau) & tri
    rows = np.arange(P)
    # diagonal r: cells (i, i - r) for i >= r ; vertical c: cells (i, c) for i >= c. Patterns
    # with fewer than P/8 cells (the far corner) are too short to judge and are not in the pool.
    span_max = max(1, P - max(1, P // 8) + 1)
    diag_cov = np.array([on[rows[r:], rows[r:] - r].mean() for r in range(span_max)])
    col_cov = on.sum(0)[:span_max] / (P - rows[:span_max])
    keep_d = np.flatnonzero(diag_cov >= mu)
    keep_c = np.flatnonzero(col_cov >= mu)
    window = _run_from_zero(keep_d)
    sink = _run_from_zero(keep_c)
    return MaskProgram(
        sink=sink, window=window,
        slashes=tuple(int(r) for r in keep_d if r >= window),
        verticals=tuple(int(c) for c in keep_c if c >= sink),
    )


def _run_from_zero(idx: np.ndarray) -> int:
    run = 0
    for v in idx:
        if v != run:
            break
        run += 1
    return run


__all__ = [
    "DYNAMIC_GRID", "RECALL_LADDER", "FitParams", "HeadFit", "HeadStats", "allocate_global", "capture_recall",
    "compose", "fit_head_frontier",
    "estimate_recall", "evaluate_program", "fit_head", "fit_head_dam_paper", "length_recall",
    "pool_blocks", "row_recall", "target_recall",
]
