"""The block layout: the one currency between planning and kernels.

A layout says, per (batch or 1, head, query block), which KV blocks are computed. Query block
``a`` covers query rows ``[a * block_m, (a + 1) * block_m)`` of the ``q_len`` queries; KV block
``b`` covers keys ``[b * block_n, (b + 1) * block_n)``. The queries are the *last* ``q_len``
positions of the ``kv_len`` keys (chunked prefill / decode), so query row ``r`` sits at absolute
position ``kv_len - q_len + r`` and causality keeps key ``j <= kv_len - q_len + r``. Causality and
ragged tails are applied inside the kernels, never encoded in the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LayoutError(ValueError):
    """A block layout (or a kernel's inputs) is malformed; the message says what and how to fix it."""


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Per (batch or 1, head, query block): the sorted active KV blocks.

    Attributes:
        kv_indices: int32 ``[Bl, H, nQB, max_blocks]``, ``Bl`` is the batch size or 1 (shared by
            the batch). Each row holds ``kv_counts`` sorted, distinct, non-negative block indices,
            then ``-1`` padding.
        kv_counts: int32 ``[Bl, H, nQB]``, in ``[0, max_blocks]``.
        block_m: query rows per query block (a power of two >= 16).
        block_n: keys per KV block (a power of two >= 16).
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    block_m: int
    block_n: int

    def __post_init__(self) -> None:
        idx, cnt = self.kv_indices, self.kv_counts
        if not isinstance(idx, torch.Tensor) or not isinstance(cnt, torch.Tensor):
            raise LayoutError("kv_indices and kv_counts must be torch tensors")
        if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
            raise LayoutError(
                f"kv_indices and kv_counts must be int32, got {idx.dtype} and {cnt.dtype}"
            )
        if idx.dim() != 4:
            raise LayoutError(f"kv_indices must be [B|1, H, nQB, max_blocks], got shape {tuple(idx.shape)}")
        if tuple(cnt.shape) != tuple(idx.shape[:3]):
            raise LayoutError(
                f"kv_counts shape {tuple(cnt.shape)} must equal kv_indices' first three dims "
                f"{tuple(idx.shape[:3])}"
            )
        if idx.device != cnt.device:
            raise LayoutError(f"kv_indices on {idx.device} but kv_counts on {cnt.device}")
        for name, val in (("block_m", self.block_m), ("block_n", self.block_n)):
            if not isinstance(val, int) or val < 16 or val & (val - 1):
                raise LayoutError(f"{name} must be a power of two >= 16, got {val!r}")

    # --- shape helpers -------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return int(self.kv_indices.shape[0])

    @property
    def heads(self) -> int:
        return int(self.kv_indices.shape[1])

    @property
    def num_q_blocks(self) -> int:
        return int(self.kv_indices.shape[2])

    @property
    def max_blocks(self) -> int:
        return int(self.kv_indices.shape[3])

    def to(self, device: torch.device | str) -> BlockLayout:
        return BlockLayout(self.kv_indices.to(device), self.kv_counts.to(device), self.block_m, self.block_n)

    # --- validation of contents (host sync: for tests and loaders, not the hot path) -----
    def validate(self, kv_len: int | None = None) -> None:
        """Check contents: counts in range, sorted distinct indices, -1 padding, indices < nKB."""
        idx = self.kv_indices.to("cpu", torch.int64)
        cnt = self.kv_counts.to("cpu", torch.int64)
        mb = idx.shape[-1]
        if bool((cnt < 0).any()) or bool((cnt > mb).any()):
            raise LayoutError(f"kv_counts must lie in [0, {mb}]")
        pos = torch.arange(mb).expand_as(idx)
        active = pos < cnt.unsqueeze(-1)
        if bool((idx[~active] != -1).any()):
            raise LayoutError("kv_indices must be padded with -1 after kv_counts entries")
        if bool((idx[active] < 0).any()):
            raise LayoutError("active kv_indices must be non-negative")
        if mb > 1:
            both = active[..., 1:]
            if bool((idx[..., 1:][both] <= idx[..., :-1][both]).any()):
                raise LayoutError("active kv_indices must be strictly increasing in each row")
        if kv_len is not None:
            nkb = -(-kv_len // self.block_n)
            if bool((idx[active] >= nkb).any()):
                raise LayoutError(f"kv_indices reach past the {nkb} KV blocks of kv_len={kv_len}")

    # --- conversions ---------------------------------------------------------------------
    @classmethod
    def from_block_mask(cls, mask: torch.Tensor, block_m: int, block_n: int) -> BlockLayout:
        """Build a layout from a bool block mask ``[Bl, H, nQB, nKB]`` (True = compute block)."""
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise LayoutError(f"mask must be bool [Bl, H, nQB, nKB], got {mask.dtype} {tuple(mask.shape)}")
        nkb = mask.shape[-1]
        counts = mask.sum(-1, dtype=torch.int32)
        max_blocks = max(int(counts.max()) if counts.numel() else 0, 1)
        ar = torch.arange(nkb, device=mask.device, dtype=torch.int32)
        # sort key: active blocks first in ascending order, inactive after
        key = torch.where(mask, ar, ar + nkb)
        order = key.sort(dim=-1).values[..., :max_blocks]
        if order.shape[-1] < max_blocks:  # nkb < 1 cannot happen, but keep shapes honest
            pad = order.new_full((*order.shape[:-1], max_blocks - order.shape[-1]), -1)
            order = torch.cat([order, pad], -1)
        pos = torch.arange(max_blocks, device=mask.device, dtype=torch.int32)
        idx = torch.where(pos < counts.unsqueeze(-1), order, torch.full_like(order, -1))
        return cls(idx.to(torch.int32).contiguous(), counts.contiguous(), block_m, block_n)

    def block_mask(self, num_kv_blocks: int) -> torch.Tensor:
        """bool ``[Bl, H, nQB, num_kv_blocks]``: which blocks are active."""
        idx = self.kv_indices.long()
        out = torch.zeros((*idx.shape[:3], num_kv_blocks + 1), dtype=torch.bool, device=idx.device)
        safe = torch.where(idx < 0, torch.full_like(idx, num_kv_blocks), idx.clamp(max=num_kv_blocks))
        out.scatter_(-1, safe, True)
        return out[..., :num_kv_blocks]

    def to_dense(self, q_len: int, kv_len: int) -> torch.Tensor:
        """bool ``[Bl, H, q_len, kv_len]``: block mask AND causal (queries are the last q_len keys)."""
        if q_len > kv_len:
            raise LayoutError(f"q_len ({q_len}) must not exceed kv_len ({kv_len})")
        nqb = -(-q_len // self.block_m)
        if nqb != self.num_q_blocks:
            raise LayoutError(
                f"layout has {self.num_q_blocks} query blocks but q_len={q_len} with "
                f"block_m={self.block_m} needs {nqb}"
            )
        nkb = -(-kv_len // self.block_n)
        self.validate(kv_len)
        bm = self.block_mask(nkb)
        dense = bm.repeat_interleave(self.block_m, dim=2)[:, :, :q_len]
        dense = dense.repeat_interleave(self.block_n, dim=3)[..., :kv_len]
        rows = torch.arange(q_len, device=dense.device).unsqueeze(1) + (kv_len - q_len)
        cols = torch.arange(kv_len, device=dense.device).unsqueeze(0)
        return dense & (cols <= rows)
