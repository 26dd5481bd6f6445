"""Greedy generation with DAM (and optionally dense, for comparison), with streaming and timings.

Used by ``dam generate``; the model and tokenizer are loaded by the caller.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dam.compiler import Artifact

from .errors import DamRuntimeError
from .integration import MIN_LENGTH, apply


@dataclass(frozen=True)
class GenerateConfig:
    """What to generate and how.

    Attributes:
        prompt: the prompt text (non-empty).
        max_new_tokens: tokens to generate (greedy).
        compare_dense: also run dense attention and compare.
        backend, min_length: passed to :func:`dam.runtime.apply`.
    """

    prompt: str
    max_new_tokens: int = 64
    compare_dense: bool = False
    backend: str = "auto"
    min_length: int = MIN_LENGTH

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise DamRuntimeError("the prompt is empty: give --prompt TEXT or a non-empty --prompt-file")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise DamRuntimeError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")


@dataclass
class RunStats:
    """One generation: the new token ids, prefill seconds, mean seconds per decoded token."""

    tokens: list[int]
    prefill_s: float
    decode_s_per_token: float
    text: str = ""


@dataclass
class GenerateReport:
    prompt_tokens: int
    dam: RunStats
    dense: RunStats | None = None
    extra: dict = field(default_factory=dict)

    @property
    def agree(self) -> bool | None:
        return None if self.dense is None else self.dam.tokens == self.dense.tokens

    @property
    def first_divergence(self) -> int | None:
        if self.dense is None:
            return None
        for i, (a, b) in enumerate(zip(self.dam.tokens, self.dense.tokens, strict=False)):
            if a != b:
                return i
        return None if len(self.dam.tokens) == len(self.dense.tokens) else min(
            len(self.dam.tokens), len(self.dense.tokens))


class _Streamer:
    """transformers streamer: records token arrival times, streams decoded text to a callback."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None) -> None:
        self.tok, self.on_text = tokenizer, on_text
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self.ids: list[int] = []
        self._prompt_seen = False
        self._shown = 0

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.ids.extend(int(x) for x in value.reshape(-1).tolist())
        if self.on_text is not None:
            text = self.tok.decode(self.ids, skip_special_tokens=True)
            if len(text) > self._shown:
                self.on_text(text[self._shown:])
                self._shown = len(text)

    def end(self) -> None:
        pass


def _run(model, tokenizer, ids, cfg: GenerateConfig, on_text) -> RunStats:
    streamer = _Streamer(tokenizer, on_text)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamer.t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                       do_sample=False, streamer=streamer, pad_token_id=pad)
    t = streamer.times
    prefill = (t[0] - streamer.t0) if t else float("nan")
    per_tok = (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else float("nan")
    return RunStats(streamer.ids, prefill, per_tok, tokenizer.decode(streamer.ids, skip_special_tokens=True))


def generate(
    model: torch.nn.Module,
    tokenizer,
    artifact: Artifact | str | os.PathLike,
    config: GenerateConfig,
    *,
    on_text: Callable[[str], None] | None = None,
    on_dense_text: Callable[[str], None] | None = None,
) -> GenerateReport:
    """Greedy-generate ``config.max_new_tokens`` tokens with DAM applied (removed afterwards).

    ``on_text`` receives the DAM text as it streams; with ``compare_dense`` the same prompt is
    then run densely (``on_dense_text``) and the report says whether the tokens agree.
    """
    ids = tokenizer(config.prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    with apply(model, artifact, backend=config.backend, min_length=config.min_length):
        dam_stats = _run(model, tokenizer, ids, config, on_text)
    dense_stats = _run(model, tokenizer, ids, config, on_dense_text) if config.compare_dense else None
    return GenerateReport(prompt_tokens=int(ids.shape[1]), dam=dam_stats, dense=dense_stats)
