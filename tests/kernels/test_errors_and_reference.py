"""Bad inputs raise LayoutError with clear messages; the reference agrees with a brute-force loop."""

from __future__ import annotations

import math

import pytest
import torch

from dam.kernels import (
    BlockLayout,
    LayoutError,
    block_sparse_attention,
    block_sparse_decode,
    merge_attention,
    reference,
)


def _full(h, nqb, nkb, bm=16, bn=16):
    return BlockLayout.from_block_mask(torch.ones(1, h, nqb, nkb, dtype=torch.bool), bm, bn)


def _qkv(b=1, hq=2, hkv=2, nq=32, nk=32, d=32, dtype=torch.float32):
    return (torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, d, dtype=dtype))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_prefill_input_errors(backend):
    q, k, v = _qkv()
    lay = _full(2, 2, 2)
    with pytest.raises(LayoutError, match="multiple of KV heads"):
        block_sparse_attention(*_qkv(hq=3, hkv=2), _full(3, 2, 2), backend=backend)
    with pytest.raises(LayoutError, match="must not exceed Nk"):
        block_sparse_attention(*_qkv(nq=48, nk=32), _full(2, 3, 2), backend=backend)
    with pytest.raises(LayoutError, match="query blocks"):
        block_sparse_attention(q, k, v, _full(2, 3, 2), backend=backend)
    with pytest.raises(LayoutError, match="heads"):
        block_sparse_attention(q, k, v, _full(3, 2, 2), backend=backend)
    with pytest.raises(LayoutError, match="share a dtype"):
        block_sparse_attention(q, k.half(), v, lay, backend=backend)
    with pytest.raises(LayoutError, match="float16/bfloat16/float32"):
        block_sparse_attention(q.int(), k.int(), v.int(), lay, backend=backend)
    with pytest.raises(LayoutError, match="head dim mismatch"):
        block_sparse_attention(q, k[..., :16], v[..., :16], lay, backend=backend)
    with pytest.raises(LayoutError, match="4-D"):
        block_sparse_attention(q[0], k, v, lay, backend=backend)
    with pytest.raises(LayoutError, match="past"):  # a block index beyond Nk
        bad = BlockLayout(torch.tensor([[[[0, 5]], [[0, 5]]]], dtype=torch.int32).expand(1, 2, 2, 2).contiguous(),
                          torch.full((1, 2, 2), 2, dtype=torch.int32), 16, 16)
        block_sparse_attention(q, k, v, bad, backend="cpu")
    with pytest.raises(LayoutError, match="backend"):
        block_sparse_attention(q, k, v, lay, backend="gpu")
    with pytest.raises(LayoutError, match="out must be"):
        block_sparse_attention(q, k, v, lay, backend=backend, out=torch.empty(3))
    with pytest.raises(LayoutError, match="BlockLayout"):
        block_sparse_attention(q, k, v, "not a layout", backend=backend)


def test_validate_false_skips_the_host_check_only(monkeypatch):
    """``validate=False`` (the runtime's planner-made layouts) skips the host read of the layout
    and gives the same result; the default still refuses a bad layout (above)."""
    q, k, v = _qkv(nq=40, nk=40)
    lay = BlockLayout.from_block_mask(torch.tril(torch.ones(3, 3, dtype=torch.bool)).expand(1, 2, 3, 3), 16, 16)
    want = block_sparse_attention(q, k, v, lay, backend="cpu")
    dq = q[:, :, -1:]
    dlay = BlockLayout.from_block_mask(torch.ones(1, 2, 1, 3, dtype=torch.bool), 16, 16)
    lens = torch.tensor([40])
    dwant = block_sparse_decode(dq, k, v, dlay, cache_seqlens=lens, backend="cpu")

    def boom(self, kv_len=None):
        raise AssertionError("validate was called")

    monkeypatch.setattr(BlockLayout, "validate", boom)
    torch.testing.assert_close(block_sparse_attention(q, k, v, lay, backend="cpu", validate=False), want,
                               rtol=0, atol=0)
    torch.testing.assert_close(block_sparse_decode(dq, k, v, dlay, cache_seqlens=lens, backend="cpu",
                                                   validate=False), dwant, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="validate was called"):
        block_sparse_attention(q, k, v, lay, backend="cpu")


def test_triton_refuses_what_it_cannot_do(monkeypatch):
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(LayoutError, match="float64"):
        block_sparse_attention(q, k, v, _full(2, 2, 2), backend="triton")
    q, k, v = _qkv(d=300)
    with pytest.raises(LayoutError, match="up to 256"):
        block_sparse_attention(q, k, v, _full(2, 2, 2), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(LayoutError, match="backend='cpu'"):
            block_sparse_attention(*_qkv(), _full(2, 2, 2), backend="triton")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_decode_input_errors(backend):
    q = torch.randn(2, 2, 1, 32)
    kc = torch.randn(2, 2, 64, 32)
    lay = _full(2, 1, 4)
    lens = torch.tensor([10, 64])
    with pytest.raises(LayoutError, match="one query per sequence"):
        block_sparse_decode(torch.randn(2, 2, 2, 32), kc, kc, lay, cache_seqlens=lens, backend=backend)
    with pytest.raises(LayoutError, match="cache_seqlens must have shape"):
        block_sparse_decode(q, kc, kc, lay, cache_seqlens=lens[:1], backend=backend)
    with pytest.raises(LayoutError, match="int32/int64"):
        block_sparse_decode(q, kc, kc, lay, cache_seqlens=lens.float(), backend=backend)
    with pytest.raises(LayoutError, match="query blocks"):
        block_sparse_decode(q, kc, kc, _full(2, 2, 4), cache_seqlens=lens, backend=backend)
    with pytest.raises(LayoutError, match="k_cache"):
        block_sparse_decode(q, kc[..., :16], kc, lay, cache_seqlens=lens, backend=backend)
    with pytest.raises(LayoutError, match=r"\[0, S_max"):
        block_sparse_decode(q, kc, kc, lay, cache_seqlens=torch.tensor([10, 65]), backend="cpu")


def test_reference_equals_brute_force_loop():
    torch.manual_seed(1)
    b, hq, hkv, nq, nk, d, bm, bn = 1, 4, 2, 21, 45, 8, 16, 16
    q, k, v = torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d)
    mask = torch.rand(1, hq, 2, 3) < 0.5
    mask[0, 0, 1] = False  # an empty row
    lay = BlockLayout.from_block_mask(mask, bm, bn)
    out, lse = reference.attention_reference(q, k, v, lay, scale=0.5)
    for h in range(hq):
        for r in range(nq):
            i = nk - nq + r
            keys = [j for j in range(i + 1) if mask[0, h, r // bm, j // bn]]
            if not keys:
                assert out[0, h, r].eq(0).all() and lse[0, h, r] == -math.inf
                continue
            s = [0.5 * float(q[0, h, r].double() @ k[0, h // 2, j].double()) for j in keys]
            mx = max(s)
            w = [math.exp(x - mx) for x in s]
            tot = sum(w)
            o = sum(wj * v[0, h // 2, j].double() for wj, j in zip(w, keys, strict=True)) / tot
            assert torch.allclose(out[0, h, r], o, atol=1e-12)
            assert abs(float(lse[0, h, r]) - (mx + math.log(tot))) < 1e-12


def test_merge_attention_handles_empty_parts():
    o1, o2 = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    l1, l2 = torch.randn(3, 4), torch.randn(3, 4)
    l1[0, 0] = l2[0, 0] = -math.inf
    l1[1, 1] = -math.inf
    om, lm = merge_attention(o1, l1, o2, l2)
    assert om[0, 0].eq(0).all() and lm[0, 0] == -math.inf
    assert torch.allclose(om[1, 1], o2[1, 1]) and torch.allclose(lm[1, 1], l2[1, 1])
    w1 = torch.exp(l1[2, 2]) / (torch.exp(l1[2, 2]) + torch.exp(l2[2, 2]))
    assert torch.allclose(om[2, 2], w1 * o1[2, 2] + (1 - w1) * o2[2, 2], atol=1e-6)


def test_autotune_pruning_keeps_tiles_inside_layout_blocks():
    from dam.kernels.triton_kernels import _gpu_fwd_configs, _prune_fwd

    for lm, ln in [(16, 16), (32, 64), (64, 16), (128, 128), (256, 32)]:
        kept = _prune_fwd(_gpu_fwd_configs(), {"LAYOUT_M": lm, "LAYOUT_N": ln})
        assert kept
        for c in kept:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            assert bm <= lm and lm % bm == 0 and bn <= ln and ln % bn == 0
        keys = [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in kept]
        assert len(keys) == len(set(keys))
        # as Triton's autotuner calls it: positional args as named_args, the launcher's keyword
        # arguments (LAYOUT_M/LAYOUT_N among them) as kwargs
        as_called = _prune_fwd(_gpu_fwd_configs(), {"Q": None}, LAYOUT_M=lm, LAYOUT_N=ln, BLOCK_D=16)
        assert [(c.kwargs, c.num_warps, c.num_stages) for c in as_called] == \
            [(c.kwargs, c.num_warps, c.num_stages) for c in kept]
