"""`dam demo` end to end on a tiny local model (profile -> compile -> eval -> bench), then reuse."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from dam.cli.main import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, dam_cache):
    os.environ["DAM_CACHE"] = dam_cache
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dam.profiler.models import converted_dir, load_model

    if not (converted_dir("smollm2-135m") / "tokenizer.json").is_file():
        load_model("smollm2-135m")
    d = tmp_path_factory.mktemp("tiny_demo")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    AutoTokenizer.from_pretrained(str(converted_dir("smollm2-135m"))).save_pretrained(d / "model")
    (d / "text.txt").write_text(" ".join(f"word{i % 97} and number {i}." for i in range(4000)))
    return d


@pytest.mark.slow
def test_demo_runs_the_pipeline_and_reuses_outputs(tiny_dir, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--model", str(tiny_dir / "model"), "--out", str(out), "--profile-data",
            str(tiny_dir / "text.txt"), "--profile-length", "256", "--profile-samples", "2",
            "--lengths", "256", "--eval-data", str(tiny_dir / "text.txt"), "--eval-start", "2",
            "--repeats", "1", "--backend", "cpu", "--device", "cpu", "--passkey"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for step in ("[1/4] profile", "[2/4] compile dam", "[2/4] compile dam-paper", "[3/4] eval", "[4/4] bench"):
        assert step in r.output
    summary = r.output.split("summary at 256 tokens")[1]
    for m in ("dense", "dam", "streaming", "oracle", "minference", "dam-paper"):
        assert f"\n{m} " in summary
    assert "plots: " in r.output and "total" in r.output
    for name in ("profile.zarr", "dam.safetensors", "dam-paper.safetensors", "eval.json", "bench.json",
                 "eval_fidelity.png", "eval_density_recall.png", "eval_layer_density.png"):
        assert (out / name).exists(), name
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"dense", "dam", "streaming", "oracle", "minference", "dam-paper"}
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "profile: reusing" in again.output and "compile: reusing" in again.output
    changed = CliRunner().invoke(main, [*args, "--profile-samples", "1", "--lengths", "200",
                                        "--bench-lengths", "128"])
    assert changed.exit_code == 0, changed.output
    assert "[1/4] profile" in changed.output and "reusing" not in changed.output


@pytest.mark.slow
def test_demo_with_an_artifact_evaluates_and_benches_it_and_writes_the_summary(tiny_dir, tmp_path):
    """The default path (a shipped artifact): no profile or compile; summary.json as documented."""
    built = tmp_path / "built"
    base = ["demo", "--model", str(tiny_dir / "model"), "--lengths", "256", "--eval-data", str(tiny_dir / "text.txt"),
            "--eval-start", "2", "--repeats", "1", "--backend", "cpu", "--device", "cpu", "--dtype", "float32"]
    r = CliRunner().invoke(main, [*base, "--out", str(built), "--profile-data", str(tiny_dir / "text.txt"),
                                  "--profile-samples", "2"])
    assert r.exit_code == 0, r.output
    assert "no shipped artifact" in r.output and "[1/4] profile" in r.output  # a local model: built
    art = built / "dam.safetensors"
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, [*base, "--out", str(out), "--artifact", str(art)])
    assert r.exit_code == 0, r.output
    assert "[1/3] artifact" in r.output and "[2/3] eval" in r.output and "[3/3] bench" in r.output
    assert "[1/4]" not in r.output and "[2/4]" not in r.output
    assert not (out / "profile.zarr").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["length"] == 256 and summary["dtype"] == "float32"
    assert summary["schema"] == "dam.result/1" and summary["meta"]["dtype"] == "float32"  # with provenance
    assert summary["meta"]["commit"] and summary["steps_s"]["total"] > 0
    assert set(summary["methods"]) == {"dense", "dam", "streaming", "minference"}
    for name, m in summary["methods"].items():
        assert set(m) == {"density", "recall", "top1", "kl", "dppl", "prefill_speedup"}, name
        assert 0.0 < m["density"] <= 1.0 and 0.0 <= m["top1"] <= 1.0 and m["kl"] >= 0.0
    assert summary["methods"]["dense"]["prefill_speedup"] == 1.0
    bench = json.loads((out / "bench.json").read_text())["rows"][0]
    assert summary["methods"]["dam"]["prefill_speedup"] == bench["prefill_speedup"] > 0
    assert summary["methods"]["streaming"]["prefill_speedup"] is None
    # the baselines run at DAM's density on the same input
    for b in ("streaming", "minference"):
        assert abs(summary["methods"][b]["density"] - summary["methods"]["dam"]["density"]) < 0.1
    bad = CliRunner().invoke(main, [*base, "--out", str(out), "--artifact", str(art), "--build"])
    assert bad.exit_code != 0 and "not both" in bad.output


def test_shipped_artifact_lookup():
    from dam.cli.demo import shipped_artifact

    assert shipped_artifact("smollm2-135m").endswith("artifacts/smollm2-135m.dam.safetensors")
    assert shipped_artifact("some/local-model") is None
