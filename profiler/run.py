"""``profile(config)``: load, sample, capture, and flush into the store (optionally sharded)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import store as _store
from .capture import ProfileStats, capture
from .data import calibration_samples, parse_data_spec
from .errors import ProfileError
from .models import load_model, model_fingerprint, resolve_dtype

log = logging.getLogger(__name__)

#: the shipped recipe (``artifacts/README.md``): three samples (of ``builtin:mix``: code, pass-key,
#: key-value retrieval), the full map of the first 256 queries kept
DEFAULT_SAMPLES = 3
DEFAULT_CAPTURE_LENGTH = 256


@dataclass(frozen=True)
class ProfileConfig:
    """Everything ``dam profile`` needs.

    ``samples`` is the number of samples the store holds when the run ends: a fresh run
    captures that many; with ``resume`` the existing samples count towards it and the run
    continues the same deterministic sample stream after them. ``capture_length`` None means
    ``DEFAULT_CAPTURE_LENGTH`` or the length when that is shorter.
    """

    model: str
    out: str
    data: str = "builtin:mix"
    length: int = 1024
    samples: int = DEFAULT_SAMPLES
    capture_length: int | None = None
    block_size: int = 64
    batch_size: int = 1
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None
    resume: bool = False
    overwrite: bool = False
    flush_seconds: float = 30.0
    chunk: int | None = None

    def __post_init__(self):
        if self.capture_length is None and isinstance(self.length, int):
            object.__setattr__(self, "capture_length", min(DEFAULT_CAPTURE_LENGTH, self.length))
        for name in ("length", "samples", "capture_length", "block_size", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ProfileError(f"{name.replace('_', ' ')} must be a positive integer, got {v!r}")
        if self.capture_length > self.length:
            raise ProfileError(f"capture length {self.capture_length} exceeds the length {self.length}; lower --capture-length")
        if self.resume and self.overwrite:
            raise ProfileError("--resume and --overwrite exclude each other; pick one")
        if self.flush_seconds < 0:
            raise ProfileError("flush_seconds must be >= 0")
        if self.chunk is not None and self.chunk < 1:
            raise ProfileError("chunk must be positive")
        resolve_dtype(self.dtype)
        parse_data_spec(self.data)


@dataclass(frozen=True)
class ProfileSummary:
    """What a run did. ``tokens`` and ``seconds`` cover the samples added by this run."""

    out: str
    samples_added: int
    samples_total: int
    tokens: int
    seconds: float
    store_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _dist():
    """(rank, world, dist module or None, whether we initialised the group) under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None, False
    import torch.distributed as dist

    if not dist.is_available():
        raise ProfileError("WORLD_SIZE > 1 but torch.distributed is not available")
    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), dist, mine


def _attrs(config: ProfileConfig, model, old: dict | None, added: int) -> dict:
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    sources = parse_data_spec(config.data)
    run = {"sources": sources, "seed": config.seed, "samples_added": added,
           "batch_size": config.batch_size, "tool_version": _store.tool_version()}
    if old is not None:
        cal = dict(old["calibration"])
        cal["sources"] = list(dict.fromkeys([*cal.get("sources", []), *sources]))
        cal["runs"] = [*cal.get("runs", []), run]
    else:
        cal = {"sources": sources, "length": config.length, "capture_length": config.capture_length,
               "seed": config.seed, "batch_size": config.batch_size, "runs": [run]}
    cal["samples"] = sum(r["samples_added"] for r in cal["runs"])
    return {"model": model_fingerprint(model.config), "calibration": cal, "dtype": dtype,
            "block_size": config.block_size}


def profile(config: ProfileConfig, progress: Callable[[int, int], None] | None = None,
            model_and_tokenizer=None) -> ProfileSummary:
    """Profile ``config.model`` into the store ``config.out``.

    Args:
        config: the run's settings.
        progress: called as ``progress(done, total)`` (samples of this run, all ranks) after
            every step, on rank 0 only.
        model_and_tokenizer: an already loaded ``(model, tokenizer)`` to use instead of loading
            ``config.model``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each rank captures a disjoint slice of every step's
    samples; sums are all-reduced before rank 0 writes. Flushes happen at most every
    ``flush_seconds`` and at the end; on Ctrl-C the completed samples are flushed first.
    """
    rank, world, dist, own_group = _dist()
    try:
        return _profile(config, progress, model_and_tokenizer, rank, world, dist)
    finally:
        if own_group:
            dist.destroy_process_group()


def _rank0_decides(rank: int, dist, decide: Callable[[], object]) -> object:
    """Run ``decide()`` on rank 0 and broadcast its result, or its ProfileError, to every rank."""
    decision: list = [None, None]
    if rank == 0:
        try:
            decision = [None, decide()]
        except ProfileError as exc:
            decision = [str(exc), None]
    if dist is not None:
        dist.broadcast_object_list(decision, src=0)
    if decision[0] is not None:
        raise ProfileError(decision[0])
    return decision[1]


def _check_out(config) -> None:
    """Cheap checks of ``--out`` first, before spending seconds on loading the model."""
    if _store.exists(config.out):
        if config.overwrite or config.resume:
            _store.read_attrs(config.out)  # refuse to touch something that is not a DAM store
        else:
            raise ProfileError(f"{config.out} already exists; pass --resume to add samples up to "
                               "--samples, or --overwrite to replace it")


def _read_resume(config, model) -> tuple[dict | None, ProfileStats | None]:
    """The stored attributes and sums a ``--resume`` run continues from (None, None otherwise)."""
    if not (config.resume and _store.exists(config.out)):
        return None, None
    old, total = _store.read_store(config.out)
    diffs = _store.resume_mismatches(old, _attrs(config, model, None, 0))
    if diffs:
        raise ProfileError(f"cannot resume {config.out}: " + "; ".join(diffs)
                           + ". Use the same settings, or write a new store with --out")
    return old, total


def _all_ranks_flush(dist, want: bool, pending: ProfileStats) -> bool:
    """Under torchrun: flush when any rank wants to, summing every rank's pending sums first."""
    if dist is None:
        return want
    flag = torch.tensor([1.0 if want else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not bool(flag.item()):
        return False
    for t in pending.arrays().values():
        dist.all_reduce(t)
    cnt = torch.tensor([pending.count], dtype=torch.long)
    dist.all_reduce(cnt)
    pending.count = int(cnt.item())
    return True


def _profile(config, progress, model_and_tokenizer, rank, world, dist) -> ProfileSummary:
    out = config.out
    _rank0_decides(rank, dist, lambda: _check_out(config))
    model, tok = model_and_tokenizer or load_model(config.model, dtype=config.dtype, device=config.device)
    resumed: list = [None]  # rank 0 keeps the stored sums it resumes from; other ranks start from zero

    def decide() -> tuple[dict | None, int]:
        old, stats = _read_resume(config, model)
        resumed[0] = stats
        return old, stats.count if stats is not None else 0

    # rank 0 decides where the run starts; every rank learns it (or the error) by broadcast
    old_attrs, start = _rank0_decides(rank, dist, decide)
    total = resumed[0]

    todo = max(0, config.samples - start)
    if todo == 0:
        log.info("%s already holds %d samples (>= %d); nothing to add", out, start, config.samples)
    ids = calibration_samples(config.data, tok, config.length, todo, seed=config.seed, start=start)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    L, H = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    zeros = lambda: ProfileStats.zeros(L, H, config.length, config.capture_length, config.block_size)
    if total is None:
        total = zeros()
    pending = zeros()
    step_size = world * config.batch_size
    steps = math.ceil(todo / step_size)
    done = flushed = 0
    t0 = last_flush = time.perf_counter()

    def flush():
        nonlocal total, pending, flushed
        if rank == 0:
            total = total + pending
            _store.write_store(out, total, _attrs(config, model, old_attrs, total.count - start))
            flushed = total.count - start
        pending = zeros()

    try:
        for s in range(steps):
            lo = s * step_size + rank * config.batch_size
            hi = min(todo, lo + config.batch_size)
            if lo < hi:
                pending = pending + capture(model, ids[lo:hi], capture_length=config.capture_length,
                                            block_size=config.block_size, chunk=config.chunk)
            done = min(todo, (s + 1) * step_size)
            last = s == steps - 1
            want = last or time.perf_counter() - last_flush >= config.flush_seconds
            if _all_ranks_flush(dist, want, pending):
                flush()
                last_flush = time.perf_counter()
            if progress is not None and rank == 0:
                progress(done, todo)
    except KeyboardInterrupt:
        if dist is None and pending.count:
            log.warning("interrupted: flushing %d completed samples to %s", pending.count, out)
            flush()
        raise
    if todo == 0 and rank == 0 and not _store.exists(out):
        flush()
    seconds = time.perf_counter() - t0
    size = _store.store_bytes(out) if rank == 0 and _store.exists(out) else 0
    return ProfileSummary(out=str(out), samples_added=done, samples_total=start + done,
                          tokens=done * config.length, seconds=seconds, store_bytes=size)
