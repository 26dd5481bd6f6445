"""The mask-program IR: one head's sparse attention mask, for any sequence length.

A query at absolute position ``i`` keeps key ``j <= i`` when ``j < sink``, or ``i - j < window``,
or ``i - j`` is one of ``slashes``, or ``j`` is one of ``verticals``, or the program is ``dense``.
``dynamic_fraction`` adds, per query block and at run time, that fraction (at least one) of the
query block's causal KV blocks, chosen by the block log-sum-exp of the query block's mean query
against each key (``dam.runtime.planner``); it is not part of the static masks below.

``element_mask`` and ``block_mask`` are *the definition* the runtime planner must reproduce.
Queries are the last ``q_len`` of ``kv_len`` positions. ``block_mask`` tiles the ``q_len`` query
rows and the ``kv_len`` keys into ``block_size`` blocks; a block is kept when any kept element
falls in it, and the "diagonal" blocks (those holding a key ``j == i`` for some query ``i`` of the
query block) are always kept, so no query row is ever empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class ArtifactError(ValueError):
    """A mask program or artifact is invalid or damaged; the message says what and what to do."""



#: how many last queries the run-time estimate reads by default (MInference's choice)
LAST_QUERY_QUERIES = 64
#: the shipped recipe (``artifacts/README.md``): programs recall 90 % of each head's block weight,
#: and the runtime adds up to 15 % of causal blocks estimated from the last queries
DEFAULT_RECALL = 0.9
DEFAULT_LAST_QUERY = 0.15


def check_fraction(value, name: str, *, exc: type[Exception] = ArtifactError, allow_none: bool = False,
                   open_low: bool = False):
    """``value`` as a float in [0, 1] (``(0, 1]`` with ``open_low``), or ``None`` where allowed;
    ``exc`` naming ``name`` otherwise. The one check of every fraction knob (``last_query``, ...)."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating)) and math.isfinite(value) \
        and (0.0 < value if open_low else 0.0 <= value) and value <= 1.0
    if not ok:
        rng = "(0, 1]" if open_low else "[0, 1]"
        raise exc(f"{name} must be a fraction in {rng}{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def check_positive_int(value, name: str, *, exc: type[Exception] = ArtifactError, allow_none: bool = False):
    """``value`` as a positive int, or ``None`` where allowed; ``exc`` naming ``name`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise exc(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_block_size(value, name: str = "block_size", *, exc: type[Exception] = ArtifactError,
                     allow_none: bool = False):
    """``value`` as a power of two >= 16 (the kernels' tile rule), or ``None`` where allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 16 or value & (value - 1):
        raise exc(f"{name} must be a power of two >= 16{' or None' if allow_none else ''}, got {value!r}")
    return int(value)

@dataclass(frozen=True)
class MaskProgram:
    """One head's mask program (see module docstring for the semantics)."""

    sink: int = 0
    window: int = 0
    slashes: tuple[int, ...] = ()
    verticals: tuple[int, ...] = ()
    dynamic_fraction: float = 0.0
    dense: bool = False

    def __post_init__(self) -> None:
        for name in ("sink", "window"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
                raise ArtifactError(f"MaskProgram.{name} must be a non-negative int, got {val!r}")
            object.__setattr__(self, name, int(val))
        for name in ("slashes", "verticals"):
            vals = getattr(self, name)
            try:
                vals = tuple(int(v) for v in vals)
            except (TypeError, ValueError) as exc:
                raise ArtifactError(f"MaskProgram.{name} must be a sequence of ints") from exc
            if any(v < 0 for v in vals):
                raise ArtifactError(f"MaskProgram.{name} must be non-negative, got {vals}")
            object.__setattr__(self, name, tuple(sorted(set(vals))))
        frac = self.dynamic_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float, np.floating)):
            raise ArtifactError(f"MaskProgram.dynamic_fraction must be a float, got {frac!r}")
        frac = float(frac)
        if not (0.0 <= frac <= 1.0) or math.isnan(frac):
            raise ArtifactError(f"MaskProgram.dynamic_fraction must lie in [0, 1], got {frac}")
        object.__setattr__(self, "dynamic_fraction", frac)
        if not isinstance(self.dense, (bool, np.bool_)):
            raise ArtifactError(f"MaskProgram.dense must be a bool, got {self.dense!r}")
        object.__setattr__(self, "dense", bool(self.dense))

    @classmethod
    def dense_program(cls) -> MaskProgram:
        return cls(dense=True)

    # ------------------------------------------------------------------------------------
    def element_mask(self, q_len: int, kv_len: int) -> np.ndarray:
        """bool ``[q_len, kv_len]``: the static element mask (causal), queries last q_len."""
        _check_lengths(q_len, kv_len)
        i = np.arange(kv_len - q_len, kv_len)[:, None]
        j = np.arange(kv_len)[None, :]
        causal = j <= i
        if self.dense:
            return causal
        d = i - j
        keep = (j < self.sink) | (d < self.window)
        if self.slashes:
            keep |= np.isin(d, np.asarray(self.slashes))
        if self.verticals:
            keep |= np.isin(j, np.asarray(self.verticals))
        return keep & causal

    def block_mask(self, q_len: int, kv_len: int, block_size: int) -> np.ndarray:
        """bool ``[ceil(q_len/B), ceil(kv_len/B)]``: the static block mask (see module doc).

        Computed from offset ranges, exactly equal to max-pooling ``element_mask`` plus the
        diagonal blocks, in O(nQB * nKB * (|slashes| + |verticals|)) without the element mask.
        """
        _check_lengths(q_len, kv_len)
        if block_size < 1:
            raise ArtifactError(f"block_size must be positive, got {block_size}")
        B = block_size
        nqb, nkb = -(-q_len // B), -(-kv_len // B)
        off = kv_len - q_len
        a = np.arange(nqb)
        i0 = (off + a * B)[:, None]
        i1 = (off + np.minimum((a + 1) * B, q_len) - 1)[:, None]
        b = np.arange(nkb)
        j0 = (b * B)[None, :]
        j1 = np.minimum((b + 1) * B, kv_len)[None, :] - 1
        causal = j0 <= i1
        diag = (i0 <= j1) & causal
        if self.dense:
            return causal.copy()
        dmin = np.maximum(i0 - j1, 0)  # smallest causal offset i - j in the block pair
        dmax = i1 - j0  # largest
        keep = diag | (causal & (j0 < self.sink)) | (causal & (dmin < self.window))
        for s in self.slashes:
            keep |= causal & (dmin <= s) & (s <= dmax)
        for c in self.verticals:
            keep |= (j0 <= c) & (c <= j1) & (c <= i1)
        return keep

    def density(self, q_len: int, kv_len: int, block_size: int) -> float:
        """Kept fraction of the causal blocks, counting the dynamic budget (see dynamic_blocks)."""
        B = block_size
        full = MaskProgram(dense=True).block_mask(q_len, kv_len, B)
        static = self.block_mask(q_len, kv_len, B)
        extra = np.minimum(self.dynamic_blocks(full.sum(1)), (full & ~static).sum(1))
        return float((static.sum() + extra.sum()) / max(full.sum(), 1))

    def dynamic_blocks(self, causal_blocks: np.ndarray | int) -> np.ndarray:
        """Dynamic budget per query block: ceil(fraction * causal blocks), at least 1 if > 0."""
        n = np.asarray(causal_blocks)
        if self.dense or self.dynamic_fraction <= 0:
            return np.zeros_like(n)
        return np.maximum(np.ceil(self.dynamic_fraction * n).astype(n.dtype), 1)


def _check_lengths(q_len: int, kv_len: int) -> None:
    if q_len < 1 or kv_len < 1 or q_len > kv_len:
        raise ArtifactError(f"need 1 <= q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
