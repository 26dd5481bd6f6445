"""The shipped artifact loads (checksum, schema, shapes validated) and matches SmolLM2-135M."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dam.compiler import ArtifactError, load_artifact

ROOT = Path(__file__).resolve().parents[1]
ART = ROOT / "artifacts" / "smollm2-135m.dam.safetensors"


def _smollm2_config():
    """SmolLM2-135M's config from the converted cache, or the numbers of its published config."""
    from dam.profiler.models import converted_dir

    cfg = converted_dir("smollm2-135m") / "config.json"
    if cfg.is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(cfg.parent))
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                       head_dim=64)


def test_shipped_artifact_loads_and_matches_smollm2():
    art = load_artifact(ART)
    cfg = _smollm2_config()
    art.check_compatible(cfg)  # raises on any mismatch
    assert (art.num_layers, art.num_heads) == (cfg.num_hidden_layers, cfg.num_attention_heads) == (30, 9)
    fp = art.metadata["model"]
    assert fp["name_or_path"] == "smollm2-135m" and fp["num_key_value_heads"] == 3 and fp["head_dim"] == 64
    assert art.metadata["calibration"]["sources"] == ["builtin:stdlib", "builtin:passkey", "builtin:kv-retrieval"]
    assert art.metadata["compile"]["method"] == "recall" and art.metadata["compile"]["recall"] == 0.9
    assert art.metadata["runtime"]["last_query"] == 0.15
    assert art.block_size == 64
    # the documented commands are the defaults plus model, data and length: the recorded settings
    # are the default ones (target length = the profiled length; objective auto resolved)
    import dataclasses

    from dam.compiler import CompileConfig
    from dam.profiler import ProfileConfig

    recorded = art.metadata["compile"]
    for f in dataclasses.fields(CompileConfig):
        want = {"target_length": art.metadata["calibration"]["length"], "objective": "error"}.get(
            f.name, getattr(CompileConfig(), f.name))
        assert recorded[f.name] == want, f.name
    cal = art.metadata["calibration"]
    pdef = ProfileConfig(model="m", out="x", length=cal["length"])
    assert (cal["samples"], cal["capture_length"], cal["seed"], cal["batch_size"]) == (
        pdef.samples, pdef.capture_length, pdef.seed, pdef.batch_size)
    readme = (ROOT / "artifacts" / "README.md").read_text()
    assert "dam profile smollm2-135m --data builtin:mix --length 8k --out" in readme
    assert "dam compile /tmp/smollm2-mix-8k.zarr --out artifacts/smollm2-135m.dam.safetensors" in readme
    assert cal["length"] == 8192 and pdef.data == "builtin:mix"
    json.dumps(art.metadata)


def test_shipped_artifact_refuses_other_models():
    from transformers import LlamaConfig

    art = load_artifact(ART)
    with pytest.raises(ArtifactError, match="num_hidden_layers"):
        art.check_compatible(LlamaConfig(num_hidden_layers=24, num_attention_heads=9, num_key_value_heads=3,
                                         hidden_size=576, head_dim=64))
