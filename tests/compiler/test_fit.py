"""Fitting on synthetic statistics whose optimal programs are known."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dam.compiler import ArtifactError, CompileConfig, MaskProgram, compile_profile, read_profile
from dam.compiler.compile import head_stats
from dam.compiler.fit import (
    FitParams,
    estimate_recall,
    evaluate_program,
    fit_head,
    fit_head_dam_paper,
    length_recall,
    pool_blocks,
    target_recall,
)

from . import synth
from .conftest import KNOWN, B, N, P

T = 4096
PARAMS = FitParams(recall=0.95, target_length=T, max_density=0.6)


@pytest.fixture(scope="module")
def prof(known_store):
    return read_profile(known_store)


def _fit(prof, h, params=PARAMS):
    return fit_head(head_stats(prof, 0, h), params)


def _static_recall(prof, h, prog):
    return float((prof.block_mass[0, h] * prog.block_mask(N, N, B)).sum())


def _brute_best_sink_window(prof, h, params):
    """Cheapest sink+window program (block multiples) meeting the fit's criterion (the recall
    estimated at the target length), by enumeration."""
    nb = N // B
    best = None
    st = head_stats(prof, 0, h)
    for s, w in itertools.product(range(nb), range(nb)):
        p = MaskProgram(sink=s * B, window=w * B)
        if target_recall(st, params, p.block_mask(N, N, B), 0.0) >= params.recall:
            d = p.density(params.target_length, params.target_length, B)
            best = d if best is None else min(best, d)
    return best


def test_sink_window_head_gets_optimal_sink_window(prof):
    fit = _fit(prof, 0)
    p = fit.program
    assert not p.dense and p.slashes == () and p.verticals == () and p.dynamic_fraction == 0
    assert p.sink >= 1 and p.window >= 1
    assert fit.recall >= 0.95 and math.isclose(fit.recall, _static_recall(prof, 0, p), rel_tol=1e-9)
    assert fit.recall_at_target >= 0.95
    assert fit.density <= _brute_best_sink_window(prof, 0, PARAMS) + 1e-12
    # at the profiled length the criterion is the measured recall itself
    at_n = FitParams(recall=0.95, target_length=N, max_density=0.6)
    fit_n = _fit(prof, 0, at_n)
    assert fit_n.recall_at_target == pytest.approx(fit_n.recall, rel=1e-9)
    assert fit_n.density <= _brute_best_sink_window(prof, 0, at_n) + 1e-12


def test_length_recall_extrapolation():
    nb = 16
    row = np.full(nb, 1.0 / nb)
    flat = 0.9 * row
    assert length_recall(flat, row, nb * B, B, 4 * nb * B) == pytest.approx(0.9)
    # recall falling with position falls further beyond the profiled length
    falling = row * (1.0 - 0.05 * np.log(np.arange(nb) + 1.0))
    at_n = length_recall(falling, row, nb * B, B, nb * B)
    assert at_n == pytest.approx(falling.sum() / row.sum())
    assert length_recall(falling, row, nb * B, B, 4 * nb * B) < at_n - 0.02
    # rising recall is never extrapolated upwards
    rising = row * np.linspace(0.5, 1.0, nb)
    assert length_recall(rising, row, nb * B, B, 8 * nb * B) <= 1.0
    assert length_recall(rising, row, nb * B, B, 8 * nb * B) <= rising[nb // 2:].sum() / row[nb // 2:].sum() + 1e-9
    # shorter target: the first rows only (exact, rows are causal)
    assert length_recall(falling, row, nb * B, B, 4 * B) == pytest.approx(falling[:4].sum() / row[:4].sum())


def test_length_invariant_head_keeps_its_program(tmp_path):
    path = synth.make_store(tmp_path / "sw.zarr", [[synth.sink_window(4, 200, eps=0.0)]],
                            n=N, B=B, P=P, samples=1)
    st = head_stats(read_profile(path), 0, 0)
    progs = {fit_head(st, FitParams(recall=0.95, target_length=t)).program for t in (N, 4 * N, 16 * N)}
    assert len(progs) == 1 and not next(iter(progs)).dense


def test_slash_head_finds_offset_300(prof):
    fit = _fit(prof, 1)
    p = fit.program
    assert not p.dense and p.dynamic_fraction == 0 and p.verticals == ()
    assert fit.static_recall >= 0.95
    # the blocks holding offset 300 are covered, and the cost is no more than the known optimum
    assert any(256 <= s < 384 for s in p.slashes)
    assert fit.density <= MaskProgram(slashes=(300,)).density(T, T, B) + 1e-12
    assert p.window < 256 and p.sink == 0


def test_vertical_head_finds_column_517(prof):
    fit = _fit(prof, 2)
    p = fit.program
    assert not p.dense and p.slashes == () and p.dynamic_fraction == 0
    assert any(512 <= c < 576 for c in p.verticals)
    assert fit.static_recall >= 0.95
    assert fit.density <= MaskProgram(verticals=(517,)).density(T, T, B) + 1e-12


def test_moving_blocks_need_the_dynamic_budget(prof):
    no_dyn = fit_head(head_stats(prof, 0, 3), FitParams(recall=0.95, target_length=T,
                                                         max_density=0.6, use_dynamic=False))
    assert no_dyn.program.dense  # no static program of density <= 0.6 reaches 0.95
    fit = _fit(prof, 3)
    assert not fit.program.dense and fit.program.dynamic_fraction > 0
    assert fit.recall >= 0.95 and fit.density <= 0.6
    assert fit.static_recall < 0.95  # the estimate, not the static blocks, carries the target


def test_diffuse_head_goes_dense(prof):
    fit = _fit(prof, 4)
    assert fit.program.dense and fit.recall == 1.0 and fit.density == 1.0


def test_max_density_forces_dense(prof):
    fit = _fit(prof, 0, FitParams(recall=0.95, target_length=T, max_density=0.01))
    assert fit.program.dense


def test_recall_target_is_met_or_dense_for_many_targets(prof):
    for target in (0.5, 0.8, 0.9, 0.99):
        for h in range(5):
            fit = _fit(prof, h, FitParams(recall=target, target_length=T, max_density=0.6))
            assert fit.program.dense or fit.recall >= target - 1e-12


def test_estimate_without_dynamic_is_exact_and_monotone():
    rng = np.random.default_rng(0)
    nb = 19
    w = np.tril(rng.random((nb, nb)))
    w /= w.sum()
    mask = np.tril(rng.random((nb, nb)) < 0.3) | np.eye(nb, dtype=bool)
    topp = np.array([3.0, 5.0, 9.0])
    assert math.isclose(estimate_recall(w, mask, 0.0, topp, 2.0), float(w[mask].sum()), rel_tol=1e-12)
    prev = 0.0
    for f in (0.0, 0.05, 0.1, 0.3, 0.6, 1.0):
        r = estimate_recall(w, mask, f, topp, 2.0)
        assert prev - 1e-12 <= r <= 1.0 + 1e-9
        prev = r
    # more static blocks never lower the estimate
    bigger = mask | (np.tril(rng.random((nb, nb))) < 0.2)
    assert estimate_recall(w, bigger, 0.1, topp, 2.0) >= estimate_recall(w, mask, 0.1, topp, 2.0) - 1e-12


def test_dynamic_estimate_is_below_a_per_input_oracle():
    """On content-dependent inputs the estimate must not exceed what a per-input oracle that picks
    ceil(budget / rho) heaviest remaining blocks per query block gets on average."""
    rng = np.random.default_rng(3)
    n, rho, f = 512, 2.0, 0.1
    nb = n // B
    gen = synth.moving_blocks(B)
    per = [synth.head_stats(gen(rng, n), B, 64) for _ in range(6)]
    mean_bm = np.mean([s["block_mass"] for s in per], 0)
    topp = np.mean([s["topp_blocks"] for s in per], 0)
    mask = MaskProgram(sink=B).block_mask(n, n, B)
    est = estimate_recall(mean_bm, mask, f, topp, rho)
    causal = np.tril(np.ones((nb, nb), bool))
    got = []
    for s in per:
        bm = s["block_mass"]
        rec = float(bm[mask].sum())
        for a in range(nb):
            budget = min(max(1, math.ceil(f * (a + 1))), int((causal[a] & ~mask[a]).sum()))
            rest = np.sort(bm[a][causal[a] & ~mask[a]])[::-1]
            rec += float(rest[: math.ceil(budget / rho)].sum())
        got.append(rec)
    assert est <= np.mean(got) + 1e-9


def test_dam_paper_recovers_sink_and_window():
    rng = np.random.default_rng(0)
    a = synth.sink_window(4, 100)(rng, 256)
    p = fit_head_dam_paper(a, tau=0.1, mu=0.5)
    assert (p.sink, p.window) == (4, 100) and not p.dense
    strict = fit_head_dam_paper(a, tau=0.1, mu=1.0)
    assert strict.window <= p.window
    with pytest.raises(ArtifactError):
        fit_head_dam_paper(a, tau=1.5, mu=0.5)


def test_pool_blocks_matches_loop():
    rng = np.random.default_rng(0)
    a = rng.random((97, 97))
    got = pool_blocks(a, 16)
    want = np.zeros((7, 7))
    for i in range(97):
        for j in range(97):
            want[i // 16, j // 16] += a[i, j]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_compile_figures_are_consistent(known_store, prof):
    res = compile_profile(known_store, CompileConfig(target_length=T, max_density=0.6))
    art = res.artifact
    assert art.recall.shape == (1, 5) and art.block_size == B
    for h in range(5):
        p = art.program_for(0, h)
        ev = evaluate_program(p, head_stats(prof, 0, h), PARAMS)
        assert math.isclose(art.recall[0, h], ev.recall, rel_tol=1e-6)
        assert math.isclose(art.density[0, h], p.density(T, T, B), rel_tol=1e-6)
        assert art.recall[0, h] >= 0.95 - 1e-6
        if not p.dynamic_fraction and not p.dense:  # capture recall is exact for static programs
            am = prof.attn_mean(0)[h]
            want = float((pool_blocks(np.tril(am), B) / P * p.block_mask(P, P, B)).sum())
            assert math.isclose(art.recall_capture[0, h], want, rel_tol=1e-5)
    assert art.metadata["figures"]["dense_heads"] == 1
    assert art.metadata["compile"]["target_length"] == T


def test_config_validation():
    for kw in ({"method": "magic"}, {"recall": 0.0}, {"recall": 1.5}, {"max_density": 0},
               {"clusters": 0}, {"clusters": "many"}, {"tau": 2.0}, {"mu": 0.0},
               {"target_length": 0}, {"dynamic_overselect": 0.5}, {"max_sink": -1}):
        with pytest.raises(ArtifactError):
            CompileConfig(**kw)


def test_positional_components_can_be_switched_off(prof):
    """max_verticals=0, max_sink and block_slashes=False leave only components that do not depend
    on where a calibration prompt put its content: windows, a small sink, slashes at offsets that
    are peaks of diag_mass, and the dynamic budget. The vertical head must then go dynamic (or
    dense), and every fit still meets the target by the compiler's own estimate."""
    params = FitParams(recall=0.95, target_length=T, max_density=0.6, max_verticals=0, max_sink=B,
                       block_slashes=False)
    for h in range(len(KNOWN)):
        fit = _fit(prof, h, params)
        p = fit.program
        assert p.verticals == () and p.sink <= B
        assert all(s % B for s in p.slashes)  # diag_mass peaks, never the generic k*B block slashes
        if not p.dense:
            assert fit.recall_at_target >= 0.95 - 1e-9
    v = _fit(prof, KNOWN.index("vertical517"), params).program
    assert v.dense or v.dynamic_fraction > 0
    s = _fit(prof, KNOWN.index("slash300"), params).program  # a real slash is still found
    assert not s.dense and any(abs(o - 300) < B for o in s.slashes)
