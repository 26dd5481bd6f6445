"""capture() is exact: every array equals one computed from full eager attention maps."""

from __future__ import annotations

import math

import pytest
import torch

from dam.profiler import ProfileError, ProfileStats, attention_capture, capture, topp_block_counts

from .conftest import tiny_llama

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def _eager64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    """Reference attention, float64 end to end, returning the full probability maps."""
    g = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, dim=1).double()
    v = value.repeat_interleave(g, dim=1).double()
    s = query.double() @ k.transpose(-1, -2) * scaling
    n = s.shape[-1]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ v).transpose(1, 2).to(query.dtype), p


def reference_maps(model, ids, impl="eager"):
    """A [L, B, H, N, N] float64 stack of attention maps from output_attentions=True."""
    from transformers import AttentionInterface

    if impl == "eager64":
        AttentionInterface.register("dam_test_eager64", _eager64)
        impl = "dam_test_eager64"
    prev = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            out = model(ids, output_attentions=True)
    finally:
        model.set_attn_implementation(prev)
    return torch.stack([a.double() for a in out.attentions]), out.logits


def reference_stats(A, P, bs):
    """The store arrays computed directly from full maps A [L, B, H, N, N]."""
    L, Bt, H, N, _ = A.shape
    nb = math.ceil(N / bs)
    i = torch.arange(N)
    offset = (i[:, None] - i[None, :]).clamp(min=0).flatten()  # d = i - j (j > i holds zeros)
    assert (A.triu(1) == 0).all()
    diag = torch.zeros(L, Bt, H, N, dtype=torch.float64)
    diag.scatter_add_(-1, offset.expand(L, Bt, H, -1), A.flatten(-2))
    Ap = torch.nn.functional.pad(A, (0, nb * bs - N, 0, nb * bs - N))
    blk = Ap.reshape(L, Bt, H, nb, bs, nb, bs).sum((4, 6)) / N
    # topp by the plain definition: smallest k whose k heaviest blocks reach the share
    topp = torch.zeros(L, Bt, H, 3, dtype=torch.float64)
    for s_i, share in enumerate((0.9, 0.95, 0.99)):
        srt = blk.sort(-1, descending=True).values
        reach = srt.cumsum(-1) >= share * blk.sum(-1, keepdim=True) * (1 - 1e-9)
        k = reach.double().argmax(-1) + 1
        topp[..., s_i] = k.double().mean(-1)
    return {
        "attn_mean": A[..., :P, :P].sum(1),
        "diag_mass": diag.sum(1) / N,
        "col_mass": A.sum(-2).sum(1) / N,
        "block_mass": blk.sum(1),
        "topp_blocks": topp.sum(1),
    }


def _compare(st: ProfileStats, ref: dict, atol: float):
    for name, want in ref.items():
        got = getattr(st, name)
        assert got.dtype == torch.float64 and got.shape == want.shape, name
        assert torch.isfinite(got).all(), name
        if name == "topp_blocks":
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=name)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize(
    "heads,kv,n,bs,p,chunk",
    [(4, 4, 97, 16, 20, 32), (6, 2, 97, 16, 33, None), (8, 2, 130, 32, 40, 64), (3, 1, 65, 16, 65, 16)],
)
def test_capture_matches_float64_maps(heads, kv, n, bs, p, chunk):
    model = tiny_llama(heads=heads, kv=kv, hidden=8 * heads, vocab=257)
    ids = torch.randint(0, 257, (2, n))
    A, _ = reference_maps(model, ids, "eager64")
    st = capture(model, ids, capture_length=p, block_size=bs, chunk=chunk)
    assert st.count == 2 and st.block_size == bs
    # float64 throughout: sums of at most N*batch terms of size <= 1
    _compare(st, reference_stats(A, p, bs), atol=16 * n * 2 * EPS64)
    L, H = model.config.num_hidden_layers, heads
    for name in ("diag_mass", "col_mass"):
        torch.testing.assert_close(getattr(st, name).sum(-1), torch.full((L, H), 2.0, dtype=torch.float64))
    torch.testing.assert_close(st.block_mass.sum((-1, -2)), torch.full((L, H), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("heads,kv", [(4, 4), (6, 2)])
def test_capture_matches_transformers_eager_maps(heads, kv):
    """Against transformers' own eager output_attentions maps (their softmax runs in float32)."""
    model = tiny_llama(heads=heads, kv=kv, hidden=8 * heads, vocab=257)
    n, bs, p = 97, 16, 24
    ids = torch.randint(0, 257, (2, n))
    A, _ = reference_maps(model, ids, "eager")
    st = capture(model, ids, capture_length=p, block_size=bs, chunk=48)
    ref = reference_stats(A, p, bs)
    ref.pop("topp_blocks")  # a discrete count: float32-rounded maps can flip a tie
    _compare(st, ref, atol=64 * 2 * EPS32)


def test_forward_stays_exact_and_attention_is_restored():
    model = tiny_llama(heads=6, kv=2, hidden=48, vocab=257, attn="sdpa")
    ids = torch.randint(0, 257, (1, 101))
    with torch.no_grad():
        want = model(ids).logits
    with attention_capture(model, length=101, capture_length=10, block_size=16, chunk=16) as rec, \
            torch.no_grad():
        got = model(ids).logits
    assert rec.seen == {0, 1}
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(got, want, rtol=0, atol=1e3 * EPS64 * want.abs().max().item())
    # the attention implementation is restored after an error inside the forward, too
    with pytest.raises(ProfileError, match="positions"):
        with attention_capture(model, length=50, capture_length=10, block_size=16), torch.no_grad():
            model(ids)
    assert model.config._attn_implementation == "sdpa"


def test_every_output_row_is_written(monkeypatch):
    """The attention output buffer starts as NaN: the forward must overwrite all of it."""
    import importlib

    cap = importlib.import_module("dam.profiler.capture")  # the module, not the function

    def poisoned(*shape, **kw):
        return torch.full(shape, float("nan"), **kw)

    monkeypatch.setattr(cap, "_empty", poisoned)
    model = tiny_llama(heads=6, kv=3, hidden=48, vocab=257, attn="sdpa")
    ids = torch.randint(0, 257, (2, 1000))
    with torch.no_grad():
        want = model(ids).logits
        with attention_capture(model, length=1000, capture_length=8, block_size=64):
            got = model(ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e3 * EPS64 * want.abs().max().item())


def test_float32_model_within_float32_tolerance():
    model = tiny_llama(heads=4, kv=2, hidden=32, vocab=257)
    ids = torch.randint(0, 257, (1, 1025))
    A, _ = reference_maps(model, ids, "eager64")
    st64 = capture(model, ids, capture_length=16, block_size=64)
    st32 = capture(model.float(), ids, capture_length=16, block_size=64)
    ref = reference_stats(A[..., :, :, :], 16, 64)
    _compare(st64, ref, atol=16 * 1025 * EPS64)
    for name in ("attn_mean", "diag_mass", "col_mass", "block_mass"):
        torch.testing.assert_close(getattr(st32, name), ref[name], rtol=0, atol=256 * EPS32, msg=name)


def test_chunking_and_batching_do_not_change_results():
    model = tiny_llama(heads=4, kv=1, hidden=32, vocab=257)
    ids = torch.randint(0, 257, (3, 200))
    whole = capture(model, ids, capture_length=50, block_size=16)
    parts = [capture(model, ids[i:i + 1], capture_length=50, block_size=16, chunk=16) for i in range(3)]
    summed = parts[0] + parts[1] + parts[2]
    assert summed.count == 3
    for k, v in whole.arrays().items():
        torch.testing.assert_close(v, getattr(summed, k), rtol=0, atol=64 * 200 * EPS64, msg=k)


def test_topp_block_counts_definition():
    rows = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    got = topp_block_counts(rows * 7.0)  # any scale
    want = torch.tensor([[3, 3, 4], [1, 1, 1], [4, 4, 4]], dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_bad_inputs_are_refused():
    model = tiny_llama(vocab=257)
    ids = torch.randint(0, 257, (1, 40))
    with pytest.raises(ProfileError, match="capture length"):
        capture(model, ids, capture_length=41, block_size=16)
    with pytest.raises(ProfileError, match="block size"):
        capture(model, ids, capture_length=4, block_size=0)
    with pytest.raises(ProfileError, match="LongTensor"):
        capture(model, ids.float(), capture_length=4, block_size=16)
    with pytest.raises(ProfileError, match="LongTensor"):
        capture(model, ids[0], capture_length=4, block_size=16)
    assert model.config._attn_implementation == "eager"


def test_sliding_window_layers_run_their_band_unprofiled():
    """Mistral-style (every layer slides): capture keeps the forward exact and profiles nothing
    (the compiler gives those layers their native window)."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    model = MistralForCausalLM(cfg).to(torch.float64).eval()
    ids = torch.randint(0, 64, (1, 30))
    with torch.no_grad():
        want = model(ids).logits
    with attention_capture(model, length=30, capture_length=4, block_size=16) as rec, torch.no_grad():
        got = model(ids).logits
    assert rec.seen == {0}
    torch.testing.assert_close(got, want, rtol=0, atol=1e3 * EPS64 * want.abs().max().item())
    st = capture(model, ids, capture_length=4, block_size=16)
    assert all((v == 0).all() for v in st.arrays().values())


@pytest.mark.requires_cuda
def test_capture_on_cuda_matches_cpu():
    model = tiny_llama(heads=6, kv=2, hidden=48, vocab=257, dtype=torch.float32)
    ids = torch.randint(0, 257, (2, 1025))
    cpu = capture(model, ids, capture_length=64, block_size=64)
    gpu = capture(model.to("cuda"), ids, capture_length=64, block_size=64)
    for name in ("attn_mean", "diag_mass", "col_mass", "block_mass"):
        torch.testing.assert_close(gpu.arrays()[name], cpu.arrays()[name], rtol=0,
                                   atol=256 * 2 * EPS32, msg=name)
    # bf16 models: probabilities are computed in float32 from bf16 q/k; masses still sum to 1
    bf = capture(model.to(torch.bfloat16), ids, capture_length=64, block_size=64)
    torch.testing.assert_close(bf.col_mass.sum(-1), torch.full((2, 6), 2.0, dtype=torch.float64),
                               rtol=0, atol=1e3 * EPS32)


@pytest.mark.parametrize("heads,kv,n,bs,chunk", [(6, 2, 97, 16, 32), (4, 4, 65, 16, None)])
def test_block_err_matches_definition(heads, kv, n, bs, chunk):
    """block_err[a, b] = sum_{i in a} || sum_{j in b} A_ij (o_i - v_j) || / N, from float64 maps and values."""
    from transformers import AttentionInterface

    seen = {}

    def eager_keep(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        out, p = _eager64(module, query, key, value, attention_mask, scaling)
        seen[module.layer_idx] = (p, value.repeat_interleave(query.shape[1] // key.shape[1], dim=1).double())
        return out, p

    model = tiny_llama(heads=heads, kv=kv, hidden=8 * heads, vocab=257)
    ids = torch.randint(0, 257, (2, n))
    AttentionInterface.register("dam_test_keep", eager_keep)
    model.set_attn_implementation("dam_test_keep")
    with torch.no_grad():
        model(ids)
    model.set_attn_implementation("eager")
    st = capture(model, ids, capture_length=8, block_size=bs, chunk=chunk)
    nb = math.ceil(n / bs)
    for layer, (p, v) in seen.items():
        o = p @ v  # [B, H, N, D]
        want = torch.zeros(heads, nb, nb, dtype=torch.float64)
        for b in range(nb):
            js = slice(b * bs, min(n, (b + 1) * bs))
            # [B, H, N, D]: sum over j in block b of p_ij (o_i - v_j)
            contrib = p[..., js].sum(-1, keepdim=True) * o - p[..., js] @ v[:, :, js]
            rows = contrib.norm(dim=-1).sum(0)  # [H, N]
            for a in range(nb):
                want[:, a, b] = rows[:, a * bs:(a + 1) * bs].sum(-1) / n
        torch.testing.assert_close(st.block_err[layer], want, rtol=1e-10, atol=1e-12)
        assert (st.block_err[layer] >= 0).all()
        assert (st.block_err[layer].triu(1) == 0).all()  # no weight above the causal diagonal
