"""Last-query vertical-and-slash estimate: equal to a loop reference; planner and runtime wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dam.runtime as rt
from dam.compiler import ArtifactError, MaskProgram
from dam.runtime import DamRuntimeError, Planner
from dam.runtime.estimate import last_query_mask
from dam.runtime.planner import ProgramTable, static_block_mask

from ._helpers import FP32_TOL, MIXED_PROGRAMS, make_artifact, tiny_model


def _reference(q, k, current, heads, fraction, last_q, B, scale):
    """Element-by-element definition (float64, loops): rank verticals j and slashes d by the last
    queries' summed attention, keep the longest prefix whose new blocks fit the budget."""
    Bt, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    nqb, nkb = -(-Nq // B), -(-Nk // B)
    n = min(last_q, Nq)
    rows = [(Nk - Nq + a * B, Nk - Nq + min(a * B + B, Nq) - 1) for a in range(nqb)]
    causal = np.zeros((nqb, nkb), bool)
    for a, (_, i1) in enumerate(rows):
        causal[a, : i1 // B + 1] = True
    budget = math.floor(fraction * causal.sum())
    out = np.zeros((Bt, len(heads), nqb, nkb), bool)
    for b in range(Bt):
        for e, h in enumerate(heads):
            qpos = range(Nk - n, Nk)
            s = (q[b, h, Nq - n:].double() * scale) @ k[b, h // (Hq // Hkv)].double().T
            for t, i in enumerate(qpos):
                s[t, i + 1:] = -math.inf
            p = torch.softmax(s, -1).numpy()
            vert = p.sum(0)
            slash = np.zeros(Nk)
            for t, i in enumerate(qpos):
                for d in range(i + 1):
                    slash[d] += p[t, i - d]
            order = np.argsort(-np.concatenate([vert, slash]), kind="stable")

            def build(m, order=order):
                mask = np.zeros((nqb, nkb), bool)
                for el in order[:m]:
                    for a, (i0, i1) in enumerate(rows):
                        if el < Nk and el <= i1:
                            mask[a, el // B] = True
                        elif el >= Nk:
                            for i in range(max(i0, el - Nk), i1 + 1):
                                mask[a, (i - (el - Nk)) // B] = True
                return mask & causal

            cur = current[0 if current.shape[0] == 1 else b, e].numpy()
            best = 0
            for m in range(1, 2 * Nk + 1):
                if (build(m) & ~cur).sum() > budget:
                    break
                best = m
            out[b, e] = build(best)
    return out


@pytest.mark.parametrize("bt,hq,hkv,nq,nk,frac,last_q", [
    (1, 4, 2, 70, 70, 0.2, 8), (2, 3, 1, 40, 90, 0.3, 64), (1, 2, 2, 33, 33, 0.5, 5), (1, 2, 1, 64, 64, 1.0, 16),
])
def test_equals_loop_reference(bt, hq, hkv, nq, nk, frac, last_q):
    torch.manual_seed(nq + nk)
    B, D = 16, 8
    q, k = torch.randn(bt, hq, nq, D), torch.randn(bt, hkv, nk, D)
    heads = torch.tensor([0, hq - 1])
    cur = torch.rand(1, 2, -(-nq // B), -(-nk // B)) < 0.3
    q0, k0 = q.clone(), k.clone()
    got = last_query_mask(q, k, cur, heads, frac, last_q, B, 0.5)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # the caller's tensors are untouched
    want = _reference(q, k, cur, heads.tolist(), frac, last_q, B, 0.5)
    assert np.array_equal(got.numpy(), want)
    # the budget holds: new blocks <= floor(fraction * causal blocks)
    ncausal = sum((nk - nq + min(a * B + B, nq) - 1) // B + 1 for a in range(-(-nq // B)))
    assert int((got & ~cur).sum((-1, -2)).max()) <= math.floor(frac * ncausal)


def test_finds_a_needle_and_a_diagonal():
    """A key every last query reads becomes a vertical; a fixed offset every query reads a slash."""
    B, D, n = 16, 16, 128
    torch.manual_seed(0)
    q = torch.randn(1, 1, n, D) * 0.1
    k = torch.randn(1, 1, n, D) * 0.1
    q[..., 0] = 1.0
    k[0, 0, 37, 0] = 12.0  # needle: key 37 (KV block 2) dominates every query after it
    for i in range(n):  # diagonal: query i also reads key i - 70 (one direction per offset)
        if i >= 70:
            q[0, 0, i, 1 + i % 15] += 3.0
            k[0, 0, i - 70, 1 + i % 15] += 3.0
    cur = torch.zeros(1, 1, n // B, n // B, dtype=torch.bool)
    m = last_query_mask(q, k, cur, torch.tensor([0]), 0.4, 32, B, 1.0)[0, 0]
    assert m[2:, 2].all()  # the needle's column, from its query block on
    for a in range(5, 8):  # offset 70 = 4 blocks + 6: keys [16a - 70, 16a - 55], blocks a-5 and a-4
        assert m[a, a - 5] and m[a, a - 4]
    assert int(m.sum()) <= math.floor(0.4 * 36)  # nothing was kept before: every block is new



def test_budget_zero_and_bad_arguments():
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 1, 32, 8)
    cur = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    assert not last_query_mask(q, k, cur, torch.tensor([0, 1]), 0.0, 8, 16).any()
    with pytest.raises(DamRuntimeError, match="fraction"):
        last_query_mask(q, k, cur, torch.tensor([0, 1]), 1.5, 8, 16)
    with pytest.raises(DamRuntimeError, match="count"):
        last_query_mask(q, k, cur, torch.tensor([0, 1]), 0.1, 0, 16)
    with pytest.raises(DamRuntimeError, match="last_query"):
        Planner([MaskProgram()], 16, last_query=-0.1)
    with pytest.raises(DamRuntimeError, match="last_query"):
        rt.RuntimeConfig(last_query=2.0)
    with pytest.raises(DamRuntimeError, match="last_query_queries"):
        rt.RuntimeConfig(last_query_queries=0)


def test_planner_unites_static_dynamic_and_estimate():
    """plan() with an estimate = static ∪ dynamic (as without it) ∪ last_query_mask; dense heads
    untouched; decode steps (fewer queries than a block) skip it; ragged rows equal alone."""
    B, D = 16, 8
    torch.manual_seed(1)
    progs = [MaskProgram(dense=True), MaskProgram(sink=16, window=16), MaskProgram(window=16, dynamic_fraction=0.2)]
    q, k = torch.randn(2, 3, 96, D), torch.randn(2, 1, 96, D)
    base = Planner(progs, B).plan(96, 96, q, k).block_mask(6)
    p = Planner(progs, B, last_query=0.3, last_query_queries=16)
    got = p.plan(96, 96, q, k).block_mask(6)
    est = last_query_mask(q, k, base[:, 1:], torch.tensor([1, 2]), 0.3, 16, B)
    assert torch.equal(got[:, 0], base[:, 0])
    assert torch.equal(got[:, 1:], base[:, 1:] | est)
    assert (got & ~base).any()  # it added something
    one = Planner(progs, B, last_query=0.3).plan(1, 96, q[:, :, -1:], k)
    assert torch.equal(one.block_mask(6), Planner(progs, B).plan(1, 96, q[:, :, -1:], k).block_mask(6))
    # ragged: row b (its own q/k at the front) plans as it would alone
    q_lens, kv_lens = torch.tensor([96, 40]), torch.tensor([96, 70])
    rag = p.plan_ragged(q_lens, kv_lens, q, k).block_mask(6)
    alone = Planner(progs, B, last_query=0.3, last_query_queries=16).plan(40, 70, q[1:, :, :40], k[1:, :, :70])
    assert torch.equal(rag[1, :, :3, :5], alone.block_mask(5)[0])
    assert torch.equal(rag[0], got[0])


def test_static_table_unchanged_by_estimate():
    table = ProgramTable.encode(MIXED_PROGRAMS)
    m = static_block_mask(table, torch.tensor([64]), torch.tensor([64]), 4, 4, 16)
    p = Planner(MIXED_PROGRAMS, 16, last_query=0.5)
    assert torch.equal(p._static(64, 64)[0].block_mask(4), m)


def test_runtime_with_estimate_matches_reference_backend_and_metadata_default():
    """The model runs with the estimate (CPU kernels == float64 reference on the same layouts);
    the artifact's metadata default applies unless the config overrides it."""
    model = tiny_model()
    art = make_artifact(model.config, MIXED_PROGRAMS)
    ids = torch.randint(1, 128, (1, 96))
    with torch.no_grad():
        with rt.apply(model, art, backend="reference", min_length=1, last_query=0.3) as h:
            ref = model(ids).logits
            assert h.last_query == 0.3
        with rt.apply(model, art, backend="cpu", min_length=1, last_query=0.3):
            cpu = model(ids).logits
        torch.testing.assert_close(cpu, ref, **FP32_TOL)
        with rt.apply(model, art, backend="reference", min_length=1):
            plain = model(ids).logits
        assert not torch.allclose(plain, ref)  # the estimate changed what was attended
        art.metadata["runtime"] = {"last_query": 0.3, "last_query_queries": 64}
        with rt.apply(model, art, backend="reference", min_length=1) as h:
            assert (h.last_query, h.last_query_queries) == (0.3, 64)
            torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
        with rt.apply(model, art, backend="reference", min_length=1, last_query=0.0) as h:
            torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)
        art.metadata["runtime"] = {"last_query": "lots"}
        with pytest.raises(ArtifactError, match="last_query"):
            rt.apply(model, art, backend="reference", min_length=1)


def test_element_baseline_reaches_the_density_and_keeps_its_base():
    """ElementVSHook: diagonal + first key block + the estimator alone, at (just over) the asked density."""
    from dam.kernels import BlockLayout
    from dam.runtime.eval.baselines import ElementVSHook, causal_block_mask, diagonal_block_mask

    class _Handle:
        def scaling(self, layer):
            return 1.0 / 8 ** 0.5

    torch.manual_seed(3)
    B, n = 16, 256
    q, k = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8)
    full = BlockLayout.from_block_mask(torch.ones(1, 4, n // B, n // B, dtype=torch.bool), B, B)
    causal = causal_block_mask(n, n, B)
    base = diagonal_block_mask(n, n, B) | (causal & (torch.arange(n // B) == 0))
    for target in (0.3, 0.6):
        m = ElementVSHook(_Handle(), target, 16)(0, q, k, full).block_mask(n // B)[0]
        dens = float(m.sum()) / (4 * float(causal.sum()))
        step = 2 * (n // B) / float(causal.sum())  # one element adds at most 2 blocks per query block
        assert target <= dens <= target + step
        assert (m >= base).all() and not (m & ~causal).any()
    with pytest.raises(DamRuntimeError, match="density"):
        ElementVSHook(_Handle(), 0.0)


def test_adaptive_share_gives_the_budget_to_heads_that_miss_mass():
    """Head 0's kept blocks hold all the last queries read; head 1's hold nothing: adaptive gives
    head 1 the layer's whole budget (twice the uniform one), head 0 none."""
    B, D, n = 16, 8, 128
    torch.manual_seed(5)
    q = torch.randn(1, 2, n, D)
    k = torch.randn(1, 1, n, D)
    nb = n // B
    causal = torch.ones(nb, nb).tril().bool()
    cur = torch.zeros(1, 2, nb, nb, dtype=torch.bool)
    cur[0, 0] = causal  # head 0 keeps everything already
    uni = last_query_mask(q, k, cur, torch.tensor([0, 1]), 0.2, 32, B)
    ada = last_query_mask(q, k, cur, torch.tensor([0, 1]), 0.2, 32, B, share="adaptive")
    budget = math.floor(0.2 * int(causal.sum()))
    assert int((uni[0, 1] & ~cur[0, 1]).sum()) <= budget < int((ada[0, 1] & ~cur[0, 1]).sum()) <= 2 * budget
    with pytest.raises(DamRuntimeError, match="share"):
        last_query_mask(q, k, cur, torch.tensor([0, 1]), 0.2, 32, B, share="nope")
    with pytest.raises(DamRuntimeError, match="last_query_share"):
        rt.RuntimeConfig(last_query_share="nope")
    p = Planner([MaskProgram(window=16), MaskProgram(sink=16)], B, last_query=0.2, last_query_share="adaptive")
    assert p.plan(n, n, q, k).block_mask(nb).shape == (1, 2, nb, nb)
