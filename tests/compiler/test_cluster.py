"""Sharing programs: every member of a cluster or KV group still meets its recall."""

from __future__ import annotations

import numpy as np
import pytest

from dam.compiler import CompileConfig, MaskProgram, compile_profile, read_profile
from dam.compiler.cluster import union_program
from dam.compiler.compile import head_stats
from dam.compiler.fit import FitParams, evaluate_program
from dam.compiler.ir import DEFAULT_RECALL

T = 4096


@pytest.fixture(scope="module")
def prof(gqa_store):
    return read_profile(gqa_store)


@pytest.fixture(scope="module")
def unclustered(prof):
    return compile_profile(prof, CompileConfig(target_length=T))


def _check_members(prof, art, target=DEFAULT_RECALL):
    params = FitParams(recall=target, target_length=T)
    for layer in range(prof.num_layers):
        for h in range(prof.num_heads):
            p = art.program_for(layer, h)
            ev = evaluate_program(p, head_stats(prof, layer, h), params)
            assert p.dense or ev.recall_at_target >= target - 1e-9, (layer, h, p, ev)
            assert abs(art.recall[layer, h] - ev.recall) < 1e-5


def test_union_program_covers_members():
    a = MaskProgram(sink=4, window=64, slashes=(300,), dynamic_fraction=0.05)
    b = MaskProgram(sink=64, verticals=(517,))
    u = union_program([a, b])
    for p in (a, b):
        assert not (p.block_mask(1000, 1000, 64) & ~u.block_mask(1000, 1000, 64)).any()
    assert u.dynamic_fraction == 0.05
    assert union_program([a, MaskProgram(dense=True)]).dense


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fixed_k_clusters_meet_recall(prof, unclustered, k):
    res = compile_profile(prof, CompileConfig(target_length=T, clusters=k))
    art = res.artifact
    sparse = {p for p in art.programs if not p.dense}
    assert len(sparse) <= k
    _check_members(prof, art)
    assert res.density_clustered >= unclustered.density_per_head - 1e-9
    assert res.density_per_head == pytest.approx(unclustered.density_per_head)


def test_auto_clusters_within_one_point(prof, unclustered):
    res = compile_profile(prof, CompileConfig(target_length=T, clusters="auto"))
    assert res.density_clustered <= unclustered.density_per_head + 0.01 + 1e-9
    assert res.num_clusters <= len(set(unclustered.artifact.programs))
    _check_members(prof, res.artifact)
    fig = res.artifact.metadata["figures"]
    assert fig["num_clusters"] == res.num_clusters
    assert fig["mean_density_clustered"] == pytest.approx(res.density_clustered, abs=1e-6)


def test_share_kv_groups(prof, unclustered):
    res = compile_profile(prof, CompileConfig(target_length=T, share_kv_groups=True))
    art = res.artifact
    r = prof.num_heads // prof.num_kv_heads
    assert r == 3
    for layer in range(prof.num_layers):
        idx = art.head_program[layer].reshape(-1, r)
        assert (idx == idx[:, :1]).all(), idx
    _check_members(prof, art)
    assert res.density_kv_shared >= unclustered.density_per_head - 1e-9
    # layer 1, group 1 holds a diffuse head: the whole group is dense
    assert all(art.program_for(1, h).dense for h in (3, 4, 5))


def test_share_kv_then_cluster(prof):
    res = compile_profile(prof, CompileConfig(target_length=T, share_kv_groups=True, clusters=2))
    art = res.artifact
    for layer in range(prof.num_layers):
        idx = art.head_program[layer].reshape(-1, 3)
        assert (idx == idx[:, :1]).all()
    _check_members(prof, art)
    assert np.isfinite(res.density_clustered)
