"""apply / DamHandle / load on tiny random llama-family models (Llama, Mistral, Qwen2, Qwen3)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import dam.runtime as rt
from dam.compiler import Artifact, ArtifactError, MaskProgram

from ._helpers import FP32_TOL, MIXED_PROGRAMS, STATIC_PROGRAMS, make_artifact, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
TOL = dict(rtol=1e-4, atol=1e-4)  # fp32 through 2 layers + lm_head: a few ulps x depth x width


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_remove_restores_bit_identical(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 90))
    with torch.no_grad():
        before = model(ids).logits
        prev = model.config._attn_implementation
        with rt.apply(model, make_artifact(model.config, MIXED_PROGRAMS), backend="reference", min_length=1) as h:
            assert model.config._attn_implementation == "dam" and h.active
            during = model(ids).logits
        assert not h.active and model.config._attn_implementation == prev
        after = model(ids).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, during, **TOL)  # the sparse masks do change the outputs
    assert not any(hasattr(m, "_dam_layer") for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_program_equals_dense_model(family):
    model = tiny_model(family, heads=6, kv_heads=2)
    art = make_artifact(model.config, (MaskProgram(dense=True),))
    ids = torch.randint(0, 128, (1, 77))
    with torch.no_grad():
        want = model(ids).logits
        with rt.apply(model, art, backend="reference", min_length=1, decode="sparse"):
            got = model(ids).logits
    torch.testing.assert_close(got, want, **TOL)


def test_all_dense_layer_runs_sdpa_not_the_kernel(monkeypatch):
    """A layer whose heads are all dense skips the block-sparse kernel (prefill and decode)."""
    from dam.runtime import _kernels

    model = tiny_model("llama", heads=4, kv_heads=2)
    progs = (MaskProgram(dense=True), MaskProgram(sink=16, window=32))
    art = make_artifact(model.config, progs)
    art.head_program[0, :] = 0  # layer 0 all dense, layer 1 mixed
    art.head_program[1, :] = [0, 1, 1, 0]
    calls = []
    for name in ("sparse_prefill", "sparse_decode"):
        real = getattr(_kernels, name)
        monkeypatch.setattr(_kernels, name, lambda *a, _real=real, _n=name, **kw: calls.append(_n) or _real(*a, **kw))
    ids = torch.randint(0, 128, (1, 70))
    with torch.no_grad(), rt.apply(model, art, backend="reference", min_length=1, decode="sparse"):
        model(ids)
        assert calls == ["sparse_prefill"]  # layer 1 only
        calls.clear()
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert calls.count("sparse_prefill") == 1 and calls.count("sparse_decode") == 1  # layer 1 per step
    # all-dense artifact: no kernel at all, and the output is the dense model's
    model2 = tiny_model("llama", heads=4, kv_heads=2)
    calls.clear()
    with torch.no_grad():
        want = model2(ids).logits
        with rt.apply(model2, make_artifact(model2.config, (MaskProgram(dense=True),)), backend="cpu", min_length=1):
            got = model2(ids).logits
    assert calls == []
    torch.testing.assert_close(got, want, **TOL)


def test_decode_policy(monkeypatch):
    """decode='auto' on the CPU runs one-query steps through dense SDPA (exact); 'sparse' through
    the block-sparse decode kernel; prefill is block-sparse either way."""
    from dam.runtime import _kernels

    model = tiny_model("llama", heads=4, kv_heads=2)
    art = make_artifact(model.config, STATIC_PROGRAMS)
    ids = torch.randint(0, 128, (1, 70))
    calls = []
    real = _kernels.sparse_decode
    monkeypatch.setattr(_kernels, "sparse_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    outs = {}
    with torch.no_grad():
        for mode in ("auto", "dense", "sparse"):
            calls.clear()
            with rt.apply(model, art, backend="reference", min_length=1, decode=mode):
                cache = DynamicCache(config=model.config)
                model(ids[:, :-1], past_key_values=cache, use_cache=True)
                outs[mode] = (model(ids[:, -1:], past_key_values=cache, use_cache=True).logits, len(calls))
    assert outs["auto"][1] == outs["dense"][1] == 0 and outs["sparse"][1] == model.config.num_hidden_layers
    torch.testing.assert_close(outs["auto"][0], outs["dense"][0], rtol=0, atol=0)
    assert not torch.allclose(outs["sparse"][0], outs["dense"][0], **TOL)  # the sparse mask matters here


def test_decode_auto_rule_by_cache_length_and_dynamic_heads(monkeypatch):
    """decode='auto' on the CPU: a layer without dynamic heads decodes sparse from
    DECODE_SPARSE_FROM['cpu'] keys on, dense below; a layer with dynamic heads always dense."""
    from dam.runtime import _kernels, integration

    monkeypatch.setattr(integration, "DECODE_SPARSE_FROM", {"cpu": 60})
    calls = []
    real = _kernels.sparse_decode
    monkeypatch.setattr(_kernels, "sparse_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = tiny_model("llama", heads=4, kv_heads=2)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        for progs, n, want in ((STATIC_PROGRAMS, 70, layers), (STATIC_PROGRAMS, 50, 0),
                               ((MaskProgram(sink=2, window=1, dynamic_fraction=0.3),) * 4, 70, 0)):
            calls.clear()
            ids = torch.randint(0, 128, (1, n))
            with rt.apply(model, make_artifact(model.config, progs), backend="reference", min_length=1):
                cache = DynamicCache(config=model.config)
                model(ids[:, :-1], past_key_values=cache, use_cache=True)
                model(ids[:, -1:], past_key_values=cache, use_cache=True)
            assert len(calls) == want, (n, progs[0])


def test_only_this_instance_is_switched():
    a, b = tiny_model(), tiny_model()
    ids = torch.randint(0, 128, (1, 50))
    with torch.no_grad():
        b_before = b(ids).logits
        with rt.apply(a, make_artifact(a.config), backend="reference", min_length=1):
            assert b.config._attn_implementation == "sdpa"
            assert torch.equal(b(ids).logits, b_before)


def test_mismatch_and_double_apply_errors():
    model = tiny_model()
    art = make_artifact(model.config)
    bad_layers = Artifact(programs=art.programs, head_program=np.zeros((3, 4), np.int32), block_size=16)
    with pytest.raises(ArtifactError, match="num_hidden_layers"):
        rt.apply(model, bad_layers)
    bad_kv = Artifact(programs=art.programs, head_program=art.head_program, block_size=16,
                      metadata={"model": {"num_key_value_heads": 4, "head_dim": 16}})
    with pytest.raises(ArtifactError, match="num_key_value_heads"):
        rt.apply(model, bad_kv)
    with pytest.raises(rt.DamRuntimeError, match="backend"):
        rt.apply(model, art, backend="gpu")
    with rt.apply(model, art):
        with pytest.raises(rt.DamRuntimeError, match="already"):
            rt.apply(model, art)
    assert model.config._attn_implementation == "sdpa"


def _left_pad(seqs, pad_id=0):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = s
        mask[i, n - len(s):] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_padded_batch_rows_equal_alone(family, side):
    model = tiny_model(family)
    seqs = [torch.randint(1, 128, (n,)) for n in (150, 97, 33)]
    n = 150
    ids = torch.zeros((3, n), dtype=torch.long)
    mask = torch.zeros((3, n), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad(), rt.apply(model, make_artifact(model.config, MIXED_PROGRAMS), backend="reference",
                                   min_length=1, decode="sparse"):
        batch = model(ids, attention_mask=mask, position_ids=pos).logits
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            got = batch[i, mask[i].bool()]
            torch.testing.assert_close(got, alone, **TOL)


def test_chunked_prefill_equals_one_shot():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 200))
    with torch.no_grad(), rt.apply(model, make_artifact(model.config, MIXED_PROGRAMS), backend="reference",
                                   min_length=1, decode="sparse"):
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        parts = []
        for s in range(0, 200, 64):  # chunks on the block grid (block 16)
            parts.append(model(ids[:, s:s + 64], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)


def test_generate_decode_padded_batch_equals_alone(monkeypatch):
    model = tiny_model("qwen2")
    seqs = [torch.randint(1, 128, (n,)) for n in (120, 70)]
    ids, mask = _left_pad(seqs)
    calls = {"decode": 0}
    real = rt._kernels.sparse_decode

    def counting(*a, **kw):
        calls["decode"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(rt._kernels, "sparse_decode", counting)
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=0)
    with torch.no_grad(), rt.apply(model, make_artifact(model.config, MIXED_PROGRAMS), backend="reference",
                                   min_length=1, decode="sparse"):
        batch = model.generate(ids, attention_mask=mask, **kw)
        alone = [model.generate(s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **kw)
                 for s in seqs]
    assert calls["decode"] > 0  # decode went through block_sparse_decode
    for i, a in enumerate(alone):
        assert torch.equal(batch.sequences[i, ids.shape[1]:], a.sequences[0, len(seqs[i]):])
        for t in range(len(a.scores)):
            torch.testing.assert_close(batch.scores[t][i], a.scores[t][0], **TOL)


def test_short_prompts_use_dense_sdpa():
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 60))
    with torch.no_grad():
        want = model(ids).logits
        with rt.apply(model, make_artifact(model.config, MIXED_PROGRAMS), min_length=61):
            got = model(ids).logits
    torch.testing.assert_close(got, want, **FP32_TOL)


@pytest.mark.skipif("cpu" not in __import__("tests.runtime.test_attend", fromlist=["x"]).BACKENDS,
                    reason="dam.kernels CPU path not available")
def test_cpu_kernels_match_reference_backend():
    model = tiny_model()
    art = make_artifact(model.config, MIXED_PROGRAMS)
    ids = torch.randint(0, 128, (2, 130))
    with torch.no_grad():
        with rt.apply(model, art, backend="reference", min_length=1, decode="sparse"):
            ref = model(ids).logits
        with rt.apply(model, art, backend="cpu", min_length=1, decode="sparse"):
            got = model(ids).logits
    torch.testing.assert_close(got, ref, **TOL)


def test_load_from_local_dir(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    art = make_artifact(model.config)
    loaded = rt.load(tmp_path / "m", art, backend="reference", min_length=1)
    assert loaded.config._attn_implementation == "dam" and loaded.dam_handle.active
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        with rt.apply(model, art, backend="reference", min_length=1, decode="sparse"):
            want = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, **TOL)
    loaded.dam_handle.remove()
    bad = Artifact(programs=art.programs, head_program=np.zeros((5, 4), np.int32), block_size=16)
    with pytest.raises(ArtifactError):
        rt.load(tmp_path / "m", bad)


def test_runtime_imports_without_zarr_or_sklearn():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('zarr', 'sklearn'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dam.runtime\n"
        "assert 'zarr' not in sys.modules and 'sklearn' not in sys.modules\n"
        "assert 'dam.profiler' not in sys.modules\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_layout_hook_observes_and_substitutes():
    """The evaluation hook sees every block-sparse call's planned layout, and what it returns runs."""
    from dam.kernels import BlockLayout

    model = tiny_model()
    ids = torch.randint(0, 128, (1, 100))
    seen = []
    with torch.no_grad(), rt.apply(model, make_artifact(model.config, STATIC_PROGRAMS), backend="reference",
                                   min_length=1, decode="sparse") as h:
        planned = model(ids).logits

        def observe(layer, q, k, layout):
            seen.append((layer, tuple(q.shape), layout.kv_counts.clone()))
            return layout

        h.layout_hook = observe
        observed = model(ids).logits

        def full(layer, q, k, layout):  # every causal block: must equal the dense model
            nkb = -(-k.shape[2] // layout.block_n)
            mask = torch.ones(1, q.shape[1], layout.num_q_blocks, nkb, dtype=torch.bool)
            return BlockLayout.from_block_mask(mask, layout.block_m, layout.block_n)

        h.layout_hook = full
        substituted = model(ids).logits
    dense = model(ids).logits
    assert [s[0] for s in seen] == list(range(model.config.num_hidden_layers))
    assert all(s[1] == (1, 4, 100, 16) for s in seen)
    torch.testing.assert_close(observed, planned, rtol=0, atol=0)
    torch.testing.assert_close(substituted, dense, **TOL)
    assert not torch.allclose(planned, dense, **TOL)  # the programs did change the output


def test_cached_forward_plans_without_host_reads(monkeypatch):
    """A second forward at a cached length plans every layer (static lookup, dynamic scores,
    last-query estimate) without reading a tensor value on the host: each plan call is replayed
    on fake tensors first, where ``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero`` or a
    data-dependent shape raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dam.runtime.planner import Planner

    model = tiny_model()
    ids = torch.randint(0, 128, (2, 130))
    real_plan = Planner.plan
    replayed = []

    def checked(self, q_len, kv_len, q=None, k=None, scale=None):
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fq = None if q is None else mode.from_tensor(q)
            fk = None if k is None else mode.from_tensor(k)
            real_plan(self, q_len, kv_len, fq, fk, scale)
        replayed.append(q_len)
        return real_plan(self, q_len, kv_len, q, k, scale)

    with torch.no_grad(), rt.apply(model, make_artifact(model.config, MIXED_PROGRAMS), backend="cpu",
                                   min_length=1, last_query=0.2):
        first = model(ids).logits  # caches the length
        monkeypatch.setattr(Planner, "plan", checked)
        again = model(ids).logits
    assert replayed == [130] * model.config.num_hidden_layers
    torch.testing.assert_close(again, first, rtol=0, atol=0)
