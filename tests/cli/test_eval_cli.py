"""`dam eval` and `dam bench` on a tiny local model with SmolLM2's tokenizer (no network)."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from dam.cli.main import main
from dam.compiler import save_artifact
from tests.runtime._helpers import MIXED_PROGRAMS, make_artifact


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, dam_cache):
    os.environ["DAM_CACHE"] = dam_cache
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dam.profiler.models import converted_dir, load_model

    if not (converted_dir("smollm2-135m") / "tokenizer.json").is_file():
        load_model("smollm2-135m")  # converts once into the cache
    d = tmp_path_factory.mktemp("tiny_eval")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    AutoTokenizer.from_pretrained(str(converted_dir("smollm2-135m"))).save_pretrained(d / "model")
    save_artifact(make_artifact(cfg, MIXED_PROGRAMS, block_size=16), d / "art.safetensors")
    (d / "text.txt").write_text(" ".join(f"word{i % 97} and number {i}." for i in range(3000)))
    return d


@pytest.mark.slow
def test_eval_writes_table_json_and_plots(tiny_dir, tmp_path):
    out = tmp_path / "ev"
    r = CliRunner().invoke(main, [
        "eval", str(tiny_dir / "model"), "--artifact", str(tiny_dir / "art.safetensors"),
        "--data", str(tiny_dir / "text.txt"), "--start", "1", "--lengths", "200,300", "--backend", "cpu",
        "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "skipped dam-paper: needs --profile" in r.output
    for name in ("eval.json", "eval_fidelity.png", "eval_density_recall.png", "eval_layer_density.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "eval.json").read_text())
    got = {(row["length"], row["method"]) for row in data["rows"]}
    assert got == {(n, m) for n in (200, 300) for m in ("dense", "dam", "streaming", "oracle", "minference")}
    for row in data["rows"]:
        assert 0 < row["density"] <= 1 and 0 < row["recall"] <= 1 + 1e-9
        assert 0 <= row["top1"] <= 1 and row["passkey_acc"] in (0.0, 1.0) and "kv-retrieval_acc" in row
    assert data["meta"]["lengths"] == [200, 300]
    for line in ("dense", "dam", "streaming", "oracle", "minference"):
        assert f" {line}" in r.output


@pytest.mark.slow
def test_eval_options_and_errors(tiny_dir, tmp_path):
    base = ["eval", str(tiny_dir / "model"), "--artifact", str(tiny_dir / "art.safetensors"),
            "--data", str(tiny_dir / "text.txt"), "--lengths", "160", "--backend", "cpu"]
    r = CliRunner().invoke(main, [*base, "--tasks", "fidelity", "--methods", "streaming",
                                  "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "a" / "eval.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"dense", "dam", "streaming"}  # dam always added
    assert not any("passkey_acc" in row for row in rows)
    bad = CliRunner().invoke(main, [*base, "--tasks", "nope"])
    assert bad.exit_code != 0 and "choose from" in bad.output
    lq = CliRunner().invoke(main, [*base, "--tasks", "fidelity", "--methods", "streaming", "--last-query", "0.2",
                                   "--out", str(tmp_path / "c")])
    assert lq.exit_code == 0, lq.output
    rows_lq = json.loads((tmp_path / "c" / "eval.json").read_text())["rows"]
    d0 = next(r["density"] for r in rows if r["method"] == "dam")
    d1 = next(r["density"] for r in rows_lq if r["method"] == "dam")
    assert d1 > d0  # the estimate added blocks
    bad_lq = CliRunner().invoke(main, [*base, "--last-query", "2"])
    assert bad_lq.exit_code != 0 and "--last-query" in bad_lq.output
    missing = CliRunner().invoke(main, [*base, "--data", "/no/such/file.txt", "--out", str(tmp_path / "b")])
    assert missing.exit_code == 1 and "Error: ProfileError" in missing.output
    pk = CliRunner().invoke(main, [*base, "--tasks", "passkey", "--methods", "dam", "--lengths", "200",
                                   "--passkey-depths", "0.1,0.9", "--out", str(tmp_path / "d")])
    assert pk.exit_code == 0, pk.output
    row = next(r for r in json.loads((tmp_path / "d" / "eval.json").read_text())["rows"] if r["method"] == "dam")
    assert set(row["passkey_by_depth"]) == {"0.1", "0.9"} and row["passkey_n"] == 2
    assert "passkey by depth, 200 tokens, dam: 0.1:" in pk.output
    for bad_depths in ("0.5,2", "x"):
        bad_pk = CliRunner().invoke(main, [*base, "--passkey-depths", bad_depths])
        assert bad_pk.exit_code != 0 and "--passkey-depths" in bad_pk.output


def test_eval_compares_artifacts_side_by_side_and_reports_domains(tiny_dir, tmp_path):
    art = str(tiny_dir / "art.safetensors")
    base = ["eval", str(tiny_dir / "model"), "--artifact", art, "--data", str(tiny_dir / "text.txt"),
            "--lengths", "160", "--backend", "cpu", "--tasks", "fidelity"]
    r = CliRunner().invoke(main, [*base, "--methods", "dam", "--compare", f"twin={art}", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "a" / "eval.json").read_text())
    rows = {row["method"]: row for row in data["rows"]}
    assert set(rows) == {"dense", "dam", "twin"}  # the compared artifact is added as a method
    for key in ("density", "top1", "kl", "ppl"):  # the same artifact, run the same way
        assert rows["twin"][key] == rows["dam"][key]
    assert data["meta"]["compare"] == {"twin": art}
    lq = CliRunner().invoke(main, [*base, "--methods", "dam,twin:last_query=0.3", "--compare", f"twin={art}",
                                   "--out", str(tmp_path / "b")])
    assert lq.exit_code == 0, lq.output
    rows_lq = {row["method"]: row for row in json.loads((tmp_path / "b" / "eval.json").read_text())["rows"]}
    assert set(rows_lq) == {"dense", "dam", "twin:last_query=0.3"}  # named with parameters, not added twice
    assert rows_lq["twin:last_query=0.3"]["density"] > rows_lq["dam"]["density"]
    two = tmp_path / "other.txt"
    two.write_text(" ".join(f"another sentence {i} of plain prose." for i in range(2000)))
    dom = CliRunner().invoke(main, [*base, "--methods", "dam", "--data", f"{tiny_dir / 'text.txt'},{two}",
                                    "--out", str(tmp_path / "d")])
    assert dom.exit_code == 0, dom.output
    row = next(r for r in json.loads((tmp_path / "d" / "eval.json").read_text())["rows"] if r["method"] == "dam")
    assert row["samples"] == 2 and set(row["by_domain"]) == {str(tiny_dir / "text.txt"), str(two)}
    assert "fidelity by domain, 160 tokens, dam:" in dom.output
    fl = CliRunner().invoke(main, [*base, "--methods", "dam", "--dtype", "bfloat16", "--floor",
                                   "--out", str(tmp_path / "e")])
    assert fl.exit_code == 0, fl.output
    rows_fl = {r["method"]: r for r in json.loads((tmp_path / "e" / "eval.json").read_text())["rows"]}
    assert set(rows_fl) == {"dense", "floor", "dam"} and 0.0 < rows_fl["floor"]["top1"] <= 1.0
    fl32 = CliRunner().invoke(main, [*base, "--methods", "dam", "--dtype", "float32", "--floor",
                                     "--out", str(tmp_path / "f")])
    assert fl32.exit_code == 0 and "no floor to measure" in fl32.output
    for bad, why in ((["--compare", "floor=" + art], "is taken"), (["--compare", "streaming=" + art], "is taken"), (["--compare", "x"], "NAME=PATH"),
                     (["--compare", "x=/no/such.safetensors"], "does not exist"),
                     (["--methods", "dam,nosuch"], "unknown method")):
        out = CliRunner().invoke(main, [*base, *bad, "--out", str(tmp_path / "c")])
        assert out.exit_code != 0 and why in out.output, out.output


@pytest.mark.slow
def test_bench_command(tiny_dir, tmp_path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, [
        "bench", str(tiny_dir / "model"), "--artifact", str(tiny_dir / "art.safetensors"),
        "--data", str(tiny_dir / "text.txt"), "--lengths", "128", "--repeats", "1", "--warmup", "0",
        "--decode-tokens", "2", "--min-length", "1", "--backend", "cpu", "--device", "cpu", "--last-query", "0.1",
        "--out", str(out)])
    assert r.exit_code == 0, r.output
    from dam.runtime.eval.bench import default_dtype

    want = default_dtype("cpu")  # bf16 on a CPU with native bf16, else float32
    assert "prefill dense" in r.output and f"cpu, {want}" in r.output and f"dtype {want} (auto" in r.output
    data = json.loads(out.read_text())
    row = data["rows"][0]
    assert row["length"] == 128 and row["prefill_dense_s"] > 0 and row["attn_dam_s"] > 0
    assert 0.0 <= row["attn_share"] <= 1.0 and 0.0 < row["density"] <= 1.0 and row["plan_share"] >= 0.0
    assert row["ceiling"] == 1.0 / (1.0 - row["attn_share"] + row["attn_share"] * row["density"])
    assert data["config"]["last_query"] == 0.1
