"""Block log-sum-exp of key-major scores: the eager form and the compiled CPU kernel equal a
float64 definition (ragged tails, excluded keys, blocks with no key left); no compiler or a
failed build means the eager form and one warning."""

from __future__ import annotations

import logging

import pytest
import torch

from dam.kernels import cpu_flex, scores
from dam.kernels.scores import block_logsumexp, block_logsumexp_eager


def _definition(s: torch.Tensor, B: int, bias: torch.Tensor | None) -> torch.Tensor:
    """float64, block by block with torch.logsumexp."""
    x = s.double() if bias is None else s.double() + bias.double()
    n = x.shape[-2]
    return torch.stack([torch.logsumexp(x[..., b:b + B, :], -2) for b in range(0, n, B)], -2)


def _case(shape, dtype, seed=0, masked=False):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * 4).to(dtype)
    bias = None
    if masked:  # the last 40 keys excluded: the last block(s) are -inf (no key left)
        bias = torch.zeros((*shape[:-2], shape[-2], 1))
        bias[..., shape[-2] - 40:, :] = float("-inf")
    return s, bias


def _tol(s):
    # the scores are exact in their dtype; the shift, exp, sum and log run in float32: a few
    # float32 roundings of values as large as the scores (and of log B)
    return dict(rtol=0, atol=16 * torch.finfo(torch.float32).eps * max(1.0, float(s.float().abs().max())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,B", [((2, 3, 130, 7), 16), ((96, 5), 32), ((1, 1, 64, 9), 64)])
@pytest.mark.parametrize("masked", [False, True])
def test_eager_equals_definition(dtype, shape, B, masked):
    s, bias = _case(shape, dtype, masked=masked)
    got = block_logsumexp_eager(s, B, bias)
    want = _definition(s, B, bias)
    assert got.dtype == torch.float32 and got.shape == want.shape
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)  # -inf exactly where no key is left
    torch.testing.assert_close(got[finite].double(), want[finite], **_tol(s))


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv("DAM_CPU_FLEX", "sync")
    monkeypatch.setattr(scores, "BUILD_FROM_KEYS", 1)
    monkeypatch.setattr(scores, "_BUILT", {})


@pytest.mark.slow
def test_compiled_equals_definition_and_runs(compiled, monkeypatch):
    ran = []
    real = scores._per_matrix
    monkeypatch.setattr(scores, "_per_matrix", lambda fn, *a: ran.append(fn is not scores._EAGER) or real(fn, *a))
    for shape, B, masked in (((2, 3, 130, 7), 16, False), ((300, 11), 16, True), ((1, 1, 64, 9), 16, False)):
        s, bias = _case(shape, torch.bfloat16, masked=masked)
        got = block_logsumexp(s, B, bias)
        want = _definition(s, B, bias)
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite)
        torch.testing.assert_close(got[finite].double(), want[finite], **_tol(s))
    assert any(ran)  # the compiled kernel served the calls after its build
    assert all(e.state == "ready" for e in scores._BUILT.values())


def test_no_compiler_or_failed_build_means_eager(compiled, monkeypatch, caplog):
    s, _ = _case((2, 200, 5), torch.bfloat16)
    want = block_logsumexp_eager(s, 16)
    monkeypatch.setattr(cpu_flex, "_WARNED", set())
    monkeypatch.setattr(scores, "_function", lambda: (_ for _ in ()).throw(RuntimeError("no kernel today")))
    with caplog.at_level(logging.WARNING, logger="dam.kernels.cpu_flex"):
        for _ in range(3):
            assert torch.equal(block_logsumexp(s, 16), want)
    assert sum("no kernel today" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(cpu_flex, "_NO_COMPILER", ["no C++ compiler (test)"])
    monkeypatch.setattr(scores, "_BUILT", {})
    monkeypatch.setattr(scores, "_build", lambda *a: pytest.fail("tried to build without a compiler"))
    assert torch.equal(block_logsumexp(s, 16), want)


def test_off_and_short_calls_build_nothing(monkeypatch):
    monkeypatch.setattr(scores, "_BUILT", {})
    monkeypatch.setattr(scores, "_build", lambda *a: pytest.fail("built"))
    s, _ = _case((100, 5), torch.float32)
    monkeypatch.setenv("DAM_CPU_FLEX", "0")
    block_logsumexp(s, 16)
    monkeypatch.setenv("DAM_CPU_FLEX", "sync")  # 100 keys < BUILD_FROM_KEYS
    block_logsumexp(s, 16)
    assert not scores._BUILT
