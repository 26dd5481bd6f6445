"""`dam profile`: flags -> config -> one call; summary line; one-line errors."""

from __future__ import annotations

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
        load_model("smollm2-135m")  # converts once into the cache
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(str(converted_dir("smollm2-135m"))).save_pretrained(d)
    return str(d)


def test_profile_command_writes_store_and_summary(tmp_path, tiny_dir):
    out = tmp_path / "o.zarr"
    args = ["profile", tiny_dir, "--data", "builtin:mix", "--length", "256", "--samples", "3",
            "--capture-length", "32", "--block-size", "32", "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "profiled 3 samples (3 in store), 768 tokens" in r.output and "tokens/s" in r.output
    assert "store " in r.output and ("KiB" in r.output or "MiB" in r.output)
    from dam.profiler import read_store

    attrs, st = read_store(out)
    assert st.count == 3 and attrs["calibration"]["capture_length"] == 32
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "ProfileError" in r.output and "--resume" in r.output
    assert r.output.strip().splitlines() == [r.output.strip()]  # refused before loading anything
    r = CliRunner().invoke(main, [*args[:-6], "--samples", "4", "--capture-length", "32",
                                  "--block-size", "32", "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert "profiled 1 samples (4 in store)" in r.output


@pytest.mark.parametrize(
    "args,msg",
    [
        (["nonsense-model", "--out", "x.zarr"], "unknown model"),
        (["m/x", "--data", "builtin:nope", "--out", "x.zarr"], "unknown built-in"),
        (["m/x", "--length", "64", "--capture-length", "128", "--out", "x.zarr"], "capture length"),
    ],
)
def test_bad_inputs_give_one_line(args, msg):
    r = CliRunner().invoke(main, ["profile", *args])
    assert r.exit_code == 1, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if "Error" in line]) == 1


def test_bad_length_and_help():
    r = CliRunner().invoke(main, ["profile", "m/x", "--length", "ten", "--out", "x"])
    assert r.exit_code == 2 and "not a length" in r.output
    r = CliRunner().invoke(main, ["profile", "--help"])
    assert r.exit_code == 0 and "--capture-length" in r.output and "--resume" in r.output


def test_cli_defaults_are_the_configs():
    """The flags' defaults are ProfileConfig's (the shipped recipe), and the capture length follows a
    short --length down instead of failing."""
    from dam.cli.profile import profile as cmd
    from dam.profiler import ProfileConfig
    from dam.profiler.run import DEFAULT_CAPTURE_LENGTH

    flags = {p.name: p.default for p in cmd.params}
    cfg = ProfileConfig(model="m", out="x.zarr")
    assert flags["samples"] == cfg.samples and flags["data"] == cfg.data and flags["block_size"] == cfg.block_size
    assert int(flags["length"]) == cfg.length and cfg.capture_length == DEFAULT_CAPTURE_LENGTH
    assert ProfileConfig(model="m", out="x.zarr", length=100).capture_length == 100
    assert ProfileConfig(model="m", out="x.zarr", length=4096, capture_length=32).capture_length == 32
