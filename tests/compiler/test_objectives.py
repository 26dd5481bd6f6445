"""--objective error (value-aware block weights) and --allocate global (a mean-recall budget)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from dam.compiler import ArtifactError, CompileConfig, MaskProgram, compile_profile, read_profile
from dam.compiler.compile import error_weights
from dam.compiler.fit import HeadFit, allocate_global

from .conftest import KNOWN


@pytest.fixture(scope="module")
def prof(known_store):
    return read_profile(known_store)


def _local_err(prof, reach: int = 1) -> np.ndarray:
    """block_err that lives only within ``reach`` blocks of the diagonal (values far away equal
    the head's output: dropping them changes nothing)."""
    nb = prof.block_mass.shape[-1]
    a, b = np.arange(nb)[:, None], np.arange(nb)[None, :]
    near = (a - b >= 0) & (a - b <= reach)
    return np.where(near, prof.block_mass + 1e-6, 0.0) * 3.7  # any scale: rows are renormalised


def test_error_weights_keep_row_mass(prof):
    p = dataclasses.replace(prof, block_err=_local_err(prof))
    w = error_weights(p)
    np.testing.assert_allclose(w.sum(-1), prof.block_mass.sum(-1), rtol=1e-12, atol=1e-15)
    assert (w >= 0).all()


def test_error_objective_fits_what_moves_the_output(prof):
    """A diffuse head whose far blocks carry mass but no output change: the mass objective makes
    it dense, the error objective keeps only the near blocks; auto picks error when present."""
    diffuse = KNOWN.index("diffuse")
    p = dataclasses.replace(prof, block_err=_local_err(prof))
    cfg = dict(recall=0.95, target_length=4096, max_density=0.6)
    mass = compile_profile(p, CompileConfig(objective="mass", **cfg)).artifact
    err = compile_profile(p, CompileConfig(objective="error", **cfg)).artifact
    auto = compile_profile(p, CompileConfig(**cfg)).artifact
    assert mass.programs[mass.head_program[0, diffuse]].dense
    prog = err.programs[err.head_program[0, diffuse]]
    assert not prog.dense and prog.density(4096, 4096, 64) < 0.1
    assert err.metadata["compile"]["objective"] == "error" and mass.metadata["compile"]["objective"] == "mass"
    assert auto.metadata["compile"]["objective"] == "error"
    # the artifact's recall figures stay attention-mass recall: the cheap program recalls little mass
    assert err.recall[0, diffuse] < 0.5 and mass.recall[0, diffuse] == 1.0


def test_error_objective_needs_block_err(prof):
    assert prof.block_err is None  # a store from before block_err
    with pytest.raises(ArtifactError, match="block_err"):
        compile_profile(prof, CompileConfig(objective="error"))
    assert compile_profile(prof, CompileConfig()).artifact.metadata["compile"]["objective"] == "mass"


def _fit(r: float, d: float) -> HeadFit:
    return HeadFit(MaskProgram(window=64), r, r, d, r)


def test_allocate_global_is_near_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    for _ in range(40):
        H = int(rng.integers(2, 5))
        fronts = []
        for _h in range(H):
            d = np.sort(rng.uniform(0.02, 0.9, int(rng.integers(2, 5))))
            r = np.sort(rng.uniform(0.3, 0.999, d.size))
            fronts.append([_fit(float(ri), float(di)) for ri, di in zip(r, d, strict=True)] + [_fit(1.0, 1.0)])
        target = float(rng.uniform(0.6, 0.98))
        floor = float(rng.uniform(0.0, 0.5))
        got = allocate_global(fronts, target, floor)
        assert np.mean([f.recall_at_target for f in got]) >= target - 1e-12
        assert all(f.recall_at_target >= floor or f.recall_at_target == max(x.recall_at_target for x in fr)
                   for f, fr in zip(got, fronts, strict=True))
        best = min(np.mean([f.density for f in combo]) for combo in itertools.product(*fronts)
                   if np.mean([f.recall_at_target for f in combo]) >= target
                   and all(f.recall_at_target >= floor for f in combo))
        # a Lagrangian choice is optimal up to one head's step (the duality gap of a separable problem)
        gap = max(max(f.density for f in fr) - min(f.density for f in fr) for fr in fronts) / H
        assert np.mean([f.density for f in got]) <= best + gap + 1e-12


@pytest.mark.slow
def test_allocate_global_compile(gqa_store):
    p = read_profile(gqa_store)
    per_head = compile_profile(p, CompileConfig(recall=0.9, target_length=4096)).artifact
    glob = compile_profile(p, CompileConfig(recall=0.9, target_length=4096, allocate="global")).artifact
    fh, fg = per_head.metadata["figures"], glob.metadata["figures"]
    assert fg["mean_recall_at_target_estimate"] >= 0.9 - 1e-9
    assert fh["min_recall_at_target_estimate"] >= 0.9 - 1e-9
    # the per-head solution is feasible for the global problem and recalls at least as much, so the
    # Lagrangian choice (optimal for the recall it reaches) can be no denser
    assert fh["mean_recall_at_target_estimate"] >= fg["mean_recall_at_target_estimate"]
    assert fg["mean_density"] <= fh["mean_density"] + 1e-6
    assert glob.metadata["compile"]["allocate"] == "global"


def test_allocate_global_refusals():
    with pytest.raises(ArtifactError, match="clusters"):
        CompileConfig(allocate="global", clusters=2)
    with pytest.raises(ArtifactError, match="method"):
        CompileConfig(allocate="global", method="dam-paper")
    with pytest.raises(ArtifactError, match="min_head_recall"):
        CompileConfig(recall=0.9, min_head_recall=0.95)
    with pytest.raises(ArtifactError, match="objective"):
        CompileConfig(objective="bogus")
