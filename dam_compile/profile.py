"""Reading a ``dam.profile/1`` store (zarr v3) into means the compiler can fit.

The store holds *sums over samples* (see docs/architecture.md, "The profile store"); this reader
divides by ``count``. ``attn_mean`` can be large (``[L, H, P, P]`` float64), so it is read per
layer on demand; the other arrays are small and read eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .ir import ArtifactError

log = logging.getLogger(__name__)

PROFILE_SCHEMA = "dam.profile/1"


class ProfileReadError(ArtifactError):
    """A path is not a readable ``dam.profile/1`` store (subclass of ArtifactError)."""


@dataclass(frozen=True, eq=False)
class Profile:
    """Mean attention statistics of one model (sums / count).

    Attributes:
        diag_mass: float64 ``[L, H, N]``, mass per relative offset (sums to 1 per head).
        col_mass: float64 ``[L, H, N]``, mass per absolute key position (sums to 1 per head).
        block_mass: float64 ``[L, H, nB, nB]``, ``nB = ceil(N / B)``, mass per B x B block.
        topp_blocks: float64 ``[L, H, 3]``, mean KV blocks a query block needs for 90/95/99 %.
        attn: array-like ``[L, H, P, P]`` of *sums* (zarr array or numpy); use ``attn_mean``.
        count: samples accumulated.
        block_size: B.  length: N.  capture_length: P.
        attrs: the store's root attributes (``model``, ``calibration``, ...).
        block_err: float64 ``[L, H, nB, nB]`` or None (stores from before it existed): the
            value-aware block weight (see ``dam.profiler.ProfileStats``).
    """

    diag_mass: np.ndarray
    col_mass: np.ndarray
    block_mass: np.ndarray
    topp_blocks: np.ndarray
    attn: Any
    count: int
    block_size: int
    attrs: dict = field(default_factory=dict)
    block_err: np.ndarray | None = None

    def __post_init__(self) -> None:
        L, H, N = self.diag_mass.shape
        nb = -(-N // self.block_size)
        want = {
            "col_mass": (L, H, N),
            "block_mass": (L, H, nb, nb),
            "topp_blocks": (L, H, 3),
        }
        if self.block_err is not None:
            want["block_err"] = (L, H, nb, nb)
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ProfileReadError(f"profile array {name} has shape {got}, expected {shape}")
        ashape = tuple(self.attn.shape)
        if len(ashape) != 4 or ashape[:2] != (L, H) or ashape[2] != ashape[3] or ashape[2] < 1:
            raise ProfileReadError(f"profile array attn_mean has shape {ashape}, expected [{L}, {H}, P, P]")
        if self.count < 1:
            raise ProfileReadError("profile store has count < 1: it holds no samples; run dam profile")

    @property
    def num_layers(self) -> int:
        return int(self.diag_mass.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.diag_mass.shape[1])

    @property
    def length(self) -> int:
        return int(self.diag_mass.shape[2])

    @property
    def capture_length(self) -> int:
        return int(self.attn.shape[2])

    @property
    def model(self) -> dict:
        return dict(self.attrs.get("model", {}) or {})

    @property
    def num_kv_heads(self) -> int:
        return int(self.model.get("num_key_value_heads") or self.num_heads)

    def attn_mean(self, layer: int) -> np.ndarray:
        """float64 ``[H, P, P]``: mean attention of the first P queries over the first P keys."""
        return np.asarray(self.attn[layer], dtype=np.float64) / self.count

    @classmethod
    def from_means(
        cls,
        *,
        diag_mass: np.ndarray,
        col_mass: np.ndarray,
        block_mass: np.ndarray,
        topp_blocks: np.ndarray,
        attn_mean: np.ndarray,
        block_size: int,
        attrs: dict | None = None,
        block_err: np.ndarray | None = None,
    ) -> Profile:
        """Build a profile from mean arrays (count = 1), for tests and pooled statistics."""
        return cls(
            np.asarray(diag_mass, np.float64),
            np.asarray(col_mass, np.float64),
            np.asarray(block_mass, np.float64),
            np.asarray(topp_blocks, np.float64),
            np.asarray(attn_mean, np.float64),
            1,
            int(block_size),
            dict(attrs or {}),
            None if block_err is None else np.asarray(block_err, np.float64),
        )


def read_profile(path: str) -> Profile:
    """Open a ``dam.profile/1`` zarr store; raise ProfileReadError saying what is wrong."""
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a missing/odd path
        raise ProfileReadError(
            f"{path} is not a zarr profile store ({type(exc).__name__}: {exc}); "
            "create one with `dam profile`"
        ) from None
    attrs = dict(root.attrs)
    schema = attrs.get("schema")
    if schema != PROFILE_SCHEMA:
        raise ProfileReadError(
            f"{path} has schema {schema!r}, expected {PROFILE_SCHEMA!r}; create it with `dam profile`"
        )
    names = ("attn_mean", "diag_mass", "col_mass", "block_mass", "topp_blocks", "count")
    missing = [n for n in names if n not in root]
    if missing:
        raise ProfileReadError(f"profile store {path} lacks arrays {missing}; it may be incomplete")
    try:
        count = int(np.asarray(root["count"][...]))
        arrays = {n: np.asarray(root[n][...], dtype=np.float64) / max(count, 1)
                  for n in ("diag_mass", "col_mass", "block_mass", "topp_blocks", "block_err") if n in root}
    except Exception as exc:
        raise ProfileReadError(f"cannot read profile store {path}: {type(exc).__name__}: {exc}") from None
    bs = attrs.get("block_size")
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ProfileReadError(f"profile store {path} has an invalid block_size attribute {bs!r}")
    prof = Profile(
        arrays["diag_mass"], arrays["col_mass"], arrays["block_mass"], arrays["topp_blocks"],
        root["attn_mean"], count, bs, attrs, arrays.get("block_err"),
    )
    for name in ("diag_mass", "col_mass", "block_mass", "topp_blocks", "block_err"):
        if getattr(prof, name) is not None and not np.all(np.isfinite(getattr(prof, name))):
            raise ProfileReadError(f"profile store {path}: {name} holds NaN/inf; re-run dam profile")
    log.info("read profile %s: L=%d H=%d N=%d P=%d B=%d count=%d", path, prof.num_layers,
             prof.num_heads, prof.length, prof.capture_length, bs, count)
    return prof
