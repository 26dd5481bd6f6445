"""Synthetic block layouts for benchmarks and checks (not used by the serving path).

Realistic in the way compiled programs are: every query block keeps the sink block and a local
window (the diagonal block and the one before), then random far blocks up to a target fraction
of its causal blocks; :func:`gqa_mask` makes the query heads of a KV head share most of their
far blocks, as a real artifact's heads do.
"""

from __future__ import annotations

import torch

__all__ = ["element_density", "flex_block_mask", "gqa_mask", "realistic_mask"]


def realistic_mask(heads: int, nqb: int, density: float, gen: torch.Generator, window: int = 2) -> torch.Tensor:
    """bool ``[1, H, nqb, nqb]`` (Nq == Nk, square blocks): sink + window + random far blocks,
    ``max(sink + window, round(density * (a + 1)))`` kept blocks in query block ``a``."""
    a = torch.arange(nqb).view(1, nqb, 1)
    b = torch.arange(nqb).view(1, 1, nqb)
    causal = b <= a
    forced = causal & ((b == 0) | (b > a - window))
    score = torch.rand(heads, nqb, nqb, generator=gen)
    score = torch.where(forced, torch.full_like(score, -1.0), score)
    score = torch.where(causal, score, torch.full_like(score, 2.0))
    target = torch.clamp(torch.round(density * (torch.arange(nqb) + 1)), min=1).view(1, nqb, 1)
    rank = score.argsort(-1).argsort(-1)
    keep = ((rank < target) | forced) & causal
    return keep.unsqueeze(0)


def gqa_mask(hq: int, hkv: int, nqb: int, density: float, gen: torch.Generator, shared: float = 0.75) -> torch.Tensor:
    """Like :func:`realistic_mask`, but the query heads of a KV head keep ``shared`` of their far
    blocks in common."""
    g = hq // hkv
    common = realistic_mask(hkv, nqb, density * shared, gen).repeat_interleave(g, 1)
    own = realistic_mask(hq, nqb, density * (1 - shared), gen)
    return common | own


def element_density(mask: torch.Tensor, block: int) -> float:
    """Kept (query, key) pairs over causal pairs, for a square-block causal layout."""
    nqb = mask.shape[-1]
    diag = torch.eye(nqb, dtype=torch.bool, device=mask.device)
    off = (mask & ~diag).sum().item() * block * block
    on = (mask & diag).sum().item() * block * (block + 1) / 2
    n = nqb * block
    return (off + on) / (mask.shape[1] * n * (n + 1) / 2)


def flex_block_mask(mask: torch.Tensor, block: int, device: torch.device | str):
    """A FlexAttention ``BlockMask`` straight from a square causal layout ``bool [1, H, nqb, nqb]``:
    the diagonal blocks partial (a causal ``mask_mod``), the others full."""
    from torch.nn.attention.flex_attention import BlockMask

    nqb = mask.shape[-1]
    diag = torch.eye(nqb, dtype=torch.bool, device=mask.device).view(1, 1, nqb, nqb)
    part, full = mask & diag, mask & ~diag

    def to_idx(m):
        cnt = m.sum(-1, dtype=torch.int32)
        ar = torch.arange(nqb, dtype=torch.int32, device=m.device)
        idx = torch.where(m, ar, ar + nqb).sort(-1).values
        idx = torch.where(idx >= nqb, torch.zeros_like(idx), idx).to(torch.int32)
        return cnt.to(device), idx.contiguous().to(device)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    pc, pi = to_idx(part)
    fc, fi = to_idx(full)
    n = nqb * block
    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=block, mask_mod=causal, seq_lengths=(n, n))
