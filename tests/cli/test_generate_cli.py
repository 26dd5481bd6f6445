"""``dam generate`` on a tiny local model with a word-level tokenizer (no network)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from dam.cli.main import main
from dam.compiler import Artifact, save_artifact
from tests.runtime._helpers import MIXED_PROGRAMS, make_artifact, tiny_model

WORDS = [f"w{i}" for i in range(120)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("gen")
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    model = tiny_model()
    model.config.eos_token_id = 1
    model.generation_config.eos_token_id = None  # always generate the full budget
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    save_artifact(make_artifact(model.config, MIXED_PROGRAMS), root / "art.safetensors")
    good = make_artifact(model.config, MIXED_PROGRAMS)
    meta = {"model": {**good.metadata["model"], "num_hidden_layers": 7}}
    bad = Artifact(programs=MIXED_PROGRAMS, head_program=np.zeros((7, 4), np.int32), block_size=16,
                   metadata=meta)
    save_artifact(bad, root / "bad.safetensors")
    return root


def test_generate_streams_and_compares(tiny_dir):
    prompt = " ".join(np.random.choice(WORDS, 70))
    res = CliRunner().invoke(main, [
        "generate", str(tiny_dir / "model"), "--artifact", str(tiny_dir / "art.safetensors"),
        "--prompt", prompt, "--max-new-tokens", "5", "--compare-dense", "--backend", "cpu",
        "--min-length", "1",
    ])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "--- dam ---" in out and "--- dense ---" in out
    assert "prefill (s)" in out and "decode (ms/tok)" in out
    assert "outputs agree:" in out


def test_generate_prompt_file_and_errors(tiny_dir, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("w1 w2 w3 w4")
    ok = CliRunner().invoke(main, ["generate", str(tiny_dir / "model"), "--artifact",
                                   str(tiny_dir / "art.safetensors"), "--prompt-file", str(f),
                                   "--max-new-tokens", "3", "--backend", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert len(ok.output.split()) >= 1
    bad = CliRunner().invoke(main, ["generate", str(tiny_dir / "model"), "--artifact",
                                    str(tiny_dir / "bad.safetensors"), "--prompt", "w1 w2"])
    assert bad.exit_code == 1
    assert "ArtifactError" in bad.output and "num_hidden_layers" in bad.output
    assert "Traceback" not in bad.output
    both = CliRunner().invoke(main, ["generate", str(tiny_dir / "model"), "--artifact",
                                     str(tiny_dir / "art.safetensors")])
    assert both.exit_code == 2 and "exactly one" in both.output
