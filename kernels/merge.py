"""Merging partial attention results by their log-sum-exp (chunked prefill, split work)."""

from __future__ import annotations

import torch

__all__ = ["merge_attention"]


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    Args:
        out_a, out_b: ``[..., N, D]`` normalised partial outputs.
        lse_a, lse_b: ``[..., N]`` their log-sum-exps (``-inf`` where a part has no key).
    Returns:
        ``(out [..., N, D] in out_a's dtype, lse float32 [..., N])``; rows empty in both give
        0 and ``-inf``.
    """
    la, lb = lse_a.float(), lse_b.float()
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)  # exp(-inf) = 0
    tot = wa + wb
    lse = torch.where(tot > 0, m_safe + torch.log(tot), torch.full_like(m, float("-inf")))
    inv = torch.where(tot > 0, 1.0 / tot, torch.zeros_like(tot))
    out = out_a.float() * (wa * inv).unsqueeze(-1) + out_b.float() * (wb * inv).unsqueeze(-1)
    return out.to(out_a.dtype), lse
