"""``compile_profile``: profile store -> Artifact (fit every head, share, cluster, measure)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .artifact import SCHEMA, Artifact
from .cluster import Head, assign, cluster_assignment, mean_density
from .fit import (
    RECALL_LADDER,
    FitParams,
    HeadFit,
    HeadStats,
    allocate_global,
    capture_recall,
    evaluate_program,
    fit_head,
    fit_head_dam_paper,
    fit_head_frontier,
)
from .ir import (
    DEFAULT_LAST_QUERY,
    DEFAULT_RECALL,
    LAST_QUERY_QUERIES,
    ArtifactError,
    MaskProgram,
    check_block_size,
    check_fraction,
    check_positive_int,
)
from .profile import Profile, read_profile

log = logging.getLogger(__name__)

METHODS = ("recall", "dam-paper")

ALLOCATIONS = ("head", "global")
OBJECTIVES = ("auto", "mass", "error")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CompileConfig:
    """Flags of ``dam compile``.

    method: ``"recall"`` (cheapest program meeting ``recall``) or ``"dam-paper"``.
    recall: target attention-mass recall in (0, 1].
    target_length: the length whose kept-block count is minimised and reported (None: the
        profiled length N).
    max_density: a head whose cheapest program keeps more than this fraction is dense.
    clusters: None (no clustering), a positive int K, or ``"auto"``.
    share_kv_groups: heads sharing a KV head get one program.
    tau, mu: the dam-paper threshold (on the row-normalised Box-Cox map) and coverage.
    dynamic: allow dynamic budgets.  dynamic_overselect: rho of ``fit.estimate_recall``.
    max_slashes, max_verticals: caps per program.  seed: clustering seed.
    objective: what a program must recall: ``"mass"`` (attention mass, ``block_mass``),
        ``"error"`` (the value-aware weight ``block_err``: how much each block moves the head's
        output), ``"auto"`` (error when the store has it). The artifact's ``recall`` figures are
        attention-mass recall either way.
    allocate: ``"head"`` (every head meets ``recall``) or ``"global"`` (the *mean* over heads
        meets ``recall`` at the least mean density, every head at least ``min_head_recall``;
        see ``fit.allocate_global``; ``--method recall`` only, no clustering or KV sharing).
    last_query: the runtime default written to ``metadata["runtime"]``: a budget of blocks the
        runtime estimates per input from the last queries' attention (verticals and slashes,
        ``dam.runtime.estimate``), added to every non-dense head as a fraction of its causal
        blocks (0: off; None: ``DEFAULT_LAST_QUERY`` for ``recall``, 0 for ``dam-paper``). The
        programs are fitted without it; ``figures`` add the density bound
        ``mean_density_with_last_query`` (each non-dense head ``min(1, density + last_query)``).
    last_query_queries: how many last queries the runtime estimate uses.
    """

    method: str = "recall"
    recall: float = DEFAULT_RECALL
    target_length: int | None = None
    max_density: float = 0.9
    clusters: int | str | None = None
    share_kv_groups: bool = False
    tau: float = 0.1
    mu: float = 0.5
    dynamic: bool = True
    dynamic_overselect: float = 2.0
    max_slashes: int = 16
    max_verticals: int = 16
    max_sink: int | None = None
    block_slashes: bool = True
    seed: int = 0
    allocate: str = "head"
    min_head_recall: float = 0.0
    objective: str = "auto"
    last_query: float | None = None
    last_query_queries: int = LAST_QUERY_QUERIES

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ArtifactError(f"unknown method {self.method!r}; use one of {METHODS}")
        if self.target_length is not None and self.target_length < 1:
            raise ArtifactError(f"target_length must be positive, got {self.target_length}")
        c = self.clusters
        if c is not None and c != "auto" and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ArtifactError(f"clusters must be a positive int or 'auto', got {c!r}")
        if not (0.0 <= self.tau <= 1.0) or not (0.0 < self.mu <= 1.0):
            raise ArtifactError(f"tau must lie in [0, 1] and mu in (0, 1], got {self.tau}, {self.mu}")
        if self.last_query is None:  # the recipe's budget; the seed paper's method has none
            object.__setattr__(self, "last_query", DEFAULT_LAST_QUERY if self.method == "recall" else 0.0)
        check_fraction(self.last_query, "last_query")
        check_positive_int(self.last_query_queries, "last_query_queries")
        if self.objective not in OBJECTIVES:
            raise ArtifactError(f"unknown objective {self.objective!r}; use one of {OBJECTIVES}")
        if self.allocate not in ALLOCATIONS:
            raise ArtifactError(f"unknown allocation {self.allocate!r}; use one of {ALLOCATIONS}")
        if self.allocate == "global":
            if self.method != "recall":
                raise ArtifactError("allocate='global' needs method='recall'")
            if self.clusters is not None or self.share_kv_groups:
                raise ArtifactError("allocate='global' cannot be combined with clusters or share_kv_groups "
                                    "(they re-fit shared programs to one per-head target)")
        if not 0.0 <= self.min_head_recall <= self.recall:
            raise ArtifactError(f"min_head_recall must lie in [0, recall], got {self.min_head_recall}")
        # the remaining ranges are checked by FitParams
        self.fit_params(1)

    def fit_params(self, profile_length: int) -> FitParams:
        return FitParams(
            recall=self.recall, target_length=self.target_length or profile_length,
            max_density=self.max_density, max_slashes=self.max_slashes,
            max_verticals=self.max_verticals, dynamic_overselect=self.dynamic_overselect,
            use_dynamic=self.dynamic, max_sink=self.max_sink, block_slashes=self.block_slashes,
        )


@dataclass(frozen=True)
class CompileResult:
    """The artifact plus what each stage cost (mean density over heads at the target length)."""

    artifact: Artifact
    density_per_head: float
    density_kv_shared: float | None
    density_clustered: float | None
    num_clusters: int | None
    extras: dict[str, Any] = field(default_factory=dict)


def head_stats(prof: Profile, layer: int, head: int, weights: np.ndarray | None = None) -> HeadStats:
    """One head's statistics; ``weights [L, H, nB, nB]`` replaces ``block_mass`` as what is recalled."""
    bm = prof.block_mass if weights is None else weights
    return HeadStats(bm[layer, head], prof.diag_mass[layer, head],
                     prof.col_mass[layer, head], prof.topp_blocks[layer, head], prof.block_size)


def resolve_objective(prof: Profile, objective: str) -> str:
    if objective == "auto":
        return "error" if prof.block_err is not None else "mass"
    if objective == "error" and prof.block_err is None:
        raise ArtifactError("objective 'error' needs a profile store with block_err (written by dam profile "
                            "since it records value-aware weights); re-profile, or use objective 'mass'")
    return objective


def error_weights(prof: Profile) -> np.ndarray:
    """``block_err`` rescaled so each query block's row holds that row's attention mass: per row,
    recalling a fraction of the weight means recalling that fraction of the row's output change
    bound, and the length extrapolation (which weighs rows by their mass) is unchanged."""
    E = np.asarray(prof.block_err, np.float64)
    rows = prof.block_mass.sum(-1, keepdims=True)
    tot = E.sum(-1, keepdims=True)
    return np.where(tot > 0, E / np.where(tot > 0, tot, 1.0) * rows, prof.block_mass)


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("dam-attention")
    except Exception:  # pragma: no cover - not installed
        return "0+unknown"


def compile_profile(
    profile: Profile | str, config: CompileConfig, progress: Progress | None = None,
) -> CompileResult:
    """Fit, share and cluster programs for every head of ``profile``; measure them.

    Returns the artifact (``recall [L, H]`` on block_mass at N, ``recall_capture [L, H]`` on
    attn_mean at P, ``density [L, H]`` at the target length) and the density cost of each stage.
    ``progress(done, total)`` is called as heads are fitted.
    """
    prof = read_profile(profile) if isinstance(profile, str) else profile
    L, H, B, N = prof.num_layers, prof.num_heads, prof.block_size, prof.length
    check_block_size(B, "the profile's block size (re-profile)")
    params = config.fit_params(N)
    sliding = set(sliding_layers(prof.model))  # not profiled, not fitted: their native window
    full_layers = [layer for layer in range(L) if layer not in sliding]
    heads: list[Head] = [(layer, h) for layer in full_layers for h in range(H)]
    objective = resolve_objective(prof, config.objective) if config.method == "recall" else "mass"
    stats = {(layer, h): head_stats(prof, layer, h) for layer, h in heads}  # mass: the figures
    weights = error_weights(prof) if objective == "error" else None
    fstats = stats if weights is None else {(layer, h): head_stats(prof, layer, h, weights) for layer, h in heads}
    total = len(heads) + 1
    fits: dict[Head, HeadFit] = {}
    ladder = tuple(sorted({*(r for r in RECALL_LADDER if r >= config.min_head_recall), config.recall}))
    frontiers: list[list[HeadFit]] = []
    for done_layers, layer in enumerate(full_layers):
        attn = prof.attn_mean(layer) if config.method == "dam-paper" else None
        for h in range(H):
            if attn is not None:
                prog = fit_head_dam_paper(attn[h], config.tau, config.mu)
                fits[(layer, h)] = evaluate_program(prog, stats[(layer, h)], params)
            elif config.allocate == "global":
                frontiers.append(fit_head_frontier(fstats[(layer, h)], params, ladder))
            else:
                fits[(layer, h)] = fit_head(fstats[(layer, h)], params)
            if progress:
                progress(done_layers * H + h + 1, total)
    if frontiers:
        fits = dict(zip(heads, allocate_global(frontiers, config.recall, config.min_head_recall), strict=True))
    base = {hd: f.program for hd, f in fits.items()}
    d_head = mean_density(base, params, B) if base else None  # None: every layer slides
    d_kv = d_cl = None
    n_clusters = None
    kv = prof.num_kv_heads
    if H % kv:
        raise ArtifactError(f"profile has {H} heads but {kv} KV heads (not a divisor)")
    units = [[hd] for hd in heads]
    if config.share_kv_groups and kv < H:
        r = H // kv
        units = [[(layer, g * r + i) for i in range(r)] for layer in full_layers for g in range(kv)]
        base = assign(units, fstats, fits, params)
        d_kv = mean_density(base, params, B)
    if config.clusters is not None:
        base, n_clusters = cluster_assignment(base, fstats, params, units, config.clusters,
                                              config.seed, B)
        d_cl = mean_density(base, params, B)
    base = _native_windows(prof, base)
    art = _build_artifact(prof, config, params, base, stats, d_head, d_kv, d_cl, n_clusters, objective)
    if progress:
        progress(total, total)
    return CompileResult(art, d_head, d_kv, d_cl, n_clusters)


def sliding_layers(model: dict) -> list[int]:
    """The sliding-window layers of a model fingerprint (``layer_types``; none when absent)."""
    return [i for i, t in enumerate(model.get("layer_types") or ()) if t == "sliding_attention"]


def _native_windows(prof: Profile, base: dict) -> dict:
    """Sliding-window layers are not guessed at: every head gets the layer's native window
    (``window = sliding_window``), which is what the model computes; the runtime runs those
    layers as exact banded attention."""
    layers = sliding_layers(prof.model)
    if not layers:
        return base
    win = MaskProgram(window=int(prof.model["sliding_window"]))
    out = dict(base)
    for layer in layers:
        for h in range(prof.num_heads):
            out[(layer, h)] = win
    return out


def _with_last_query(dens: np.ndarray, assignment: dict, last_query: float, sliding: list[int] = ()) -> float:
    """Mean density bound with the runtime's last-query budget added to every non-dense head
    (not to sliding-window layers: the runtime runs their exact band)."""
    extra = np.zeros_like(dens)
    for (layer, h), p in assignment.items():
        extra[layer, h] = 0.0 if p.dense or layer in sliding else last_query
    return float(np.minimum(1.0, dens + extra).mean())


def _build_artifact(prof, config, params, assignment, stats, d_head, d_kv, d_cl, n_clusters, objective):
    L, H, B = prof.num_layers, prof.num_heads, prof.block_size
    table: list[MaskProgram] = []
    index: dict[MaskProgram, int] = {}
    hp = np.zeros((L, H), np.int32)
    for layer in range(L):
        for h in range(H):
            p = assignment[(layer, h)]
            if p not in index:
                index[p] = len(table)
                table.append(p)
            hp[layer, h] = index[p]
    recall = np.zeros((L, H), np.float32)
    recall_p = np.zeros((L, H), np.float32)
    dens = np.zeros((L, H), np.float32)
    rec_t = np.zeros((L, H))
    dcache: dict[MaskProgram, float] = {}
    sliding = set(sliding_layers(prof.model))
    for layer in range(L):
        if layer in sliding:  # the model's own attention: recall 1 by construction
            recall[layer], recall_p[layer], rec_t[layer] = 1.0, 1.0, 1.0
            dens[layer] = assignment[(layer, 0)].density(params.target_length, params.target_length, B)
            continue
        attn = prof.attn_mean(layer)
        for h in range(H):
            p = assignment[(layer, h)]
            ev = evaluate_program(p, stats[(layer, h)], params)
            recall[layer, h] = ev.recall
            rec_t[layer, h] = ev.recall_at_target
            if p not in dcache:
                dcache[p] = ev.density
            dens[layer, h] = dcache[p]
            recall_p[layer, h] = capture_recall(p, attn[h], B, stats[(layer, h)].topp,
                                                params.dynamic_overselect)
    cfg = asdict(config)
    cfg["target_length"] = params.target_length
    cfg["objective"] = objective
    calib = dict(prof.attrs.get("calibration", {}) or {})
    figures = {
        "profile_length": prof.length,
        "capture_length": prof.capture_length,
        "target_length": params.target_length,
        "samples": prof.count,
        "num_programs": len(table),
        "num_clusters": n_clusters,
        "dense_heads": int(sum(p.dense for p in assignment.values())),
        "mean_density_per_head": None if d_head is None else round(float(d_head), 6),
        "mean_density_kv_shared": None if d_kv is None else round(float(d_kv), 6),
        "mean_density_clustered": None if d_cl is None else round(float(d_cl), 6),
        "mean_density": round(float(dens.mean()), 6),
        "mean_density_with_last_query": round(float(_with_last_query(dens, assignment, config.last_query,
                                                                     sliding_layers(prof.model))), 6),
        "sliding_layers": sliding_layers(prof.model),
        "min_recall": round(float(recall.min()), 6),
        "mean_recall": round(float(recall.mean()), 6),
        "mean_recall_capture": round(float(recall_p.mean()), 6),
        "mean_recall_at_target_estimate": round(float(rec_t.mean()), 6),
        "min_recall_at_target_estimate": round(float(rec_t.min()), 6),
    }
    meta = {
        "schema": SCHEMA,
        "model": prof.model,
        "calibration": calib,
        "profile": {k: prof.attrs.get(k) for k in ("schema", "dtype", "tool_version", "block_size")},
        "compile": cfg,
        "runtime": {"last_query": float(config.last_query), "last_query_queries": int(config.last_query_queries)},
        "figures": figures,
        "tool_version": _tool_version(),
    }
    return Artifact(tuple(table), hp, B, recall, dens, meta, recall_capture=recall_p)
