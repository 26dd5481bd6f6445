"""Evaluating an artifact on a (held-out) profile, and oracle densities to compare against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .artifact import Artifact
from .fit import TOPP_LEVELS, estimate_recall
from .ir import ArtifactError
from .profile import Profile


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Per-head figures of an artifact on a profile at the profile's length N (float64 [L, H]).

    recall: static blocks plus the dynamic estimate (``fit.estimate_recall``).
    static_recall: static blocks only.  density: kept fraction of causal blocks (dynamic incl.).
    oracle_topp: density a per-input, per-query-block oracle needs for ``recall.mean()``
        (interpolated from ``topp_blocks``).  oracle_mean: density of the heaviest blocks of the
        *mean* map reaching ``recall.mean()`` (the best static block mask).
    """

    recall: np.ndarray
    static_recall: np.ndarray
    density: np.ndarray
    oracle_topp: np.ndarray
    oracle_mean: np.ndarray
    length: int
    block_size: int


def oracle_density(block_mass: np.ndarray, recall: float) -> float:
    """Fewest blocks (heaviest first) of one map ``[nB, nB]`` holding ``recall`` of its mass,
    as a fraction of the causal blocks (interpolated within the last block)."""
    nb = block_mass.shape[0]
    causal = np.tril(np.ones((nb, nb), bool))
    w = np.sort(block_mass[causal])[::-1]
    total = w.sum()
    if total <= 0:
        return 0.0
    c = np.cumsum(w) / total
    k = int(np.searchsorted(c, recall - 1e-12))
    if k >= len(w):
        return 1.0
    prev = c[k - 1] if k else 0.0
    frac = (recall - prev) / max(c[k] - prev, 1e-300)
    return float((k + min(max(frac, 0.0), 1.0)) / causal.sum())


def topp_oracle_density(topp: np.ndarray, nb: int, recall: float) -> float:
    """Per-input, per-query-block oracle density at ``recall`` from the mean top-p counts."""
    nbar = (nb + 1) / 2.0  # mean causal blocks per query block (aligned, q_len = kv_len)
    xs = np.maximum.accumulate(np.array([0.0, *np.minimum(topp, nbar), nbar]))
    ys = np.array([0.0, *TOPP_LEVELS, 1.0])
    return float(np.interp(recall, ys, xs) / nbar)


def evaluate_artifact(art: Artifact, prof: Profile, overselect: float | None = None) -> Evaluation:
    """The artifact's programs scored on ``prof`` (its length and block size)."""
    L, H = prof.num_layers, prof.num_heads
    if (art.num_layers, art.num_heads) != (L, H):
        raise ArtifactError(
            f"artifact is {art.num_layers} x {art.num_heads} heads but the profile is {L} x {H}"
        )
    if overselect is None:
        overselect = float((art.metadata.get("compile", {}) or {}).get("dynamic_overselect", 2.0))
    N, B = prof.length, prof.block_size
    nb = -(-N // B)
    causal = np.tril(np.ones((nb, nb), bool))
    rec = np.zeros((L, H))
    srec = np.zeros((L, H))
    dens = np.zeros((L, H))
    masks: dict = {}
    dcache: dict = {}
    for layer in range(L):
        for h in range(H):
            p = art.program_for(layer, h)
            W = np.where(causal, prof.block_mass[layer, h], 0.0)
            total = max(W.sum(), 1e-300)
            if p.dense:
                rec[layer, h] = srec[layer, h] = dens[layer, h] = 1.0
                continue
            if p not in masks:
                masks[p] = p.block_mask(N, N, B)
                dcache[p] = p.density(N, N, B)
            m = masks[p]
            srec[layer, h] = W[m].sum() / total
            rec[layer, h] = min(estimate_recall(W / total, m, p.dynamic_fraction,
                                                prof.topp_blocks[layer, h], overselect), 1.0)
            dens[layer, h] = dcache[p]
    r = float(rec.mean())
    o_topp = np.array([[topp_oracle_density(prof.topp_blocks[layer, h], nb, r) for h in range(H)]
                       for layer in range(L)])
    o_mean = np.array([[oracle_density(prof.block_mass[layer, h], r) for h in range(H)]
                       for layer in range(L)])
    return Evaluation(rec, srec, dens, o_topp, o_mean, N, B)


def format_evaluation(ev: Evaluation) -> str:
    L = ev.recall.shape[0]
    lines = [
        f"on the profile (length {ev.length}, block {ev.block_size}): mean recall "
        f"{ev.recall.mean():.4f} (static {ev.static_recall.mean():.4f}, min {ev.recall.min():.4f}), "
        f"mean density {ev.density.mean():.4f}; oracle at equal recall: per-input "
        f"{ev.oracle_topp.mean():.4f}, mean-map {ev.oracle_mean.mean():.4f}",
        "layer  recall(min/mean)  static  density  oracle(per-input)",
    ]
    for layer in range(L):
        lines.append(
            f"{layer:5d}  {ev.recall[layer].min():6.4f}/{ev.recall[layer].mean():6.4f}  "
            f"{ev.static_recall[layer].mean():6.4f}  {ev.density[layer].mean():7.4f}  "
            f"{ev.oracle_topp[layer].mean():7.4f}"
        )
    return "\n".join(lines)


__all__ = ["Evaluation", "evaluate_artifact", "format_evaluation", "oracle_density",
           "topp_oracle_density"]
