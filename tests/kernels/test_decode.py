"""block_sparse_decode (split-KV Triton under the interpreter, and the CPU path) vs the reference."""

from __future__ import annotations

import pytest
import torch

from dam.kernels import block_sparse_attention, block_sparse_decode, reference

from .helpers import (
    assert_close_to_reference,
    backend_device,
    layout_from,
    mixed_block_mask,
    out_atol,
    poisoned,
)


def _decode_case(backend, b, hq, hkv, smax, bn, d, lens, dtype, p=0.5, shared=False, softcap=None):
    dev = backend_device(backend)
    q = torch.randn(b, hq, 1, d, dtype=dtype, device=dev) * (4 if softcap is not None else 1)
    kc = torch.randn(b, hkv, smax, d, dtype=dtype, device=dev)
    vc = torch.randn(b, hkv, smax, d, dtype=dtype, device=dev)
    nkb = -(-smax // bn)
    # may keep blocks past a sequence's length; ``shared``: one layout row per KV head's group
    mask = mixed_block_mask(b, hkv if shared else hq, 1, nkb, p=p)
    if shared:
        mask = mask.repeat_interleave(hq // hkv, dim=1)
    layout = layout_from(mask, 16, bn, dev)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    out = poisoned(q.shape, dtype, dev)
    lse = poisoned((b, hq, 1), torch.float32, dev)
    block_sparse_decode(q, kc, vc, layout, cache_seqlens=seqlens, return_lse=True,
                        backend=backend, out=out, lse_out=lse, softcap=softcap)
    ro, rl = reference.decode_reference(q, kc, vc, layout.to("cpu"), cache_seqlens=seqlens, softcap=softcap)
    assert_close_to_reference(out, lse, ro, rl, dtype, float(vc.abs().max()))
    return q, kc, vc, layout, seqlens, out


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("ratio", [1, 3, 4, 8])
def test_decode_unequal_lengths_gqa(backend, ratio):
    smax = 1025 if backend == "cpu" else 300
    lens = [0, 1, 97, smax]
    _decode_case(backend, 4, 2 * ratio, 2, smax, 32, 64, lens, torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_cpu_thread_counts(threads):
    """Decode is right with one and with two intra-op threads and leaves the count alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _decode_case("cpu", 3, 6, 2, 700, 64, 64, [700, 3, 300], torch.float32)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_softcap(backend, dtype):
    """Soft-capped decode (Gemma 2) equals the soft-capped float64 reference, and the cap matters."""
    q, kc, vc, layout, seqlens, out = _decode_case(backend, 2, 4, 2, 300, 32, 64, [300, 77], dtype, softcap=2.0)
    plain = reference.decode_reference(q, kc, vc, layout.to("cpu"), cache_seqlens=seqlens)[0]
    assert (plain - out.double().cpu()).abs().max() > 0.05


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_decode_shared_gqa_layout(backend):
    _decode_case(backend, 3, 8, 2, 300, 32, 64, [300, 0, 45], torch.float32, shared=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_triton_dtypes_and_odd_dim(dtype):
    _decode_case("triton", 2, 4, 2, 257, 16, 40, [200, 3], dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_decode_mqa_head_dim_256(backend):
    """Gemma 3's shape: one KV head for all query heads, head_dim 256."""
    _decode_case(backend, 2, 4, 1, 300, 32, 256, [300, 77], torch.float32, shared=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_decode_cpu_dtypes(dtype):
    _decode_case("cpu", 2, 4, 1, 1000, 64, 128, [999, 64], dtype)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_decode_equals_prefill_with_one_query(backend):
    """Decode of sequence b == prefill of its last token over its first cache_seqlens[b] keys."""
    q, kc, vc, layout, seqlens, out = _decode_case(
        backend, 3, 4, 2, 200, 16, 64, [200, 50, 17], torch.float32, p=0.7
    )
    for b, n in enumerate(seqlens.tolist()):
        nkb = -(-n // layout.block_n)
        mask = layout.to("cpu").block_mask(-(-200 // layout.block_n))[b : b + 1, :, :, :nkb]
        lay_b = layout_from(mask, layout.block_m, layout.block_n, q.device)
        pre = block_sparse_attention(q[b : b + 1], kc[b : b + 1, :, :n], vc[b : b + 1, :, :n],
                                     lay_b, backend=backend)
        tol = out_atol(torch.float32, float(vc.abs().max()))
        assert torch.allclose(pre, out[b : b + 1], atol=tol, rtol=0)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_gpu_compiled(dtype):
    _decode_case("triton", 2, 32, 8, 32768 + 5, 64, 128, [32768 + 5, 1000], dtype, p=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_cpu_non_contiguous_cache(dtype):
    """A cache stored [B, S, H, D] and viewed [B, H, S, D] (no token-row view): gathered by
    advanced indexing, never copied whole; S_max not a multiple of block_n."""
    b, hq, hkv, smax, d, bn = 2, 6, 2, 333, 64, 32
    q = torch.randn(b, hq, 1, d, dtype=dtype)
    kc = torch.randn(b, smax, hkv, d, dtype=dtype).transpose(1, 2)
    vc = torch.randn(b, smax, hkv, d, dtype=dtype).transpose(1, 2)
    layout = layout_from(mixed_block_mask(b, hq, 1, -(-smax // bn), p=0.5), 16, bn, q.device)
    seqlens = torch.tensor([333, 100], dtype=torch.int64)
    out, lse = block_sparse_decode(q, kc, vc, layout, cache_seqlens=seqlens, return_lse=True,
                                   backend="cpu")
    ro, rl = reference.decode_reference(q, kc, vc, layout, cache_seqlens=seqlens)
    assert_close_to_reference(out, lse, ro, rl, dtype, float(vc.abs().max()))
