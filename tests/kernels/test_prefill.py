"""block_sparse_attention (Triton under the interpreter, and the CPU path) vs the float64 reference."""

from __future__ import annotations

import pytest
import torch

from dam.kernels import BlockLayout, block_sparse_attention, merge_attention, reference

from .helpers import (
    assert_close_to_reference,
    backend_device,
    causal_local_mask,
    layout_from,
    mixed_block_mask,
    out_atol,
    poisoned,
)

# (B, Hq, Hkv, Nq, Nk, block_m, block_n, D, causal) -- small enough for the interpreter
TRITON_CASES = [
    (1, 2, 2, 1, 1, 16, 16, 64, True),
    (2, 3, 1, 97, 97, 16, 32, 64, True),  # GQA 3, ragged
    (1, 4, 1, 33, 256, 32, 16, 128, True),  # GQA 4, chunked prefill, block_m > block_n
    (1, 8, 1, 20, 1025, 16, 64, 64, True),  # GQA 8, Nk = 1025
    (1, 2, 2, 97, 130, 16, 16, 40, False),  # non-causal, D padded to 64
    (1, 4, 2, 64, 1000, 64, 64, 96, True),  # D = 96 padded to 128
    (1, 4, 1, 70, 70, 16, 16, 256, True),  # Gemma 3: MQA, head_dim 256
]
# the CPU path takes the bigger sizes
CPU_CASES = [
    (1, 8, 8, 1025, 1025, 64, 64, 64, True),
    (2, 6, 2, 1000, 1000, 32, 64, 64, True),  # GQA 3, block_m < block_n
    (1, 8, 2, 256, 1025, 64, 32, 128, True),  # GQA 4, chunked
    (1, 8, 1, 97, 97, 16, 16, 40, False),  # GQA 8, non-causal
    (1, 4, 4, 1, 1000, 16, 64, 64, True),  # a single query
    (1, 4, 2, 300, 301, 128, 16, 64, True),  # block_m > block_n, queries offset by 1
    (1, 4, 1, 520, 520, 64, 64, 256, True),  # Gemma 3: MQA, head_dim 256
]


def _run_case(backend, case, dtype, *, shared_gqa=False, layout_heads=None, realistic=False,
              with_lse=True, softcap=None):
    b, hq, hkv, nq, nk, bm, bn, d, causal = case
    dev = backend_device(backend)
    q = torch.randn(b, hq, nq, d, dtype=dtype, device=dev)
    k = torch.randn(b, hkv, nk, d, dtype=dtype, device=dev)
    v = torch.randn(b, hkv, nk, d, dtype=dtype, device=dev)
    nqb, nkb = -(-nq // bm), -(-nk // bn)
    lh = layout_heads or (hkv if shared_gqa else hq)
    bl = b if b > 1 else 1
    if realistic:
        mask = causal_local_mask(bl, lh, nq, nk, bm, bn, 0.2)
    else:
        mask = mixed_block_mask(bl, lh, nqb, nkb)
    if shared_gqa:
        mask = mask.repeat_interleave(hq // hkv, dim=1)
    layout = layout_from(mask, bm, bn, dev)
    out = poisoned(q.shape, dtype, dev)
    if softcap is not None:  # scores large enough that the cap bends them
        q = q * 4
    ref_out, ref_lse = reference.attention_reference(q, k, v, layout.to("cpu"), causal=causal, softcap=softcap)
    if softcap is not None:
        plain = reference.attention_reference(q, k, v, layout.to("cpu"), causal=causal)[0]
        assert (plain - ref_out).abs().max() > 0.05
    if not with_lse:  # the path that skips the LSE bookkeeping
        res = block_sparse_attention(q, k, v, layout, causal=causal, backend=backend, out=out, softcap=softcap)
        assert res is out
        tol = out_atol(dtype, float(v.abs().max()))
        assert not torch.isnan(out).any()
        assert (out.double().cpu() - ref_out).abs().max().item() <= tol
        return
    lse = poisoned((b, hq, nq), torch.float32, dev)
    res = block_sparse_attention(
        q, k, v, layout, causal=causal, return_lse=True, backend=backend, out=out, lse_out=lse, softcap=softcap
    )
    assert res[0] is out and res[1] is lse
    assert_close_to_reference(out, lse, ref_out, ref_lse, dtype, float(v.abs().max()))


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(case, dtype):
    _run_case("triton", case, dtype)


def test_triton_bf16_upcast_under_interpreter():
    _run_case("triton", (1, 4, 2, 50, 77, 16, 16, 64, True), torch.bfloat16)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_reference(case, dtype):
    _run_case("cpu", case, dtype)


@pytest.mark.parametrize("case", [CPU_CASES[2], CPU_CASES[-1]], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_softcap_matches_reference(case, dtype):
    """Attention-logit soft-capping (Gemma 2): the CPU path's explicit-score tiles and dense prefixes."""
    _run_case("cpu", case, dtype, softcap=2.0)
    _run_case("cpu", case, dtype, softcap=2.0, shared_gqa=case[1] != case[2])


@pytest.mark.parametrize("case", [TRITON_CASES[1], TRITON_CASES[2], TRITON_CASES[-1]],
                         ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_softcap_matches_reference(case, dtype):
    _run_case("triton", case, dtype, softcap=2.0)


@pytest.mark.parametrize("case", CPU_CASES[:3], ids=lambda c: "x".join(map(str, c)))
def test_cpu_without_lse(case):
    _run_case("cpu", case, torch.float32, with_lse=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_inputs(dtype):
    _run_case("cpu", (1, 4, 2, 200, 333, 32, 32, 64, True), dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("ratio", [1, 3, 4, 8])
def test_gqa_ratios(backend, ratio):
    hkv = 2 if backend == "cpu" else 1
    case = (1, ratio * hkv, hkv, 70, 150, 16, 16, 64, True)
    _run_case(backend, case, torch.float32)


@pytest.mark.parametrize("ratio", [2, 4])
def test_cpu_shared_gqa_layout_and_realistic(ratio):
    """Query heads of a KV group share their layout rows: the CPU path stacks them."""
    _run_case("cpu", (2, 2 * ratio, 2, 513, 1025, 64, 64, 64, True), torch.float32,
              shared_gqa=True, realistic=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_layout_shared_by_heads_and_batch(backend):
    _run_case(backend, (2, 4, 2, 40, 90, 16, 16, 64, True), torch.float32, layout_heads=1)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_lse_merge_of_two_halves_equals_whole(backend):
    """Split each row's kept blocks into two disjoint layouts; merging by LSE gives the whole."""
    dev = backend_device(backend)
    b, hq, hkv, nq, nk, bm, bn, d = 1, 4, 2, 90, 200, 16, 16, 64
    q = torch.randn(b, hq, nq, d, device=dev)
    k = torch.randn(b, hkv, nk, d, device=dev)
    v = torch.randn(b, hkv, nk, d, device=dev)
    mask = mixed_block_mask(1, hq, -(-nq // bm), -(-nk // bn), p=0.6)
    half = torch.rand(mask.shape) < 0.5
    whole_l, a_l, b_l = (layout_from(m, bm, bn, dev) for m in (mask, mask & half, mask & ~half))
    kw = dict(return_lse=True, backend=backend)
    o, lse = block_sparse_attention(q, k, v, whole_l, **kw)
    oa, la = block_sparse_attention(q, k, v, a_l, **kw)
    ob, lb = block_sparse_attention(q, k, v, b_l, **kw)
    om, lm = merge_attention(oa, la, ob, lb)
    tol = out_atol(torch.float32, float(v.abs().max()))
    assert torch.allclose(om, o, atol=tol, rtol=0)
    assert torch.equal(torch.isneginf(lm), torch.isneginf(lse))
    fin = torch.isfinite(lse)
    assert torch.allclose(lm[fin], lse[fin], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_chunked_prefill_equals_whole(backend):
    """Prefill in two query chunks (the second attends to the first's keys) equals one pass."""
    dev = backend_device(backend)
    b, hq, hkv, n, bm, bn, d = 1, 3, 1, 161, 32, 16, 64
    q = torch.randn(b, hq, n, d, device=dev)
    k = torch.randn(b, hkv, n, d, device=dev)
    v = torch.randn(b, hkv, n, d, device=dev)
    nqb, nkb = -(-n // bm), -(-n // bn)
    mask = causal_local_mask(1, hq, n, n, bm, bn, 0.3)
    whole = block_sparse_attention(q, k, v, layout_from(mask, bm, bn, dev), backend=backend)
    split_qb = 3
    n1 = split_qb * bm
    l1 = layout_from(mask[:, :, :split_qb, : -(-n1 // bn)], bm, bn, dev)
    l2 = layout_from(mask[:, :, split_qb:nqb, :nkb], bm, bn, dev)
    o1 = block_sparse_attention(q[:, :, :n1], k[:, :, :n1], v[:, :, :n1], l1, backend=backend)
    o2 = block_sparse_attention(q[:, :, n1:], k, v, l2, backend=backend)
    tol = out_atol(torch.float32, float(v.abs().max()))
    assert torch.allclose(torch.cat([o1, o2], dim=2), whole, atol=tol, rtol=0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_full_layout_equals_dense_sdpa(backend):
    """All blocks kept + causal == dense causal SDPA (independent of our reference)."""
    dev = backend_device(backend)
    q = torch.randn(1, 2, 97, 64, device=dev)
    k = torch.randn(1, 2, 97, 64, device=dev)
    v = torch.randn(1, 2, 97, 64, device=dev)
    lay = layout_from(torch.ones(1, 2, 4, 4, dtype=torch.bool), 32, 32, dev)
    ours = block_sparse_attention(q, k, v, lay, backend=backend)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(ours, sdpa, atol=out_atol(torch.float32, float(v.abs().max())), rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_thread_counts(threads):
    """The CPU path is right with one and with two intra-op threads and leaves the count alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _run_case("cpu", (1, 4, 2, 300, 500, 32, 32, 64, True), torch.float32)
        _run_case("cpu", (1, 4, 2, 300, 500, 32, 32, 64, True), torch.float32, shared_gqa=True)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_scale_and_default_scale():
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    lay = BlockLayout.from_block_mask(torch.ones(1, 2, 3, 3, dtype=torch.bool), 16, 16)
    o1 = block_sparse_attention(q, k, v, lay, scale=0.3, backend="cpu")
    o2 = block_sparse_attention(q * (0.3 * 32**0.5), k, v, lay, backend="cpu")
    assert torch.allclose(o1, o2, atol=1e-5)


def test_auto_backend_follows_interpreter_flag(monkeypatch):
    import dam.kernels.ops as ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops._resolve_backend("auto", torch.device("cpu")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops._resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert ops._resolve_backend("auto", torch.device("cuda")) == "triton"


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(1, 32, 8, 2048, 2048, 64, 64, 128, True),
                                  (2, 8, 2, 1000, 3000, 128, 64, 64, True),
                                  (1, 8, 8, 1025, 1025, 128, 128, 128, False)])
def test_gpu_compiled_half(case, dtype):
    _run_case("triton", case, dtype, realistic=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_non_contiguous_inputs_and_empty_query(backend):
    """[B, N, H, D] tensors viewed as [B, H, N, D] (what HF models pass); Nq = 0 is a no-op."""
    dev = backend_device(backend)
    b, hq, hkv, n, d = 2, 4, 2, 77, 64
    q = torch.randn(b, n, hq, d, device=dev).transpose(1, 2)
    k = torch.randn(b, n, hkv, d, device=dev).transpose(1, 2)
    v = torch.randn(b, n, hkv, d, device=dev).transpose(1, 2)
    lay = layout_from(mixed_block_mask(1, hq, 3, 3), 32, 32, dev)
    out, lse = block_sparse_attention(q, k, v, lay, return_lse=True, backend=backend)
    ref_out, ref_lse = reference.attention_reference(q, k, v, lay.to("cpu"))
    assert_close_to_reference(out, lse, ref_out, ref_lse, torch.float32, float(v.abs().max()))
    empty_lay = layout_from(torch.zeros(1, hq, 0, 3, dtype=torch.bool), 32, 32, dev)
    o0, l0 = block_sparse_attention(q[:, :, :0], k, v, empty_lay, return_lse=True, backend=backend)
    assert o0.shape == (b, hq, 0, d) and l0.shape == (b, hq, 0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shared_gqa", [False, True])
@pytest.mark.parametrize("nq", [1000, 300])  # Nq == Nk (dense heads in one flash call) and not
def test_cpu_dense_heads_mixed_with_sparse(causal, shared_gqa, nq):
    """Dense heads and dense leading query blocks run as whole-head flash calls; the rest sparse."""
    b, hq, hkv, nk, bm, bn, d = 2, 6, 2, 1000, 64, 32, 64
    q, k, v = torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d)
    lh = hkv if shared_gqa else hq
    mask = mixed_block_mask(b, lh, -(-nq // bm), -(-nk // bn))
    mask[0, 0] = True
    mask[1, lh - 1] = True
    mask[1, 0, :3] = True  # a dense prefix of 3 query blocks, sparse rows after it
    if shared_gqa:
        mask = mask.repeat_interleave(hq // hkv, dim=1)
    lay = layout_from(mask, bm, bn, q.device)
    out, lse = poisoned(q.shape, q.dtype, q.device), poisoned((b, hq, nq), torch.float32, q.device)
    block_sparse_attention(q, k, v, lay, causal=causal, backend="cpu", out=out, lse_out=lse)
    ref_out, ref_lse = reference.attention_reference(q, k, v, lay, causal=causal)
    assert_close_to_reference(out, lse, ref_out, ref_lse, torch.float32, float(v.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [
    (2, 6, 2, 1000, 1000, 64, 64, 64, True),  # GQA 3, ragged tail
    (1, 8, 2, 300, 1025, 32, 64, 64, True),  # GQA 4, queries offset, block_m < block_n
    (1, 6, 2, 200, 333, 32, 32, 64, False),  # non-causal
], ids=lambda c: "x".join(map(str, c)))
def test_cpu_gqa_common_and_residual_split(case, dtype, monkeypatch):
    """Heads of a KV group that keep mostly the same blocks: the common blocks run stacked, the
    per-head rest alone, merged by LSE; the result is the layout's attention all the same."""
    from dam.kernels import cpu

    b, hq, hkv, nq, nk, bm, bn, d, causal = case
    g = hq // hkv
    gen = torch.Generator().manual_seed(7)
    shared = causal_local_mask(b, hkv, nq, nk, bm, bn, 0.3, gen=gen).repeat_interleave(g, 1)
    extra = torch.rand(shared.shape, generator=gen) < 0.08  # per-head blocks
    mask = shared | extra
    mask[0, 1, 2] = False  # a head dropping a block its group keeps
    lay = layout_from(mask, bm, bn, torch.device("cpu"))
    taken = []
    split = cpu._gqa_split
    monkeypatch.setattr(cpu, "_gqa_split", lambda *a: taken.append(split(*a)) or taken[-1])
    q = torch.randn(b, hq, nq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    out, lse = poisoned(q.shape, dtype, q.device), poisoned((b, hq, nq), torch.float32, q.device)
    block_sparse_attention(q, k, v, lay, causal=causal, backend="cpu", out=out, lse_out=lse)
    assert taken and taken[0] is not None and taken[0][1] is not None, "the split path did not run"
    ref_out, ref_lse = reference.attention_reference(q, k, v, lay, causal=causal)
    assert_close_to_reference(out, lse, ref_out, ref_lse, dtype, float(v.abs().max()))
