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
    # the documented command is the one recorded in the artifact's provenance
    readme = (ROOT / "artifacts" / "README.md").read_text()
    assert "dam compile" in readme and str(art.metadata["compile"]["target_length"]) in readme.replace("8k", "8192")
    assert "--recall 0.9 --last-query 0.15" in readme
    json.dumps(art.metadata)


def test_shipped_artifact_refuses_other_models():
    from transformers import LlamaConfig

    art = load_artifact(ART)
    with pytest.raises(ArtifactError, match="num_hidden_layers"):
        art.check_compatible(LlamaConfig(num_hidden_layers=24, num_attention_heads=9, num_key_value_heads=3,
                                         hidden_size=576, head_dim=64))
