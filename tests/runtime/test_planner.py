"""Planner: equal to MaskProgram.block_mask (the definition) for every head; dynamic top-k."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dam.compiler import MaskProgram
from dam.runtime import DamRuntimeError, Planner, mask_to_layout, plan
from dam.runtime.planner import ProgramTable, static_block_mask

PROGRAMS = [
    MaskProgram(dense=True),
    MaskProgram(),  # diagonal blocks only
    MaskProgram(sink=1),
    MaskProgram(sink=17, window=1),
    MaskProgram(window=16),
    MaskProgram(window=33, slashes=(0, 5, 64)),
    MaskProgram(sink=4, slashes=(16, 31, 47)),
    MaskProgram(verticals=(0, 15, 16, 40, 99)),
    MaskProgram(sink=3, window=7, slashes=(20,), verticals=(50,)),
]


def _layout_mask(layout, kv_len):
    nkb = -(-kv_len // layout.block_n)
    return layout.block_mask(nkb).cpu().numpy()


@pytest.mark.slow
def test_exhaustive_small_sizes_equal_definition():
    B = 16
    for kv_len in range(1, 75):
        for q_len in range(1, kv_len + 1):
            layout = plan(PROGRAMS, q_len, kv_len, B)
            layout.validate(kv_len)
            assert layout.heads == len(PROGRAMS) and layout.batch == 1
            got = _layout_mask(layout, kv_len)[0]
            for h, p in enumerate(PROGRAMS):
                want = p.block_mask(q_len, kv_len, B)
                assert np.array_equal(got[h], want), (p, q_len, kv_len)


programs_st = st.builds(
    MaskProgram,
    sink=st.integers(0, 300),
    window=st.integers(0, 300),
    slashes=st.lists(st.integers(0, 600), max_size=5),
    verticals=st.lists(st.integers(0, 600), max_size=5),
    dense=st.integers(0, 5).map(lambda x: x == 0),
)


@settings(max_examples=60, deadline=None)
@given(
    progs=st.lists(programs_st, min_size=1, max_size=5),
    kv_len=st.integers(1, 700),
    q_frac=st.floats(0.0, 1.0),
    B=st.sampled_from([16, 32, 64]),
)
def test_hypothesis_equal_definition(progs, kv_len, q_frac, B):
    q_len = max(1, int(round(q_frac * kv_len)))
    layout = plan(progs, q_len, kv_len, B)
    layout.validate(kv_len)
    got = _layout_mask(layout, kv_len)[0]
    for h, p in enumerate(progs):
        assert np.array_equal(got[h], p.block_mask(q_len, kv_len, B))


def test_ragged_rows_equal_alone():
    B = 16
    table = ProgramTable.encode(PROGRAMS)
    q_lens = torch.tensor([97, 3, 1, 40, 64])
    kv_lens = torch.tensor([100, 3, 90, 40, 130])
    nqb, nkb = -(-97 // B), -(-130 // B)
    mask = static_block_mask(table, q_lens, kv_lens, nqb, nkb, B)
    for b in range(5):
        ql, kl = int(q_lens[b]), int(kv_lens[b])
        own_q, own_k = -(-ql // B), -(-kl // B)
        for h, p in enumerate(PROGRAMS):
            assert np.array_equal(mask[b, h, :own_q, :own_k].numpy(), p.block_mask(ql, kl, B))
            assert not mask[b, h, :own_q, own_k:].any()
        # query blocks past the row's queries keep KV block 0 only
        assert mask[b, :, own_q:, 0].all() and not mask[b, :, own_q:, 1:].any()


def _dynamic_reference(progs, q, k, q_len, kv_len, B):
    """Loop reference of the dynamic selection (float64): bool [Bt, H, nqb, nkb]."""
    Bt, H, _, D = q.shape
    g = H // k.shape[1]
    nqb, nkb = -(-q_len // B), -(-kv_len // B)
    off = kv_len - q_len
    out = np.zeros((Bt, H, nqb, nkb), bool)
    for b in range(Bt):
        for h, p in enumerate(progs):
            static = p.block_mask(q_len, kv_len, B)
            for a in range(nqb):
                rows = q[b, h, a * B: min((a + 1) * B, q_len)].double().mean(0)
                i1 = off + min((a + 1) * B, q_len) - 1
                ncausal = i1 // B + 1
                budget = int(p.dynamic_blocks(ncausal)) if not p.dense else 0
                cands = []
                for kb in range(ncausal):
                    if static[a, kb]:
                        continue
                    keys = k[b, h // g, kb * B: min((kb + 1) * B, kv_len)].double()
                    # log of the block's softmax mass for the block's mean query
                    cands.append((float(torch.logsumexp(keys @ rows / math.sqrt(D), 0)), kb))
                cands.sort(reverse=True)
                for _, kb in cands[:budget]:
                    out[b, h, a, kb] = True
                out[b, h, a] |= static[a]
    return out


@pytest.mark.parametrize("q_len,kv_len,hkv", [(97, 97, 2), (1, 1000, 1), (40, 300, 4), (1025, 1025, 2)])
def test_dynamic_topk_matches_loop_reference(q_len, kv_len, hkv):
    B = 64 if q_len > 500 else 16
    progs = [
        MaskProgram(sink=1, window=8, dynamic_fraction=0.1),
        MaskProgram(window=16, dynamic_fraction=0.5),
        MaskProgram(slashes=(3,), dynamic_fraction=1.0),
        MaskProgram(sink=2),
    ]
    Bt, D = 2, 8
    q = torch.randn(Bt, 4, q_len, D)
    k = torch.randn(Bt, hkv, kv_len, D)
    layout = plan(progs, q_len, kv_len, B, q=q, k=k)
    layout.validate(kv_len)
    assert layout.batch == Bt
    got = _layout_mask(layout, kv_len)
    want = _dynamic_reference(progs, q, k, q_len, kv_len, B)
    assert np.array_equal(got, want)


def test_dynamic_needs_q_and_k():
    with pytest.raises(DamRuntimeError, match="dynamic heads"):
        plan([MaskProgram(dynamic_fraction=0.3)], 64, 64, 16)


def test_planner_caches_static_part_per_length():
    p = Planner(PROGRAMS, 16, cache_size=2)
    a = p.plan(50, 80)
    assert p.plan(50, 80) is a  # static-only layer: the layout itself is cached
    p.plan(10, 80)
    p.plan(20, 80)
    assert (50, 80) not in p._cache  # evicted from the planner's own LRU of 2 ...
    assert p.plan(50, 80) is a  # ... and found again in the process-wide one, not recomputed


def test_mask_to_layout_roundtrip_and_bound():
    m = torch.rand(2, 3, 7, 11) < 0.4
    m[..., 0] = True
    lay = mask_to_layout(m, 16)
    lay.validate()
    assert torch.equal(lay.block_mask(11), m)
    assert lay.max_blocks == int(m.sum(-1).max())
    bigger = mask_to_layout(m, 16, max_blocks=11)
    assert bigger.max_blocks == 11 and torch.equal(bigger.block_mask(11), m)


def test_bad_inputs():
    with pytest.raises(DamRuntimeError, match="power of two"):
        Planner(PROGRAMS, 24)
    with pytest.raises(DamRuntimeError, match="q_len"):
        plan(PROGRAMS, 10, 5, 16)
    with pytest.raises(DamRuntimeError, match="MaskProgram"):
        plan([], 10, 10, 16)


def test_budget_formula_matches_ir():
    # ceil(fraction * n) in float64, as MaskProgram.dynamic_blocks computes it
    for frac in (0.1, 0.3, 1 / 3, 0.7):
        p = MaskProgram(dynamic_fraction=frac)
        for n in (1, 3, 10, 30, 1000):
            assert int(p.dynamic_blocks(n)) == max(1, math.ceil(frac * n))


def test_ragged_dynamic_rows_equal_alone():
    """plan_ragged with dynamic heads: row b (its own q/k at the front) == planning it alone."""
    B, D = 16, 8
    progs = list(PROGRAMS[:4]) + [MaskProgram(sink=1, window=8, dynamic_fraction=0.3), MaskProgram(dynamic_fraction=1.0)]
    p = Planner(progs, B)
    q_lens, kv_lens = [97, 5, 60], [97, 130, 60]
    Nq, Nk = 97, 130
    q = torch.randn(3, len(progs), Nq, D)
    k = torch.randn(3, 1, Nk, D)
    lay = p.plan_ragged(torch.tensor(q_lens), torch.tensor(kv_lens), q, k)
    lay.validate(Nk)
    got = lay.block_mask(-(-Nk // B))
    for b in range(3):
        ql, kl = q_lens[b], kv_lens[b]
        alone = Planner(progs, B).plan(ql, kl, q[b:b + 1, :, :ql], k[b:b + 1, :, :kl])
        want = alone.block_mask(-(-kl // B))[0]
        assert torch.equal(got[b, :, : -(-ql // B), : -(-kl // B)], want)
        assert not got[b, :, : -(-ql // B), -(-kl // B):].any()


def test_dynamic_score_finds_a_single_dominant_key():
    """A block whose mass sits on one key (a content-placed sink) has an unremarkable mean key;
    the per-key logsumexp score must still pick it over a block of uniformly mild keys."""
    B, D, n = 16, 8, 64
    q = torch.zeros(1, 1, n, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n, D)
    k[0, 0, 16:32, 0] = -2.0  # block 1: one huge key among strongly negative ones (mean < 0)
    k[0, 0, 20, 0] = 20.0
    k[0, 0, 32:48, 0] = 0.5  # block 2: mildly positive everywhere (larger mean key)
    prog = MaskProgram(dynamic_fraction=0.01)  # one dynamic block per query block
    assert float(k[0, 0, 16:32, 0].mean()) < float(k[0, 0, 32:48, 0].mean())
    layout = plan([prog], n, n, B, q=q, k=k)
    mask = _layout_mask(layout, n)[0, 0]
    assert mask[3, 1] and not mask[3, 2] and not mask[3, 0]  # query block 3: diagonal + block 1
    # the true mass agrees: block 1 holds most of query 63's attention
    p = torch.softmax((q[0, 0, 63] @ k[0, 0].T) / math.sqrt(D), 0)
    assert p[16:32].sum() > 0.9


# --- a cached plan reads no tensor value on the host --------------------------------------------
_SYNC_PROGRAMS = [
    MaskProgram(dense=True),
    MaskProgram(sink=1, window=2, dynamic_fraction=0.2),
    MaskProgram(sink=2, slashes=(3,), verticals=(40,)),
    MaskProgram(window=3, dynamic_fraction=0.1),
]


@pytest.mark.parametrize("share", ["uniform", "adaptive"])
@pytest.mark.parametrize("last_query", [0.0, 0.15])
def test_cached_plan_makes_no_host_read(share, last_query):
    """Once a length is cached, planning (static lookup, dynamic scores, last-query estimate) is
    pure device work: run on fake tensors, any host read (``.item()``, ``.tolist()``,
    ``bool(t)``, ``nonzero``, a data-dependent shape) raises. The layout it gives on real
    tensors equals the uncached plan of the same inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, q_len, kv_len = 16, 150, 200
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 8, generator=g)
    k = torch.randn(2, 2, kv_len, 8, generator=g)
    p = Planner(_SYNC_PROGRAMS, B, "cpu", last_query=last_query, last_query_queries=16, last_query_share=share)
    fresh = p.plan(q_len, kv_len, q, k)  # caches the length (one sync allowed here)
    again = p.plan(q_len, kv_len, q, k)
    assert torch.equal(again.block_mask(13), fresh.block_mask(13))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk = mode.from_tensor(q), mode.from_tensor(k)
        out = p.plan(q_len, kv_len, fq, fk)
    assert tuple(out.kv_indices.shape[:3]) == (2, 4, -(-q_len // B))
    ref = Planner(_SYNC_PROGRAMS, B, "cpu", last_query=last_query, last_query_queries=16,
                  last_query_share=share).plan(q_len, kv_len, q, k)
    assert torch.equal(again.block_mask(13), ref.block_mask(13))
    assert torch.equal(again.kv_counts, ref.kv_counts)


@pytest.mark.requires_cuda
def test_cached_plan_makes_no_host_sync_on_cuda():
    """On CUDA a cached plan (dynamic scores and estimate included) never synchronises."""
    B, q_len, kv_len = 64, 1000, 1300
    q = torch.randn(1, 4, q_len, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, kv_len, 64, device="cuda", dtype=torch.bfloat16)
    p = Planner(_SYNC_PROGRAMS, B, "cuda", last_query=0.15)
    want = p.plan(q_len, kv_len, q, k)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = p.plan(q_len, kv_len, q, k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.kv_indices, want.kv_indices) and torch.equal(got.kv_counts, want.kv_counts)


def test_static_part_is_shared_by_planners_of_the_same_programs():
    """A new planner of the same programs (a new handle of the same artifact) reuses the static
    part; other programs, block sizes or estimate settings never do."""
    from dam.runtime.planner import Planner

    progs = [MaskProgram(sink=1, window=2), MaskProgram(window=5, dynamic_fraction=0.2)]
    a, b = Planner(progs, 16), Planner(list(progs), 16)
    assert a._static(100, 130) is b._static(100, 130)
    for other in (Planner([MaskProgram(sink=1, window=3), progs[1]], 16), Planner(progs, 32),
                  Planner(progs, 16, last_query=0.1)):
        got = other._static(100, 130)
        assert got is not a._static(100, 130)
    layout = Planner([MaskProgram(sink=1, window=3), progs[1]], 16)._static(100, 130).layout
    ref = plan([MaskProgram(sink=1, window=3), MaskProgram(window=5)], 100, 130, 16)
    assert torch.equal(layout.block_mask(-(-130 // 16))[:, :1], ref.block_mask(-(-130 // 16))[:, :1])
