"""Hybrid sliding/full-attention models (Gemma 3 layout) through every stage, against float64 eager.

Tiny random Gemma-3 configs: sliding and full layers, MQA (one KV head), head_dim 256, the model's
own attention scale (query_pre_attn_scalar != head_dim), QK-norm, dual RoPE.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dam.runtime as rt
from dam.compiler import ArtifactError, CompileConfig, MaskProgram, compile_profile
from dam.profiler import ProfileConfig, attention_layer_types, capture, model_fingerprint, profile
from dam.runtime import _kernels

from ._helpers_hybrid import SOFTCAP, TYPES, tiny_gemma2, tiny_gemma3
from .profiler.test_capture import reference_stats
from .runtime._helpers import make_artifact

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def _eager64(module, query, key, value, attention_mask, scaling, dropout=0.0, sliding_window=None, softcap=None,
             **kw):
    """float64 attention by its definition: causal, ``i - j < sliding_window`` on sliding layers, and
    the scaled scores soft-capped (``softcap * tanh(s / softcap)``) where the model does."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1).double(), value.repeat_interleave(g, 1).double()
    s = query.double() @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    n, m = s.shape[-2:]
    i = torch.arange(m - n, m)[:, None]
    j = torch.arange(m)[None, :]
    keep = (j <= i) if sliding_window is None else (j <= i) & (i - j < sliding_window)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    return (p @ v).transpose(1, 2).to(query.dtype), p


def _eager_logits(model, ids, softcap=True):
    """Logits and float64 attention maps of ``model`` on ``ids`` through :func:`_eager64` (``softcap``
    False: ignoring the model's soft-capping, to show it matters)."""
    from transformers import AttentionInterface

    AttentionInterface.register("dam_test_hybrid64", _eager64 if softcap else
                                lambda *a, softcap=None, **kw: _eager64(*a, **kw))
    prev = model.config._attn_implementation
    model.set_attn_implementation("dam_test_hybrid64")
    try:
        with torch.no_grad():
            out = model(ids, output_attentions=True)
    finally:
        model.set_attn_implementation(prev)
    return out.logits, torch.stack([a.double() for a in out.attentions])


def test_layer_types_and_fingerprint():
    g = tiny_gemma3()
    assert attention_layer_types(g.config) == TYPES
    fp = model_fingerprint(g.config)
    assert fp["layer_types"] == TYPES and fp["sliding_window"] == 16 and fp["head_dim"] == 256
    from transformers import LlamaConfig

    llama = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=10)
    assert attention_layer_types(llama) == ["full_attention"] * 2
    assert "layer_types" not in model_fingerprint(llama)  # all-full models: the fingerprint is as before
    g.config.layer_types = ["sliding_attention", "chunked_attention", "full_attention"]
    with pytest.raises(Exception, match="chunked_attention"):
        attention_layer_types(g.config)


def test_capture_on_a_hybrid_model_profiles_full_layers_and_runs_sliding_bands():
    """Full layers: statistics equal float64 maps'. Sliding layers: not profiled (their native window
    is the program), but the forward through them is exact."""
    from dam.profiler import attention_capture

    model = tiny_gemma3()
    n, bs, p = 70, 16, 24
    ids = torch.randint(0, 257, (2, n))
    want, A = _eager_logits(model, ids)
    assert (A[0][..., 40, :40 - 16 + 1] == 0).all()  # the reference really slides
    st = capture(model, ids, capture_length=p, block_size=bs, chunk=32)
    ref = reference_stats(A, p, bs)
    ref.pop("topp_blocks")
    for name, w in ref.items():
        got = getattr(st, name)
        torch.testing.assert_close(got[1], w[1], rtol=0, atol=256 * EPS64, msg=name)
        assert (got[0] == 0).all() and (got[2] == 0).all(), name
    with attention_capture(model, length=n, capture_length=p, block_size=bs, chunk=32), torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e3 * EPS64 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nq,nk,window,hq,hkv", [(300, 300, 64, 4, 1), (100, 333, 50, 4, 2), (1, 400, 64, 4, 1),
                                                 (257, 257, 300, 2, 2)])
def test_sliding_window_attention_is_exact(dtype, nq, nk, window, hq, hkv):
    torch.manual_seed(0)
    D = 256
    q = torch.randn(2, hq, nq, D).to(dtype)
    k, v = torch.randn(2, hkv, nk, D).to(dtype), torch.randn(2, hkv, nk, D).to(dtype)
    got = _kernels.sliding_window_attention(q, k, v, scale=0.125, window=window, chunk=96)
    ref, _ = _eager64(None, q, k, v, None, 0.125, sliding_window=window)
    # the kernels' tolerance (tests/kernels/helpers.out_atol): the output is a convex mix of V
    # rows; rounding to dtype costs eps * max|v|, fp32 accumulation a few fp32 eps per term
    atol = 2 * float(v.abs().max()) * (torch.finfo(dtype).eps + 32 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(got.double(), ref.transpose(1, 2).double(), rtol=0, atol=atol)


def _hybrid_artifact(model, programs, block_size=16):
    art = make_artifact(model.config, programs, block_size=block_size)
    art.metadata["model"].update(layer_types=list(TYPES), sliding_window=model.config.sliding_window)
    return art


def test_runtime_runs_sliding_layers_as_their_band_and_matches_float64(monkeypatch):
    """Dense programs on the full layer: the whole model equals float64 eager attention; the
    sliding layers never run masked N^2 attention."""
    model = tiny_gemma3(dtype=torch.float32, attn="sdpa")
    ids = torch.randint(0, 257, (1, 200))
    want, _ = _eager_logits(model.double(), ids)
    model.float()
    calls = []
    real = _kernels.sliding_window_attention
    monkeypatch.setattr(_kernels, "sliding_window_attention",
                        lambda *a, **kw: calls.append(kw["window"]) or real(*a, **kw))
    with rt.apply(model, _hybrid_artifact(model, (MaskProgram(dense=True),)), backend="cpu", min_length=1), \
            torch.no_grad():
        got = model(ids).logits
    assert calls == [16, 16]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e3 * EPS32 * want.abs().max().item())


def test_profile_compile_apply_on_a_hybrid_model(tmp_path, tokenizer_dir):
    """The full pipeline: sliding layers get exactly their native window; the full layer is compiled."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_gemma3(dtype=torch.float32, attn="sdpa", vocab=len(tok))
    out = tmp_path / "g.zarr"
    profile(ProfileConfig(model="tiny-gemma3", out=str(out), data="builtin:passkey", length=256, samples=2,
                          capture_length=32, block_size=16, flush_seconds=0), model_and_tokenizer=(model, tok))
    art = compile_profile(str(out), CompileConfig(recall=0.9, target_length=512)).artifact
    assert art.metadata["model"]["layer_types"] == TYPES
    assert art.metadata["figures"]["sliding_layers"] == [0, 2]
    for layer in (0, 2):
        assert set(art.layer_programs(layer)) == {MaskProgram(window=16)}
    assert not any(p == MaskProgram(window=16) for p in art.layer_programs(1))
    ids = torch.randint(0, len(tok), (1, 300))
    with torch.no_grad():
        dense = model(ids).logits
        with rt.apply(model, art, backend="cpu", min_length=1):
            sparse = model(ids).logits
    assert (sparse.argmax(-1) == dense.argmax(-1)).double().mean() > 0.5  # a real, sparse model


def test_artifact_for_another_layer_layout_is_refused():
    model = tiny_gemma3(dtype=torch.float32, attn="sdpa")
    flat = make_artifact(model.config, (MaskProgram(dense=True),))  # compiled as if every layer were full
    with pytest.raises(ArtifactError, match="attention layers: artifact every layer full attention vs model "
                                            r"sliding-window \(16\) layers \[0, 2\]"):
        rt.apply(model, flat)
    other = _hybrid_artifact(model, (MaskProgram(dense=True),))
    other.metadata["model"]["sliding_window"] = 512
    with pytest.raises(ArtifactError, match="attention layers"):
        rt.apply(model, other)


def test_soft_capped_model_through_capture_and_runtime_matches_float64():
    """Gemma 2 (attention-logit soft-capping): the profiler's statistics of the full layer equal
    float64 soft-capped maps'; with dense programs the runtime's forward equals float64 eager."""
    model = tiny_gemma2()
    n, bs, p = 70, 16, 24
    ids = torch.randint(0, 257, (2, n))
    want, A = _eager_logits(model, ids)
    plain, _ = _eager_logits(model, ids, softcap=False)
    assert (want - plain).abs().max() > 1e-3  # the cap matters on these scores
    st = capture(model, ids, capture_length=p, block_size=bs, chunk=32)
    ref = reference_stats(A, p, bs)
    ref.pop("topp_blocks")
    for name, w in ref.items():
        torch.testing.assert_close(getattr(st, name)[1], w[1], rtol=0, atol=256 * EPS64, msg=name)
    art = _hybrid_artifact(model, (MaskProgram(dense=True),))
    for backend in ("cpu", "reference"):
        with rt.apply(model, art, backend=backend, min_length=1), torch.no_grad():
            got = model(ids[:1]).logits
        torch.testing.assert_close(got, want[:1], rtol=0, atol=1e3 * EPS64 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_soft_capped_sparse_layers_equal_the_float64_reference(dtype):
    """Sparse programs (sinks, window, dynamic blocks) on the full layer of a soft-capped model: the
    CPU kernel's forward equals the float64 reference kernel's on the same layouts (prefill, then
    decode steps through the cache)."""
    model = tiny_gemma2(dtype=dtype)
    progs = (MaskProgram(sink=16, window=32), MaskProgram(sink=16, dynamic_fraction=0.3),
             MaskProgram(window=48), MaskProgram(dense=True))
    art = _hybrid_artifact(model, progs)
    ids = torch.randint(0, 257, (1, 150))
    out = {}
    for backend in ("cpu", "reference"):
        with rt.apply(model, art, backend=backend, min_length=1), torch.no_grad():
            out[backend] = model(ids).logits.double()
            out[backend + "-gen"] = model.generate(ids, max_new_tokens=6, do_sample=False)
    eps = torch.finfo(dtype).eps
    scale = out["reference"].abs().max().item()
    torch.testing.assert_close(out["cpu"], out["reference"], rtol=0, atol=64 * eps * scale)
    if dtype == torch.float64:
        assert torch.equal(out["cpu-gen"], out["reference-gen"])


def test_softcap_kernels_equal_the_float64_reference():
    """block_sparse_attention / block_sparse_decode with softcap, on random layouts with GQA, and the
    runtime's dense and banded fallbacks, against float64 soft-capped attention."""
    from dam.kernels import BlockLayout, block_sparse_attention, block_sparse_decode, reference
    from dam.kernels.synthetic import realistic_mask

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cap = SOFTCAP
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        q = (torch.randn(2, 4, 200, 32) * 2).to(dtype)
        k, v = (torch.randn(2, 2, 200, 32) * 2).to(dtype), torch.randn(2, 2, 200, 32).to(dtype)
        lay = BlockLayout.from_block_mask(realistic_mask(4, 13, 0.4, gen), 16, 16)
        got, lse = block_sparse_attention(q, k, v, lay, scale=0.3, softcap=cap, backend="cpu", return_lse=True)
        want, wlse = reference.attention_reference(q, k, v, lay, scale=0.3, softcap=cap)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=16 * eps * want.abs().max().item())
        torch.testing.assert_close(lse.double(), wlse, rtol=0, atol=64 * max(eps, 2 ** -23) * wlse.abs().max().item())
        plain = reference.attention_reference(q, k, v, lay, scale=0.3)[0]
        assert (plain - want).abs().max() > 1e-2  # the cap matters
        dl = BlockLayout.from_block_mask(realistic_mask(4, 13, 0.4, gen)[:, :, -1:], 16, 16)
        lens = torch.tensor([200, 131])
        got = block_sparse_decode(q[:, :, -1:], k, v, dl, cache_seqlens=lens, scale=0.3, softcap=cap, backend="cpu")
        want = reference.decode_reference(q[:, :, -1:], k, v, dl, cache_seqlens=lens, scale=0.3, softcap=cap)[0]
        torch.testing.assert_close(got.double(), want, rtol=0, atol=16 * eps * want.abs().max().item())
        for w in (None, 40):
            if w is None:
                got = _kernels.dense_attention(q, k, v, scale=0.3, softcap=cap)
            else:
                got = _kernels.sliding_window_attention(q, k, v, scale=0.3, window=w, chunk=64, softcap=cap)
            want, _ = _eager64(None, q, k, v, None, 0.3, sliding_window=w, softcap=cap)
            torch.testing.assert_close(got.double(), want.transpose(1, 2).double(), rtol=0,
                                       atol=16 * eps * want.abs().max().item())
    with pytest.raises(Exception, match="softcap"):
        block_sparse_attention(q, k, v, lay, softcap=-1.0, backend="cpu")


def test_density_of_sliding_layers_counts_the_window():
    """What the artifact reports for a sliding layer is the band's block density, not 1.0."""
    prog = MaskProgram(window=512)
    assert prog.density(8192, 8192, 64) < 0.15
    assert np.isclose(prog.density(256, 256, 64), 1.0)


def test_generate_with_the_sliding_cache_equals_dense():
    """Decode through transformers' sliding-window cache layers (prefill longer than the window,
    then one-token steps): the same greedy tokens as the dense model."""
    model = tiny_gemma3(dtype=torch.float32, attn="sdpa")
    ids = torch.randint(0, 257, (1, 60))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False)
        with rt.apply(model, _hybrid_artifact(model, (MaskProgram(dense=True),)), backend="cpu", min_length=1):
            got = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)


def test_handle_api_and_bench_on_a_hybrid_model():
    """attend() and runs_sparse() know the sliding layers; bench times a full layer alone and
    counts the sliding layers at their band's density."""
    from dam.runtime.eval.bench import BenchConfig, bench

    model = tiny_gemma3(dtype=torch.float32, attn="sdpa")
    art = _hybrid_artifact(model, (MaskProgram(sink=16, window=32),))
    assert art.sliding_windows() == {0: 16, 2: 16}
    h = rt.DamHandle(None, art, rt.RuntimeConfig(backend="cpu", min_length=1, dense_above=1.0))
    assert not h.runs_sparse(0, 200, 200, "cpu", torch.float32) and h.runs_sparse(1, 200, 200, "cpu", torch.float32)
    q, k, v = torch.randn(1, 4, 200, 256), torch.randn(1, 1, 200, 256), torch.randn(1, 1, 200, 256)
    ref, _ = _eager64(None, q, k, v, None, 0.125, sliding_window=16)
    torch.testing.assert_close(h.attend(0, q, k, v, 0.125).double(), ref.transpose(1, 2).double(),
                               rtol=0, atol=64 * EPS32)
    rep = bench(model, art, {192: torch.randint(0, 257, (1, 192))},
                BenchConfig(repeats=1, warmup=0, decode_tokens=1, backend="cpu", min_length=1))
    row = rep.rows[0]
    assert row.attn_layer == 1
    band = MaskProgram(window=16).density(192, 192, 16)
    full = MaskProgram(sink=16, window=32).density(192, 192, 16)
    assert row.dense_layers in (0, 1)  # the full layer: sparse, or dense by the CPU's dense rule
    assert row.density == pytest.approx((2 * band + (1.0 if row.dense_layers else full)) / 3, rel=0.05)


def test_every_layer_sliding_compiles_to_native_windows(tmp_path, tokenizer_dir):
    """Mistral-style: nothing to fit; every head gets the window and the model runs exactly."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=48)
    model = MistralForCausalLM(cfg).eval()
    out = tmp_path / "m.zarr"
    profile(ProfileConfig(model="tiny-mistral", out=str(out), data="builtin:passkey", length=128, samples=1,
                          capture_length=16, block_size=16, flush_seconds=0), model_and_tokenizer=(model, tok))
    art = compile_profile(str(out), CompileConfig(recall=0.9)).artifact
    assert set(art.programs) == {MaskProgram(window=48)} and art.metadata["figures"]["sliding_layers"] == [0, 1]
    ids = torch.randint(0, len(tok), (1, 150))
    with torch.no_grad():
        want = model(ids).logits
        with rt.apply(model, art, backend="cpu", min_length=1):
            got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e3 * EPS32 * float(want.abs().max()))


def test_learned_sinks_are_refused_by_name():
    """GPT-OSS's s_aux (learned attention sinks) has no kernel: one clear error, not a wrong output."""
    from dam.runtime.errors import DamRuntimeError
    from dam.runtime.integration import dam_attention_forward

    model = tiny_gemma3(dtype=torch.float32, attn="sdpa")
    with rt.apply(model, _hybrid_artifact(model, (MaskProgram(dense=True),)), backend="cpu"):
        mod = model.model.layers[1].self_attn
        q, k = torch.randn(1, 4, 8, 256), torch.randn(1, 1, 8, 256)
        with pytest.raises(DamRuntimeError, match="s_aux"):
            dam_attention_forward(mod, q, k, k, None, scaling=0.1, s_aux=torch.zeros(4))
