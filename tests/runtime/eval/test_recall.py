"""dam.runtime.eval.recall: measured recall/density of the layouts run, against a brute-force
float64 computation from the same queries, keys and layouts on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

import dam.runtime as rt
from dam.compiler import MaskProgram
from dam.kernels import BlockLayout
from dam.runtime.eval.recall import block_mass, measure_recall, top1_agreement

from .._helpers import MIXED_PROGRAMS, make_artifact, tiny_model

F64 = dict(rtol=1e-9, atol=1e-9)
# float32 softmax and per-block row sums (B terms) vs a float64 brute force: a few fp32 eps per row sum
F32 = dict(rtol=0, atol=64 * torch.finfo(torch.float32).eps)


def _brute(q, k, layout, scale):
    """float64 per-head (recall, static-free density) of ``layout`` on full softmax maps."""
    _, Hq, N, _ = q.shape
    Nk = k.shape[2]
    g = Hq // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    i = torch.arange(Nk - N, Nk)[:, None]
    j = torch.arange(Nk)[None, :]
    p = torch.softmax(s.masked_fill(j > i, float("-inf")), -1)[0]  # [H, N, Nk]
    kept = layout.to_dense(N, Nk)[0].expand(Hq, N, Nk)
    recall = (p * kept).sum((-1, -2)) / N
    B = layout.block_n
    nqb, nkb = -(-N // B), -(-Nk // B)
    causal_blocks = kept_blocks = 0
    cb = torch.zeros(nqb, nkb, dtype=torch.bool)
    for a in range(nqb):
        for c in range(nkb):
            cb[a, c] = bool((j[:, c * B:(c + 1) * B] <= i[a * B:(a + 1) * B]).any())
    causal_blocks = int(cb.sum())
    kept_blocks = (layout.block_mask(nkb)[0].expand(Hq, nqb, nkb) & cb).sum((-1, -2))
    return recall, kept_blocks.double() / causal_blocks, p


@pytest.mark.parametrize("n,heads,kv", [(97, 4, 2), (160, 6, 2), (33, 3, 1)])
def test_measure_recall_matches_brute_force(n, heads, kv):
    torch.manual_seed(n)
    model = tiny_model(heads=heads, kv_heads=kv)
    art = make_artifact(model.config, MIXED_PROGRAMS, block_size=16, seed=n)
    ids = torch.randint(0, 128, (1, n))
    seen = {}

    def grab(layer, q, k, layout):
        seen[layer] = (q.clone(), k.clone(), layout)
        return layout

    with rt.apply(model, art, backend="cpu", min_length=1) as h:
        with torch.no_grad():
            plain = model(ids).logits
        h.layout_hook = grab  # chained: measure_recall runs it first
        rep = measure_recall(model, h, ids, keep_logits=True, max_elements=4 * n * heads)  # many chunks
        assert h.layout_hook is grab  # restored
    torch.testing.assert_close(rep.logits, plain[0], rtol=0, atol=0)  # the DAM forward, unchanged
    assert rep.measured.all()
    for layer, (q, k, layout) in seen.items():
        scale = 1 / math.sqrt(q.shape[-1])
        recall, density, _ = _brute(q, k, layout, scale)
        torch.testing.assert_close(rep.recall[layer], recall, **F32)
        torch.testing.assert_close(rep.density[layer], density, **F64)
        # the static part alone: the programs' own block masks
        progs = art.layer_programs(layer)
        sm = torch.stack([torch.from_numpy(p.block_mask(n, n, 16)) for p in progs])[None]
        srec, sdens, _ = _brute(q, k, BlockLayout.from_block_mask(sm, 16, 16), scale)
        torch.testing.assert_close(rep.static_recall[layer], srec, **F32)
        torch.testing.assert_close(rep.static_density[layer], sdens, **F64)
        for hh, p in enumerate(progs):
            if p.dense:
                assert rep.recall[layer, hh] == pytest.approx(1.0, abs=1e-5)
                assert rep.density[layer, hh] == 1.0
            if p.dense or p.dynamic_fraction == 0:  # no dynamic blocks: all three agree
                assert rep.oracle_recall[layer, hh] == pytest.approx(float(rep.recall[layer, hh]), abs=1e-12)
    # a perfect selector with the same budget is never worse than the run-time one
    assert (rep.oracle_recall >= rep.recall - 1e-9).all()
    assert (rep.recall >= rep.static_recall - 1e-9).all()
    if n > 64:  # long enough that the programs drop blocks
        assert 0 < rep.mean_density < 1 and 0 < rep.mean_recall < 1


def test_oracle_recall_brute_force():
    """oracle_recall = static + the heaviest `extra` remaining causal blocks, per query block."""
    torch.manual_seed(1)
    model = tiny_model()
    programs = (MaskProgram(sink=16, dynamic_fraction=0.3),) * 4
    art = make_artifact(model.config, programs, block_size=16)
    ids = torch.randint(0, 128, (1, 130))
    seen = {}
    with rt.apply(model, art, backend="cpu", min_length=1) as h:
        h.layout_hook = lambda layer, q, k, lay: seen.setdefault(layer, (q, k, lay))[2]
        rep = measure_recall(model, h, ids)
    q, k, layout = seen[0]
    _, _, p = _brute(q, k, layout, 1 / math.sqrt(q.shape[-1]))
    B, n = 16, 130
    nb = -(-n // B)
    pad = torch.nn.functional.pad(p, (0, nb * B - n, 0, nb * B - n))
    bm = pad.reshape(4, nb, B, nb, B).sum((2, 4))
    static = torch.from_numpy(programs[0].block_mask(n, n, B))
    kept = layout.block_mask(nb)[0]
    for hh in range(4):
        tot = 0.0
        for a in range(nb):
            extra = int((kept[hh, a] & ~static[a]).sum())
            rest = sorted((float(bm[hh, a, c]) for c in range(a + 1) if not static[a, c]), reverse=True)
            tot += float(bm[hh, a][static[a]].sum()) + sum(rest[:extra])
        assert float(rep.oracle_recall[0, hh]) == pytest.approx(tot / n, abs=1e-5)


def test_block_mass_rows_sum_to_one_and_chunking_is_exact():
    torch.manual_seed(0)
    q = torch.randn(1, 6, 100, 8) * 3
    k = torch.randn(1, 2, 130, 8) * 3  # the last 100 of 130 positions
    a = block_mass(q, k, 0.3, 16, max_elements=1 << 30)
    b = block_mass(q, k, 0.3, 16, max_elements=1)  # one block of rows per chunk
    torch.testing.assert_close(a, b, **F32)
    rows = torch.tensor([16] * 6 + [4], dtype=torch.float64)
    torch.testing.assert_close(a.sum(-1)[0], rows.expand(6, 7), **F32)
    assert (a[0, :, 0, 3:] == 0).all()  # keys beyond query 30+15 = 45 (blocks >= 3) are non-causal


@pytest.mark.parametrize("stride", [2, 3, 7])
def test_block_mass_query_stride_samples_whole_blocks(stride):
    """Every stride-th query block counted back from the last (partial) one, exactly as the full
    computation has it; the other rows are zero. Chunking does not change the sample."""
    torch.manual_seed(stride)
    q = torch.randn(1, 6, 100, 8) * 3
    k = torch.randn(1, 2, 130, 8) * 3
    full = block_mass(q, k, 0.3, 16)
    for max_elements in (1, 1 << 30):
        part = block_mass(q, k, 0.3, 16, max_elements=max_elements, query_stride=stride)
        picked = [a for a in range(7) if (6 - a) % stride == 0]
        torch.testing.assert_close(part[:, :, picked], full[:, :, picked], **F32)
        rest = [a for a in range(7) if a not in picked]
        assert (part[:, :, rest] == 0).all()
    with pytest.raises(rt.DamRuntimeError, match="query_stride"):
        block_mass(q, k, 0.3, 16, query_stride=0)


def test_measure_recall_query_stride_is_the_sampled_rows_recall():
    """recall with query_stride = the brute-force recall over the sampled blocks' rows; density exact."""
    torch.manual_seed(5)
    model = tiny_model(heads=4, kv_heads=2)
    art = make_artifact(model.config, MIXED_PROGRAMS, block_size=16, seed=5)
    n, B, stride = 150, 16, 3
    ids = torch.randint(0, 128, (1, n))
    seen = {}
    with rt.apply(model, art, backend="cpu", min_length=1) as h:
        h.layout_hook = lambda layer, q, k, lay: seen.setdefault(layer, (q, k, lay))[2]
        full = measure_recall(model, h, ids)
        seen.clear()
        part = measure_recall(model, h, ids, query_stride=stride)
    nqb = -(-n // B)
    picked = [a for a in range(nqb) if (nqb - 1 - a) % stride == 0]
    rows = torch.cat([torch.arange(a * B, min(n, (a + 1) * B)) for a in picked])
    for layer, (q, k, layout) in seen.items():
        _, _, p = _brute(q, k, layout, 1 / math.sqrt(q.shape[-1]))
        kept = layout.to_dense(n, n)[0].expand(p.shape[0], n, n)
        want = (p * kept)[:, rows].sum((-1, -2)) / rows.numel()
        torch.testing.assert_close(part.recall[layer], want, **F32)
    torch.testing.assert_close(part.density, full.density, **F64)
    unpicked = [a for a in range(nqb) if a not in picked]
    assert torch.isnan(part.row_recall[:, :, unpicked]).all()
    torch.testing.assert_close(part.row_recall[:, :, picked], full.row_recall[:, :, picked], **F32)
    assert (part.oracle_recall >= part.recall - 1e-9).all()


def test_measure_recall_dense_layers_and_errors():
    model = tiny_model()
    art = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    with rt.apply(model, art, backend="cpu", min_length=1000) as h:
        rep = measure_recall(model, h, torch.randint(0, 128, (1, 50)))
        assert not rep.measured.any() and torch.isnan(rep.recall).all()
        with pytest.raises(rt.DamRuntimeError, match=r"\[1, N\]"):
            measure_recall(model, h, torch.randint(0, 128, (2, 50)))
    with pytest.raises(rt.DamRuntimeError, match="active"):
        measure_recall(model, h, torch.randint(0, 128, (1, 50)))


def test_top1_agreement():
    d = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
    s = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [2.0, 1.0]]])
    assert top1_agreement(d, s) == 0.75
    assert top1_agreement(d, s, last=2) == 1.0


def test_block_mass_soft_capped():
    """With softcap the mass is that of the capped scores' softmax (as the model attends)."""
    torch.manual_seed(3)
    q = torch.randn(1, 4, 80, 8).double() * 3
    k = torch.randn(1, 2, 80, 8).double() * 3
    got = block_mass(q, k, 0.5, 16, softcap=2.0)
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.5
    s = torch.tanh(s / 2.0) * 2.0
    s = s.masked_fill(torch.ones(80, 80, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, -1)[0]
    want = p.reshape(4, 5, 16, 5, 16).sum((2, 4))
    torch.testing.assert_close(got[0], want, **F64)
    assert (block_mass(q, k, 0.5, 16) - got).abs().max() > 1e-2
