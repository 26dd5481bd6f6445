"""The compiled FlexAttention CPU path: equal to the float64 reference where it runs, the ATen path
before its build is ready, after a failed build (one warning) and where it cannot run."""

from __future__ import annotations

import logging

import pytest
import torch

from dam.kernels import BlockLayout, block_sparse_attention, cpu_flex
from dam.kernels import cpu as aten_cpu
from dam.kernels.reference import attention_reference

from .helpers import out_atol


def _case(dtype, nq, nk, hq, hkv, lh, bm, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, nq, 16, generator=g).to(dtype)
    k = torch.randn(1, hkv, nk, 16, generator=g).to(dtype)
    v = torch.randn(1, hkv, nk, 16, generator=g).to(dtype)
    nqb, nkb = -(-nq // bm), -(-nk // bm)
    last_q = (nk - nq) + torch.arange(nqb).view(-1, 1) * bm + bm - 1
    causal = torch.arange(nkb).view(1, -1) * bm <= last_q
    mask = causal & (torch.rand(lh, nqb, nkb, generator=g) < 0.5)
    mask[:, :, 0] |= causal[:, 0]
    mask[0, 1] = False  # a query block that keeps nothing: 0 out
    return q, k, v, BlockLayout.from_block_mask(mask.unsqueeze(0).contiguous(), bm, bm)


def _tol(dtype, v):
    return dict(rtol=0, atol=out_atol(dtype, float(v.abs().max())))


@pytest.fixture(autouse=True)
def _small_calls_build(monkeypatch):
    monkeypatch.setattr(cpu_flex, "BUILD_FROM_KEYS", 1)
    monkeypatch.setenv("DAM_CPU_NATIVE", "0")  # the FlexAttention kernel under test, not DAM's own


@pytest.fixture
def sync(monkeypatch):
    monkeypatch.setenv("DAM_CPU_FLEX", "sync")
    ran = []
    real = cpu_flex._run
    monkeypatch.setattr(cpu_flex, "_run", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    return ran


# one signature per dtype (each costs a compiler build): per-head and shared layouts, GQA,
# chunked (Nq < Nk) and ragged tails, empty rows
CASES = [(torch.bfloat16, 200, 200, 4, 2, 4, 16), (torch.bfloat16, 150, 230, 4, 2, 1, 32)]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=["per-head-16", "shared-32-chunked"])
def test_flex_path_equals_reference(sync, case):
    dtype = case[0]
    for seed in (0, 1):
        q, k, v, lay = _case(*case, seed=seed)
        out = block_sparse_attention(q, k, v, lay, backend="cpu")
        ref = attention_reference(q.double(), k.double(), v.double(), lay, causal=True)[0]
        torch.testing.assert_close(out.double(), ref, **_tol(dtype, v))
    assert len(sync) >= 2  # the compiled kernel ran (after its build's own check)


def test_lse_non_causal_and_fp32_calls_take_the_aten_path(sync):
    q, k, v, lay = _case(*CASES[0])
    before = len(sync)
    out, lse = block_sparse_attention(q, k, v, lay, backend="cpu", return_lse=True)
    ref, rlse = attention_reference(q.double(), k.double(), v.double(), lay, causal=True)
    torch.testing.assert_close(out.double(), ref, **_tol(torch.bfloat16, v))
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    block_sparse_attention(q, k, v, lay, backend="cpu", causal=False)
    block_sparse_attention(q.float(), k.float(), v.float(), lay, backend="cpu")
    assert len(sync) == before


@pytest.mark.slow
def test_background_build_serves_aten_until_ready(monkeypatch):
    monkeypatch.setenv("DAM_CPU_FLEX", "background")
    monkeypatch.setattr(cpu_flex, "_KERNELS", {})
    aten = []
    real = aten_cpu.attention_cpu
    monkeypatch.setattr(aten_cpu, "attention_cpu", lambda *a, **kw: aten.append(1) or real(*a, **kw))
    started = []
    real_build = cpu_flex._build
    monkeypatch.setattr(cpu_flex, "_build", lambda *a: started.append(1) or real_build(*a))
    q, k, v, lay = _case(*CASES[0])
    ref = attention_reference(q.double(), k.double(), v.double(), lay, causal=True)[0]
    first = block_sparse_attention(q, k, v, lay, backend="cpu")  # starts the build, runs ATen
    assert aten == [1]
    cpu_flex.wait_for_builds()
    assert started == [1] and cpu_flex.ready_signatures()
    second = block_sparse_attention(q, k, v, lay, backend="cpu")  # the compiled kernel now
    assert aten == [1]
    for out in (first, second):
        torch.testing.assert_close(out.double(), ref, **_tol(torch.bfloat16, v))


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("DAM_CPU_FLEX", "sync")
    monkeypatch.setattr(cpu_flex, "_KERNELS", {})
    monkeypatch.setattr(cpu_flex, "_WARNED", set())

    def broken():
        def fail(*a, **kw):
            raise RuntimeError("no kernel today")
        return fail

    monkeypatch.setattr(cpu_flex, "_compiled", broken)
    q, k, v, lay = _case(*CASES[0])
    ref = attention_reference(q.double(), k.double(), v.double(), lay, causal=True)[0]
    with caplog.at_level(logging.WARNING, logger="dam.kernels.cpu_flex"):
        for _ in range(3):
            out = block_sparse_attention(q, k, v, lay, backend="cpu")
            torch.testing.assert_close(out.double(), ref, **_tol(torch.bfloat16, v))
    warnings = [r for r in caplog.records if "no kernel today" in r.getMessage()]
    assert len(warnings) == 1 and "ATen" in warnings[0].getMessage()


def test_no_compiler_means_aten_and_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("DAM_CPU_FLEX", "sync")
    monkeypatch.setattr(cpu_flex, "_WARNED", set())
    monkeypatch.setattr(cpu_flex, "_NO_COMPILER", [])
    monkeypatch.setattr(cpu_flex.shutil, "which", lambda name: None)
    monkeypatch.setattr(cpu_flex, "_build", lambda *a: pytest.fail("tried to build without a compiler"))
    q, k, v, lay = _case(*CASES[0])
    with caplog.at_level(logging.WARNING, logger="dam.kernels.cpu_flex"):
        block_sparse_attention(q, k, v, lay, backend="cpu")
        block_sparse_attention(q, k, v, lay, backend="cpu")
    assert sum("C++ compiler" in r.getMessage() for r in caplog.records) == 1


def test_short_calls_start_no_build(monkeypatch):
    monkeypatch.setenv("DAM_CPU_FLEX", "sync")
    monkeypatch.setattr(cpu_flex, "_KERNELS", {})
    monkeypatch.setattr(cpu_flex, "BUILD_FROM_KEYS", 10_000)
    monkeypatch.setattr(cpu_flex, "_build", lambda *a: pytest.fail("a short call started a build"))
    q, k, v, lay = _case(*CASES[0])
    ref = attention_reference(q.double(), k.double(), v.double(), lay, causal=True)[0]
    torch.testing.assert_close(block_sparse_attention(q, k, v, lay, backend="cpu").double(), ref,
                               **_tol(torch.bfloat16, v))
    assert not cpu_flex._KERNELS


def test_mode_switch(monkeypatch):
    for value, want in (("0", "off"), ("off", "off"), ("sync", "sync"), ("", "background"),
                        ("background", "background")):
        monkeypatch.setenv("DAM_CPU_FLEX", value)
        assert cpu_flex.mode() == want


def test_attention_mode_follows_amx_unless_asked(monkeypatch):
    """Unset DAM_CPU_FLEX: the compiled attention kernel on AMX-BF16 CPUs only; an explicit value wins."""
    monkeypatch.delenv("DAM_CPU_FLEX", raising=False)
    for flags, want in ((frozenset({"avx512_bf16"}), "off"), (frozenset({"amx_bf16", "avx512_bf16"}), "background"),
                        (frozenset(), "off")):
        monkeypatch.setattr(cpu_flex, "cpu_flags", lambda flags=flags: flags)
        assert cpu_flex.attention_mode() == want
    monkeypatch.setenv("DAM_CPU_FLEX", "sync")
    assert cpu_flex.attention_mode() == "sync"
    monkeypatch.setenv("DAM_CPU_FLEX", "0")
    monkeypatch.setattr(cpu_flex, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert cpu_flex.attention_mode() == "off"
