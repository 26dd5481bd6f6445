"""The attention call: prefill / chunked prefill / decode / padding against an independent
float64 reference built from MaskProgram.block_mask (the definition)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dam.compiler import Artifact, MaskProgram
from dam.runtime import DamHandle, RuntimeConfig

from ._helpers import FP32_TOL, MIXED_PROGRAMS, STATIC_PROGRAMS, reference_attention

BACKENDS = ["reference"]
try:  # the kernels' CPU path, once it exists
    from dam.kernels import block_sparse_attention, block_sparse_decode  # noqa: F401

    BACKENDS.append("cpu")
except ImportError:  # pragma: no cover
    pass


def _handle(programs, block_size=16, backend="reference", heads=None):
    H = heads or len(programs)
    hp = np.arange(H, dtype=np.int32)[None, :] % len(programs)
    art = Artifact(programs=tuple(programs), head_program=hp, block_size=block_size)
    return DamHandle(None, art, RuntimeConfig(backend=backend, min_length=1, decode="sparse"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,Nk,hkv", [(97, 97, 4), (1000, 1000, 1), (40, 301, 2), (1, 1025, 4), (1, 97, 1)])
def test_attend_equals_definition(backend, N, Nk, hkv):
    H, D = 4, 16
    h = _handle(STATIC_PROGRAMS, backend=backend)
    q, k, v = torch.randn(2, H, N, D), torch.randn(2, hkv, Nk, D), torch.randn(2, hkv, Nk, D)
    q = q * 3  # peaked attention, so a wrong mask shows
    out = h._attend(0, q, k, v, None, 0.3, None)
    assert out.shape == (2, H, N, D) and out.dtype == torch.float32
    ref = reference_attention(q, k, v, STATIC_PROGRAMS, 16, scale=0.3)
    torch.testing.assert_close(out.double(), ref, **FP32_TOL)


def _pad(x, valid, garbage=1e3):
    """Scatter rows x [H, n, D] into a padded [H, len(valid), D] at the True slots; pads = garbage."""
    out = torch.full((x.shape[0], valid.numel(), x.shape[-1]), garbage)
    out[:, valid] = x
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("programs", [STATIC_PROGRAMS, MIXED_PROGRAMS], ids=["static", "dynamic"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prefill_and_decode_rows_equal_alone(backend, programs, side):
    H, hkv, D, Nk = len(programs), 1, 16, 130
    h = _handle(programs, backend=backend)
    lens = [130, 97, 33, 1]
    for N in (Nk, 1):  # prefill, then decode over a padded cache
        qs, ks, vs, valid = [], [], [], []
        alone = []
        for n in lens:
            pos = torch.zeros(Nk, dtype=torch.bool)
            if side == "left":
                pos[Nk - n:] = True
            else:
                pos[:n] = True
            qn = torch.randn(H, min(n, N), D) * 3
            kn, vn = torch.randn(hkv, n, D), torch.randn(hkv, n, D)
            alone.append(h._attend(0, qn[None], kn[None], vn[None], None, None, None)[0])
            ks.append(_pad(kn, pos))
            vs.append(_pad(vn, pos))
            qv = pos[Nk - N:]
            if N == 1 and side == "right" and n < Nk:
                qv = torch.zeros(1, dtype=torch.bool)  # a right-padded row's decode slot is padding
            qs.append(_pad(qn if qv.any() else qn[:, :0], qv))
            valid.append(pos if not (N == 1 and not qv.any()) else pos & (torch.arange(Nk) < Nk - 1))
        q, k, v = torch.stack(qs), torch.stack(ks), torch.stack(vs)
        mask = torch.stack(valid)
        out = h._attend(0, q, k, v, mask, None, None)
        assert torch.isfinite(out).all()
        for b in range(len(lens)):
            qv = mask[b, Nk - N:]
            if qv.any():
                torch.testing.assert_close(out[b][:, qv], alone[b][:, -int(qv.sum()):], **FP32_TOL)
            assert (out[b][:, ~qv] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_with_padded_cache_rows_equal_alone(backend):
    """Several queries over a cache that holds padding: the per-row path."""
    H, hkv, D = 4, 2, 16
    h = _handle(MIXED_PROGRAMS, backend=backend, heads=H)
    Nk, N = 150, 37
    lens = [150, 120]
    qs, ks, vs, masks, alone = [], [], [], [], []
    for n in lens:
        pos = torch.zeros(Nk, dtype=torch.bool)
        pos[Nk - n:] = True
        qn = torch.randn(H, N, D) * 3
        kn, vn = torch.randn(hkv, n, D), torch.randn(hkv, n, D)
        alone.append(h._attend(0, qn[None], kn[None], vn[None], None, None, None)[0])
        qs.append(qn)
        ks.append(_pad(kn, pos))
        vs.append(_pad(vn, pos))
        masks.append(pos)
    out = h._attend(0, torch.stack(qs), torch.stack(ks), torch.stack(vs), torch.stack(masks), None, None)
    for b in range(2):
        torch.testing.assert_close(out[b], alone[b], **FP32_TOL)


def test_short_and_sliding_calls_are_dense():
    H, D = 4, 16
    art = Artifact(programs=STATIC_PROGRAMS, head_program=np.arange(4, dtype=np.int32)[None], block_size=16)
    h = DamHandle(None, art, RuntimeConfig(backend="reference", min_length=200))
    q, k, v = torch.randn(1, H, 150, D), torch.randn(1, 2, 150, D), torch.randn(1, 2, 150, D)
    dense = reference_attention(q, k, v, [STATIC_PROGRAMS[1]] * 4, 16)
    torch.testing.assert_close(h._attend(0, q, k, v, None, None, None).double(), dense, **FP32_TOL)
    h2 = DamHandle(None, art, RuntimeConfig(backend="reference", min_length=1))
    out = h2._attend(0, q, k, v, None, None, 10)  # sliding window 10 < 150: dense + window
    i, j = torch.arange(150)[:, None], torch.arange(150)[None]
    m = (j <= i) & (i - j < 10)
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 4
    want = torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ v.double().repeat_interleave(2, 1)
    torch.testing.assert_close(out.double(), want, **FP32_TOL)


def test_runtime_config_checks():
    from dam.runtime import DamRuntimeError

    with pytest.raises(DamRuntimeError, match="backend"):
        RuntimeConfig(backend="gpu")
    with pytest.raises(DamRuntimeError, match="min_length"):
        RuntimeConfig(min_length=0)
    with pytest.raises(DamRuntimeError, match="block_size"):
        RuntimeConfig(block_size=48)
    with pytest.raises(DamRuntimeError, match="decode"):
        RuntimeConfig(decode="fast")


def test_dense_rule_bound_covers_the_plan():
    """The planner's density bound, known before any tensor is read, is >= the density it plans
    (static + dynamic + last-query blocks), per length."""
    from dam.runtime import Planner

    progs = MIXED_PROGRAMS
    p = Planner(progs, 16, last_query=0.2, last_query_queries=8)
    for n in (97, 160, 301):
        q, k = torch.randn(1, len(progs), n, 16) * 3, torch.randn(1, 1, n, 16) * 3
        lay = p.plan(n, n, q, k, scale=0.3)
        nqb = -(-n // 16)
        causal = torch.arange(nqb) + 1  # Nq == Nk: query block a sees a + 1 KV blocks
        planned = float(lay.kv_counts.sum()) / (len(progs) * float(causal.sum()))
        bound = p.density_bound(n, n)
        assert planned <= bound + 1e-12 and bound <= 1.0
    assert Planner((MaskProgram(dense=True),), 16).density_bound(100, 100) == 1.0


def test_dense_rule_runs_dense_above_the_threshold_unplanned(monkeypatch):
    """Above ``dense_above`` a prefill call is dense SDPA and never plans; below it, sparse."""
    import torch.nn.functional as F

    from dam.runtime import Planner

    H, D, N = 4, 16, 200
    q, k, v = torch.randn(1, H, N, D) * 3, torch.randn(1, 2, N, D) * 3, torch.randn(1, 2, N, D)
    bound = Planner(STATIC_PROGRAMS, 16).density_bound(N, N)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                           is_causal=True, scale=0.3)
    art = Artifact(programs=STATIC_PROGRAMS, head_program=np.arange(H, dtype=np.int32)[None], block_size=16)
    above = DamHandle(None, art, RuntimeConfig(backend="cpu", min_length=1, dense_above=bound * 0.99))
    monkeypatch.setattr(Planner, "plan", lambda *a, **kw: pytest.fail("planned a dense call"))
    torch.testing.assert_close(above._attend(0, q, k, v, None, 0.3, None), dense, **FP32_TOL)
    monkeypatch.undo()
    below = DamHandle(None, art, RuntimeConfig(backend="cpu", min_length=1, dense_above=min(1.0, bound * 1.01)))
    ref = reference_attention(q, k, v, STATIC_PROGRAMS, 16, scale=0.3)
    torch.testing.assert_close(below._attend(0, q, k, v, None, 0.3, None).double(), ref, **FP32_TOL)
    assert not torch.allclose(ref.float(), dense, **FP32_TOL)  # the two paths differ here


@pytest.mark.parametrize("kernel_mode,key", [("background", "cpu"), ("off", "cpu:aten")])
def test_dense_rule_default_threshold_by_device_dtype_and_kernel(monkeypatch, kernel_mode, key):
    """16-bit CPU prefill takes the break-even of the kernel that runs it (compiled or ATen; fp16,
    which no compiled kernel takes, always ATen's)."""
    from dam.kernels import cpu_flex
    from dam.runtime.integration import DENSE_ABOVE, _threshold_at, rule_device

    monkeypatch.setattr(cpu_flex, "attention_mode", lambda: kernel_mode)
    cfg = RuntimeConfig()
    cpu = torch.device("cpu")
    assert rule_device(cpu, torch.bfloat16) == key and rule_device(cpu, torch.float16) == "cpu:aten"
    assert rule_device(cpu, torch.float32) == "cpu"
    for n in (1024, 4096, 6000, 8192, 20000, None):
        assert cfg.dense_threshold(cpu, torch.bfloat16, n) == _threshold_at(DENSE_ABOVE[(key, torch.bfloat16)], n)
    assert cfg.dense_threshold(cpu, torch.float32, 8192) == _threshold_at(DENSE_ABOVE[("cpu", None)], 8192)
    assert DENSE_ABOVE[("cpu", torch.bfloat16)] != DENSE_ABOVE[("cpu:aten", torch.bfloat16)]
    # points: held past the ends, interpolated in log2(length) between them
    pts = ((4096, 0.1), (16384, 0.3))
    assert _threshold_at(pts, 1000) == 0.1 and _threshold_at(pts, 10 ** 6) == 0.3 and _threshold_at(pts, None) == 0.3
    assert _threshold_at(pts, 8192) == pytest.approx(0.2)
    assert _threshold_at(0.7, 123) == 0.7
    assert RuntimeConfig(dense_above=0.25).dense_threshold(cpu, torch.bfloat16) == 0.25
    for bad in (0.0, 1.5, True, "0.5"):
        with pytest.raises(Exception, match="dense_above"):
            RuntimeConfig(dense_above=bad)


def test_dense_rule_against_vllms_kernel(monkeypatch):
    """``dense_kernel="vllm"`` takes the break-even measured against vLLM's kernel where one is
    recorded (CPU bf16 with the compiled kernel), else the device's own; an explicit
    ``dense_above`` still wins; an unknown kernel is refused."""
    from dam.kernels import cpu_flex
    from dam.runtime.integration import DENSE_ABOVE, _threshold_at

    monkeypatch.setattr(cpu_flex, "attention_mode", lambda: "background")
    cpu = torch.device("cpu")
    vl, sd = RuntimeConfig(dense_kernel="vllm"), RuntimeConfig()
    assert DENSE_ABOVE[("cpu:vllm", torch.bfloat16)] != DENSE_ABOVE[("cpu", torch.bfloat16)]
    for n in (2048, 4096, 8100):
        assert vl.dense_threshold(cpu, torch.bfloat16, n) == _threshold_at(DENSE_ABOVE[("cpu:vllm", torch.bfloat16)], n)
    assert vl.dense_threshold(cpu, torch.float16, 8192) == sd.dense_threshold(cpu, torch.float16, 8192)  # none: ATen's
    assert vl.dense_threshold(cpu, torch.float32, 8192) == sd.dense_threshold(cpu, torch.float32, 8192)
    assert RuntimeConfig(dense_kernel="vllm", dense_above=0.3).dense_threshold(cpu, torch.bfloat16, 8192) == 0.3
    with pytest.raises(Exception, match="dense_kernel"):
        RuntimeConfig(dense_kernel="flash")


def test_dense_rule_in_padded_batches(monkeypatch):
    """A padded batch applies the dense rule per row, as each row would alone: every row above
    the threshold -> masked dense SDPA for the batch, nothing planned; rows on both sides -> each
    row equals its own call."""
    from dam.runtime import Planner

    H, D = 4, 16
    lens = (200, 120)
    N = max(lens)
    q, k, v = torch.randn(2, H, N, D) * 3, torch.randn(2, 2, N, D) * 3, torch.randn(2, 2, N, D)
    valid = torch.zeros(2, N, dtype=torch.bool)
    for b, n in enumerate(lens):
        valid[b, N - n:] = True  # left padding
    bounds = [Planner(STATIC_PROGRAMS, 16).density_bound(n, n) for n in lens]
    assert bounds[0] != bounds[1]
    art = Artifact(programs=STATIC_PROGRAMS, head_program=np.arange(H, dtype=np.int32)[None], block_size=16)

    def alone(handle, b):
        n = lens[b]
        return handle._attend(0, q[b:b + 1, :, N - n:], k[b:b + 1, :, N - n:], v[b:b + 1, :, N - n:], None, 0.3,
                              None)[0]

    low = DamHandle(None, art, RuntimeConfig(backend="cpu", min_length=1, dense_above=min(bounds) * 0.9))
    monkeypatch.setattr(Planner, "plan", lambda *a, **kw: pytest.fail("planned a dense call"))
    monkeypatch.setattr(Planner, "plan_ragged", lambda *a, **kw: pytest.fail("planned a dense call"))
    out = low._attend(0, q, k, v, valid, 0.3, None)
    for b, n in enumerate(lens):
        torch.testing.assert_close(out[b, :, N - n:], alone(low, b), **FP32_TOL)
        assert not out[b, :, : N - n].any()  # padded query rows are zero
    monkeypatch.undo()
    mid = DamHandle(None, art, RuntimeConfig(backend="cpu", min_length=1, dense_above=sum(bounds) / 2))
    out = mid._attend(0, q, k, v, valid, 0.3, None)
    for b, n in enumerate(lens):
        torch.testing.assert_close(out[b, :, N - n:], alone(mid, b), **FP32_TOL)
    sparse = DamHandle(None, art, RuntimeConfig(backend="cpu", min_length=1, dense_above=1.0))
    assert not torch.allclose(alone(sparse, 0), alone(low, 0), **FP32_TOL)  # the two paths differ


def test_public_attend_and_runs_sparse_agree_with_what_runs(monkeypatch):
    """``attend`` is the installed computation; ``runs_sparse`` says whether it runs a sparse
    kernel (a serving engine sends the other calls to its own dense kernel)."""
    from dam.runtime import _kernels
    from dam.runtime import integration as integ

    H, D, N = 4, 16, 200
    q, k, v = torch.randn(1, H, N, D) * 3, torch.randn(1, 2, N, D), torch.randn(1, 2, N, D)
    sparse_calls = []
    real = _kernels.sparse_prefill
    monkeypatch.setattr(_kernels, "sparse_prefill", lambda *a, **kw: sparse_calls.append(1) or real(*a, **kw))
    cases = [  # (programs, min_length, dense_above, runs sparse)
        (STATIC_PROGRAMS, 1, None, True),
        (STATIC_PROGRAMS, N + 1, None, False),  # below min_length
        ((MaskProgram(dense=True),), 1, None, False),  # a layer of dense programs
        (STATIC_PROGRAMS, 1, 1e-6, False),  # over the dense rule's break-even
    ]
    for programs, min_length, dense_above, want in cases:
        hp = np.arange(H, dtype=np.int32)[None, :] % len(programs)
        art = Artifact(programs=tuple(programs), head_program=hp, block_size=16)
        h = integ.DamHandle(None, art, RuntimeConfig(backend="cpu", min_length=min_length, dense_above=dense_above))
        sparse_calls.clear()
        assert h.runs_sparse(0, N, N, "cpu", torch.float32) is want
        out = h.attend(0, q, k, v, 0.3)
        assert bool(sparse_calls) is want
        ref_programs = programs if want else (MaskProgram(dense=True),) * H  # dense: full causal
        ref = reference_attention(q, k, v, ref_programs, 16, scale=0.3)
        torch.testing.assert_close(out.double(), ref, **FP32_TOL)
