"""DAM's AMX CPU kernel (``dam.kernels.cpu_native``): equal to the float64 reference in every case
the launcher sends it (GQA stacked and per head, MQA, chunked prefill, ragged tails, empty rows,
non-causal, broadcast layouts, strided views, LSE), the ATen path before its build is ready and
after a failed build (one warning), and never built where it cannot run. Where this CPU cannot
build it (no AMX-BF16, no compiler), the tests that need the kernel skip; the fallbacks run
everywhere."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from dam.kernels import BlockLayout, block_sparse_attention, cpu_flex, cpu_native
from dam.kernels import cpu as aten_cpu
from dam.kernels.reference import attention_reference

from .helpers import assert_close_to_reference, mixed_block_mask, poisoned

needs_kernel = pytest.mark.skipif(cpu_native.unsupported() is not None,
                                  reason=f"DAM's CPU kernel cannot be built here: {cpu_native.unsupported()}")


@pytest.fixture
def built(monkeypatch):
    """The kernel built (once per process: torch caches it on disk) and counting its calls."""
    monkeypatch.setenv("DAM_CPU_FLEX", "sync")
    monkeypatch.delenv("DAM_CPU_NATIVE", raising=False)
    monkeypatch.setattr(cpu_native, "BUILD_FROM_KEYS", 1)
    calls = []
    q = torch.zeros(1, 1, 16, 16, dtype=torch.bfloat16)
    lay = BlockLayout.from_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), 16, 16)
    block_sparse_attention(q, q, q, lay, backend="cpu")  # builds (sync) on the first test
    if cpu_native.state() != "ready":
        pytest.fail(f"the kernel did not build: {cpu_native.state()}")
    real = cpu_native._STATE.module

    class Counting:
        def __init__(self):
            self.real = real

        def __getattr__(self, name):  # the planning helpers, uncounted
            return getattr(self.real, name)

        def attend(self, *a):
            calls.append(a)
            return real.attend(*a)

    monkeypatch.setattr(cpu_native._STATE, "module", Counting())
    return calls


def _inputs(b, hq, hkv, nq, nk, d, seed, *, bnhd=False):
    g = torch.Generator().manual_seed(seed)
    if bnhd:  # transformers' layout: [B, N, H, D] storage viewed as [B, H, N, D]
        q = torch.randn(b, nq, hq, d, generator=g).bfloat16().transpose(1, 2)
        k = torch.randn(b, nk, hkv, d, generator=g).bfloat16().transpose(1, 2)
        v = torch.randn(b, nk, hkv, d, generator=g).bfloat16().transpose(1, 2)
        return q, k, v
    return tuple(torch.randn(b, h, n, d, generator=g).bfloat16() for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))


# (B, Hq, Hkv, Nq, Nk, D, block, layout batch, layout heads, causal)
CASES = [
    (1, 4, 2, 200, 200, 64, 16, 1, 4, True),      # GQA 2, per-head layouts, ragged tail
    (2, 9, 3, 97, 300, 40, 16, 2, 9, True),       # chunked (Nq < Nk), odd-sized D, per-row layouts
    (1, 4, 1, 300, 300, 256, 64, 1, 4, True),     # MQA (Gemma 3's shape), head_dim 256
    (1, 2, 2, 1000, 1025, 128, 64, 1, 2, True),   # no GQA, long ragged key tail
    (1, 8, 2, 130, 257, 64, 32, 1, 1, False),     # non-causal, one layout for every head
    (2, 6, 3, 64, 64, 64, 16, 1, 6, True),        # layout broadcast over the batch
]


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_equals_reference(built, case):
    b, hq, hkv, nq, nk, d, bs, lb, lh, causal = case
    for seed, bnhd in ((0, False), (1, True)):
        q, k, v = _inputs(b, hq, hkv, nq, nk, d, seed, bnhd=bnhd)
        gen = torch.Generator().manual_seed(seed)
        mask = mixed_block_mask(lb, lh, -(-nq // bs), -(-nk // bs), gen=gen)
        if lh == hq and hq > hkv:  # the heads of KV head 0 share most blocks: the stacked part runs
            g = hq // hkv
            mask[:, 1:g] |= mask[:, :1]
        lay = BlockLayout.from_block_mask(mask, bs, bs)
        out, lse = poisoned(q.shape, q.dtype, "cpu"), poisoned(q.shape[:3], torch.float32, "cpu")
        before = len(built)
        block_sparse_attention(q, k, v, lay, causal=causal, backend="cpu", out=out, lse_out=lse)
        assert len(built) == before + 1  # DAM's kernel ran
        ro, rl = attention_reference(q.double(), k.double(), v.double(), lay, causal=causal)
        assert_close_to_reference(out, lse, ro, rl, torch.bfloat16, float(v.abs().max()))


@needs_kernel
@pytest.mark.slow
def test_strided_outputs_and_no_lse(built):
    q, k, v = _inputs(1, 4, 2, 128, 128, 64, 3)
    lay = BlockLayout.from_block_mask(mixed_block_mask(1, 4, 8, 8, gen=torch.Generator().manual_seed(3)), 16, 16)
    out = torch.full((1, 128, 4, 64), float("nan"), dtype=torch.bfloat16).transpose(1, 2)  # a strided out
    lse = torch.full((1, 4, 256), float("nan"))[..., ::2]  # a non-contiguous lse_out
    block_sparse_attention(q, k, v, lay, backend="cpu", out=out, lse_out=lse)
    ro, rl = attention_reference(q.double(), k.double(), v.double(), lay)
    assert_close_to_reference(out, lse, ro, rl, torch.bfloat16, float(v.abs().max()))
    plain = block_sparse_attention(q, k, v, lay, backend="cpu")
    assert torch.equal(plain, out)


@needs_kernel
@pytest.mark.slow
def test_other_calls_take_other_paths(built):
    """fp32, soft-capped and gradient-tracking calls are not the kernel's."""
    q, k, v = _inputs(1, 4, 2, 64, 64, 64, 4)
    lay = BlockLayout.from_block_mask(torch.ones(1, 4, 4, 4, dtype=torch.bool), 16, 16)
    block_sparse_attention(q.float(), k.float(), v.float(), lay, backend="cpu")
    block_sparse_attention(q, k, v, lay, backend="cpu", softcap=30.0)
    with torch.enable_grad():
        block_sparse_attention(q.requires_grad_(), k, v, lay, backend="cpu")
    assert built == []


def test_background_build_serves_aten_until_ready(monkeypatch):
    """The first long call starts the build in a thread and takes the ATen path; once built, the
    kernel serves (a stand-in build here: the real one is the other tests')."""
    monkeypatch.setenv("DAM_CPU_FLEX", "background")
    monkeypatch.delenv("DAM_CPU_NATIVE", raising=False)
    monkeypatch.setattr(cpu_native, "_STATE", cpu_native._State())
    monkeypatch.setattr(cpu_native, "unsupported", lambda: None)
    monkeypatch.setattr(cpu_native, "BUILD_FROM_KEYS", 100)
    ran = []

    class Fake:
        def attend(self, q, k, v, idx, cnt, out, lse, bm, bn, scale, causal, stack):
            ran.append(1)
            out.copy_(aten_out)

    go = threading.Event()

    def fake_build():
        go.wait(10)  # a build takes a while: the call that starts it never waits for it
        cpu_native._STATE.module, cpu_native._STATE.state = Fake(), "ready"

    monkeypatch.setattr(cpu_native, "_build", fake_build)
    aten = []
    real = aten_cpu.attention_cpu
    monkeypatch.setattr(aten_cpu, "attention_cpu", lambda *a, **kw: aten.append(1) or real(*a, **kw))
    q, k, v = _inputs(1, 2, 1, 50, 50, 16, 5)
    lay = BlockLayout.from_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 16, 16)
    aten_out = block_sparse_attention(q, k, v, lay, backend="cpu")  # short: no build
    assert aten == [1] and cpu_native.state() == "new"
    q2, k2, v2 = _inputs(1, 2, 1, 128, 128, 16, 6)
    lay2 = BlockLayout.from_block_mask(torch.ones(1, 1, 8, 8, dtype=torch.bool), 16, 16)
    aten_out = block_sparse_attention(q2, k2, v2, lay2, backend="cpu")  # starts the build, runs ATen
    assert aten == [1, 1] and cpu_native.state() == "building"
    go.set()
    cpu_flex.wait_for_builds()
    assert cpu_native.state() == "ready"
    block_sparse_attention(q2, k2, v2, lay2, backend="cpu")
    assert ran == [1] and aten == [1, 1]


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("DAM_CPU_FLEX", "sync")
    monkeypatch.setenv("DAM_CPU_NATIVE", "1")
    monkeypatch.setattr(cpu_native, "_STATE", cpu_native._State())
    monkeypatch.setattr(cpu_native, "unsupported", lambda: None)
    monkeypatch.setattr(cpu_native, "BUILD_FROM_KEYS", 1)
    monkeypatch.setattr(cpu_flex, "_WARNED", set())
    monkeypatch.setattr(cpu_flex, "try_attention", lambda *a, **kw: False)  # no Flex build either

    def broken(**kw):
        raise RuntimeError("no compiler today")

    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "load", broken)
    q, k, v = _inputs(1, 4, 2, 70, 70, 16, 7)
    lay = BlockLayout.from_block_mask(mixed_block_mask(1, 4, 5, 5, gen=torch.Generator().manual_seed(7)), 16, 16)
    ro, rl = attention_reference(q.double(), k.double(), v.double(), lay)
    with caplog.at_level(logging.WARNING, logger="dam.kernels.cpu_flex"):
        for _ in range(3):
            out, lse = block_sparse_attention(q, k, v, lay, backend="cpu", return_lse=True)
            assert_close_to_reference(out, lse, ro, rl, torch.bfloat16, float(v.abs().max()))
    warnings = [r for r in caplog.records if "no compiler today" in r.getMessage()]
    assert len(warnings) == 1 and cpu_native.state() == "failed" and not cpu_native.usable()


def test_unsupported_cpu_never_builds_and_leaves_flex_its_turn(monkeypatch):
    monkeypatch.setenv("DAM_CPU_FLEX", "sync")
    monkeypatch.delenv("DAM_CPU_NATIVE", raising=False)
    monkeypatch.setattr(cpu_native, "_STATE", cpu_native._State())
    monkeypatch.setattr(cpu_flex, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(cpu_native, "_build", lambda: pytest.fail("built on a CPU without AMX"))
    flex = []
    monkeypatch.setattr(cpu_flex, "try_attention", lambda *a, **kw: flex.append(1) and False)
    assert "amx_bf16" in cpu_native.unsupported()
    q, k, v = _inputs(1, 2, 1, 40, 40, 16, 8)
    lay = BlockLayout.from_block_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 16, 16)
    block_sparse_attention(q, k, v, lay, backend="cpu")
    assert cpu_native.state() == "unsupported" and flex == [1]


def test_switches(monkeypatch):
    for flex, native, want in (("sync", None, "sync"), ("0", None, "off"), ("sync", "0", "off"),
                               ("", "", "background"), ("background", "off", "off")):
        monkeypatch.setenv("DAM_CPU_FLEX", flex)
        if native is None:
            monkeypatch.delenv("DAM_CPU_NATIVE", raising=False)
        else:
            monkeypatch.setenv("DAM_CPU_NATIVE", native)
        assert cpu_native.mode() == want


def test_name_follows_source_and_cpu(monkeypatch):
    a = cpu_native._name()
    monkeypatch.setattr(cpu_flex, "cpu_flags", lambda: frozenset({"something", "else"}))
    assert cpu_native._name() != a and cpu_native._name().startswith("dam_cpu_attention_")


def _block_lse_reference(k, cols, last, per, bn, out):
    """float64 definition of the fused block score (same signature as the kernel's)."""
    Bt, H, Nk, _ = k.shape
    nkb, C = -(-Nk // bn), cols.shape[2]
    s = k.double() @ cols.double().transpose(-1, -2)  # [Bt, H, Nk, C]
    pad = torch.full((Bt, H, nkb * bn - Nk, C), float("-inf"), dtype=torch.float64)
    lse = torch.logsumexp(torch.cat([s, pad], 2).view(Bt, H, nkb, bn, C), 3)
    seen = torch.arange(nkb)[:, None] <= last[torch.arange(C) // per][None, :]
    out.copy_(torch.where(seen, lse, torch.full_like(lse, float("-inf"))))


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 3, 1000, 64, 3, 16, 64), (2, 1, 333, 256, 4, 6, 64), (1, 2, 130, 40, 2, 9, 16)])
def test_block_lse_equals_reference(built, shape):
    from .helpers import lse_atol

    B, H, Nk, D, per, nqb, bn = shape
    g = torch.Generator().manual_seed(Nk)
    k = torch.randn(B, H, Nk, D, generator=g).bfloat16()
    cols = (torch.randn(B, H, nqb * per, D, generator=g) * 0.3).bfloat16()
    last = torch.sort(torch.randint(0, -(-Nk // bn), (nqb,), generator=g)).values
    got = torch.empty(B, H, -(-Nk // bn), nqb * per)
    cpu_native._STATE.module.real.block_lse(k, cols, last, per, bn, got)
    want = torch.empty(got.shape, dtype=torch.float64)
    _block_lse_reference(k, cols, last, per, bn, want)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    assert (got.double() - want)[fin].abs().max() <= lse_atol(want)


@needs_kernel
@pytest.mark.slow
def test_planner_dynamic_scores_take_the_fused_kernel(built, monkeypatch):
    """dynamic_indices on bf16 CPU tensors: the fused kernel's picks equal those of its float64
    definition run through the same wiring (query-block-major columns, GQA groups, causal cut)."""
    from dam.compiler import MaskProgram
    from dam.runtime.planner import Planner, dynamic_indices

    progs = [MaskProgram(sink=1, window=2, dynamic_fraction=0.2), MaskProgram(window=1, dynamic_fraction=0.5),
             MaskProgram(sink=1), MaskProgram(dynamic_fraction=0.1)]
    B, nq, nk = 16, 150, 230
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, nq, 64, generator=g).bfloat16()
    k = torch.randn(2, 2, nk, 64, generator=g).bfloat16()
    p = Planner(progs, B)
    entry = p._static(nq, nk)
    used = []
    real = cpu_native.block_lse_fn
    monkeypatch.setattr(cpu_native, "block_lse_fn", lambda kk: used.append(1) or real(kk))
    got = dynamic_indices(p.table, entry.bias, entry.budget, q, k, None, None, B)
    assert used == [1]
    monkeypatch.setattr(cpu_native, "block_lse_fn", lambda kk: _block_lse_reference)
    want = dynamic_indices(p.table, entry.bias, entry.budget, q, k, None, None, B)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 9, 3, 700, 700, 64, 64), (2, 4, 1, 300, 900, 256, 16), (1, 2, 2, 33, 33, 40, 5),
                                   (1, 2, 1, 1, 50, 64, 1)])
def test_last_query_scores_take_the_fused_kernel(built, monkeypatch, shape):
    """The estimate's element scores on bf16 CPU tensors come from the kernel and equal the
    planner's own ops run in float64 on the same inputs (GQA, MQA, chunked prefill, odd D, n = 1)."""
    from dam.runtime import estimate

    Bt, Hq, Hkv, Nq, Nk, D, n = shape
    g = torch.Generator().manual_seed(Nk)
    q = torch.randn(Bt, Hq, Nq, D, generator=g).bfloat16()
    k = torch.randn(Bt, Hkv, Nk, D, generator=g).bfloat16()
    heads = list(range(0, Hq, 2)) if Hq > 2 else list(range(Hq))
    used = []
    real = cpu_native.last_query_fn
    monkeypatch.setattr(cpu_native, "last_query_fn", lambda kk: used.append(1) or real(kk))
    vert, slash = estimate.last_query_scores(q, k, heads, n, D ** -0.5)
    assert used == [1]
    monkeypatch.setattr(cpu_native, "last_query_fn", lambda kk: None)
    v64, s64 = estimate.last_query_scores(q.double(), k.double(), heads, n, D ** -0.5)
    # probabilities in [0, 1] summed over n rows, from fp32 scores: a few fp32 eps per term
    tol = 64 * torch.finfo(torch.float32).eps * n
    assert (vert.double() - v64).abs().max() <= tol and (slash.double() - s64).abs().max() <= tol


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 9, 700, 700, 64, 0.1, "uniform"), (2, 3, 300, 900, 16, 0.3, "adaptive"),
                                   (1, 2, 33, 33, 5, 0.5, "uniform"), (1, 4, 130, 257, 32, 1.0, "uniform"),
                                   (1, 2, 64, 128, 16, 0.0, "uniform")])
def test_block_choice_takes_the_kernel_and_equals_the_planners_ops(built, monkeypatch, shape):
    """The estimate's block choice on CPU from the kernel equals :func:`select_blocks`' own ops
    (full and ragged query blocks, chunked prefill, both shares, an exhausted and a zero budget,
    ties in the scores kept or dropped together)."""
    from dam.runtime import estimate

    Bt, He, Nq, Nk, B, fraction, share = shape
    g = torch.Generator().manual_seed(Nk + He)
    vert = torch.rand(Bt, He, Nk, generator=g)
    slash = torch.rand(Bt, He, Nk, generator=g)
    vert[..., ::7] = 0.5  # ties
    nqb, nkb = -(-Nq // B), -(-Nk // B)
    current = torch.rand(1, He, nqb, nkb, generator=g) < 0.3
    used = []
    real = cpu_native.host_fn
    monkeypatch.setattr(cpu_native, "host_fn", lambda name, t: used.append(name) or real(name, t))
    got = estimate.select_blocks(vert, slash, current, fraction, Nq, B, share)
    assert used == ["select_blocks"]
    monkeypatch.setattr(cpu_native, "host_fn", lambda name, t: None)
    want = estimate.select_blocks(vert, slash, current, fraction, Nq, B, share)
    assert got.dtype == torch.bool and torch.equal(got, want)


@needs_kernel
@pytest.mark.parametrize("width", [1, 5, 40])
def test_mask_layout_takes_the_kernel_and_equals_the_planners_ops(built, monkeypatch, width):
    """:func:`mask_to_layout` with a host width, on CPU, from the kernel: the same indices and
    counts as its own ops (rows over the width cut, empty rows)."""
    from dam.runtime.planner import mask_to_layout

    g = torch.Generator().manual_seed(width)
    mask = torch.rand(2, 3, 7, 40, generator=g) < 0.3
    mask[0, 1, 2] = False
    used = []
    real = cpu_native.host_fn
    monkeypatch.setattr(cpu_native, "host_fn", lambda name, t: used.append(name) or real(name, t))
    got = mask_to_layout(mask, 16, width)
    assert used == ["mask_layout"]
    monkeypatch.setattr(cpu_native, "host_fn", lambda name, t: None)
    want = mask_to_layout(mask, 16, width)
    assert torch.equal(got.kv_indices, want.kv_indices) and torch.equal(got.kv_counts, want.kv_counts)
