"""Sharing programs between heads: KV groups and scikit-learn clustering.

A *unit* is a list of heads that must share one program. A shared program is the cheaper of
(a) a refit on the members' pooled statistics and (b) the covering program (union of the
members' programs: max sink, max window, all slashes and verticals, max dynamic fraction), and is
accepted only when *every member* still meets the recall target with it; otherwise, or when it
would keep more than ``max_density``, the unit goes dense.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import numpy as np

from .fit import FitParams, HeadFit, HeadStats, evaluate_program, fit_head
from .ir import MaskProgram

log = logging.getLogger(__name__)

Head = tuple[int, int]


def union_program(progs: list[MaskProgram]) -> MaskProgram:
    """The covering program: keeps every block any of ``progs`` keeps (dynamic: the max)."""
    if any(p.dense for p in progs):
        return MaskProgram(dense=True)
    return MaskProgram(
        sink=max(p.sink for p in progs),
        window=max(p.window for p in progs),
        slashes=tuple(s for p in progs for s in p.slashes),
        verticals=tuple(v for p in progs for v in p.verticals),
        dynamic_fraction=max(p.dynamic_fraction for p in progs),
    )


def shared_program(
    members: list[Head], stats: dict[Head, HeadStats], fits: dict[Head, HeadFit], params: FitParams,
) -> MaskProgram:
    """One program for all ``members`` that meets the target on each (or dense)."""
    progs = [fits[h].program for h in members]
    if any(p.dense for p in progs):
        return MaskProgram(dense=True)
    if len(set(progs)) == 1:
        return progs[0]
    cands = [union_program(progs)]
    pooled = fit_head(HeadStats.pooled([stats[h] for h in members]), params).program
    if not pooled.dense:
        cands.insert(0, pooled)
    best: tuple[float, MaskProgram] | None = None
    for prog in cands:
        evals = [evaluate_program(prog, stats[h], params) for h in members]
        if all(e.recall_at_target >= params.recall - 1e-9 for e in evals):
            dens = evals[0].density
            n, B = stats[members[0]].length, stats[members[0]].block_size
            fits_cap = max(dens, prog.density(n, n, B)) <= params.max_density
            if fits_cap and (best is None or dens < best[0]):
                best = (dens, prog)
    return best[1] if best else MaskProgram(dense=True)


def head_features(s: HeadStats) -> np.ndarray:
    """Normalised statistics of a head: sqrt mass per block offset and per key block (L2 each)."""
    B, n = s.block_size, s.length
    nb = -(-n // B)
    pad = np.zeros(nb * B)
    pad[:n] = s.diag_mass
    diag = np.sqrt(np.maximum(pad.reshape(nb, B).sum(1), 0))
    pad[:n] = s.col_mass
    col = np.sqrt(np.maximum(pad.reshape(nb, B).sum(1), 0))
    parts = [v / max(np.linalg.norm(v), 1e-12) for v in (diag, col)]
    return np.concatenate(parts)


def cluster_units(
    units: list[list[Head]], k: int, stats: dict[Head, HeadStats], seed: int,
) -> list[list[Head]]:
    """Group the units into at most ``k`` clusters (KMeans on mean head features)."""
    if k >= len(units):
        return [list(u) for u in units]
    from sklearn.cluster import KMeans

    X = np.stack([np.mean([head_features(stats[h]) for h in u], 0) for u in units])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer distinct points than k is fine
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(X)
    groups: dict[int, list[Head]] = {}
    for lab, u in zip(labels, units, strict=True):
        groups.setdefault(int(lab), []).extend(u)
    return [sorted(g) for _, g in sorted(groups.items(), key=lambda kv: min(kv[1]))]


def assign(
    groups: list[list[Head]], stats: dict[Head, HeadStats], fits: dict[Head, HeadFit],
    params: FitParams,
) -> dict[Head, MaskProgram]:
    out: dict[Head, MaskProgram] = {}
    for g in groups:
        prog = shared_program(g, stats, fits, params)
        for h in g:
            out[h] = prog
    return out


def mean_density(assignment: dict[Head, MaskProgram], params: FitParams, block_size: int) -> float:
    T = params.target_length
    cache: dict[MaskProgram, float] = {}
    vals = []
    for p in assignment.values():
        if p not in cache:
            cache[p] = p.density(T, T, block_size)
        vals.append(cache[p])
    return float(np.mean(vals))


def cluster_assignment(
    base: dict[Head, MaskProgram], stats: dict[Head, HeadStats], params: FitParams,
    units: list[list[Head]], clusters: int | str, seed: int, block_size: int,
    on_step: Callable[[str], None] | None = None,
) -> tuple[dict[Head, MaskProgram], int]:
    """Cluster the non-dense units into K programs (``"auto"``: the smallest K whose mean density
    stays within 0.01 of ``base``'s, found by doubling then bisection). Returns (assignment, K)."""
    fits = {h: evaluate_program(p, stats[h], params) for h, p in base.items()}
    sparse = [u for u in units if not base[u[0]].dense]
    dense_units = [u for u in units if base[u[0]].dense]

    def run(k: int) -> dict[Head, MaskProgram]:
        groups = cluster_units(sparse, k, stats, seed) + dense_units
        out = assign(groups, stats, fits, params)
        if on_step:
            on_step(f"clusters={k}")
        return out

    if not sparse:
        return dict(base), 1 if dense_units else 0
    if clusters != "auto":
        k = int(clusters)
        res = run(k)
        return res, len({p for p in res.values()})
    ref = mean_density(base, params, block_size)
    tried: dict[int, tuple[float, dict[Head, MaskProgram]]] = {}

    def ok(k: int) -> bool:
        if k not in tried:
            res = run(k)
            tried[k] = (mean_density(res, params, block_size), res)
            log.info("clusters=%d: mean density %.4f (unclustered %.4f)", k, tried[k][0], ref)
        return tried[k][0] <= ref + 0.01 + 1e-12

    n = len(sparse)
    k, lo = 1, 0
    while k < n and not ok(k):
        lo, k = k, min(2 * k, n)
    hi = k
    if hi >= n and not ok(n):
        return dict(base), len(set(base.values()))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    res = tried[hi][1]
    return res, len(set(res.values()))
