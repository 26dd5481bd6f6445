"""BlockLayout: construction checks and dense conversion against a brute-force definition."""

from __future__ import annotations

import pytest
import torch

from dam.kernels import BlockLayout, LayoutError


def brute_dense(mask: torch.Tensor, q_len: int, kv_len: int, bm: int, bn: int) -> torch.Tensor:
    Bl, H = mask.shape[:2]
    out = torch.zeros(Bl, H, q_len, kv_len, dtype=torch.bool)
    for b in range(Bl):
        for h in range(H):
            for r in range(q_len):
                i = kv_len - q_len + r
                for j in range(i + 1):
                    out[b, h, r, j] = bool(mask[b, h, r // bm, j // bn])
    return out


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (17, 40), (40, 40), (33, 97)])
def test_from_block_mask_roundtrip_and_dense(q_len, kv_len):
    bm, bn = 16, 16
    nq, nk = -(-q_len // bm), -(-kv_len // bn)
    mask = torch.rand(2, 3, nq, nk) < 0.5
    layout = BlockLayout.from_block_mask(mask, bm, bn)
    layout.validate(kv_len)
    assert torch.equal(layout.block_mask(nk), mask)
    assert torch.equal(layout.kv_counts, mask.sum(-1).int())
    assert torch.equal(layout.to_dense(q_len, kv_len), brute_dense(mask, q_len, kv_len, bm, bn))


def test_construction_errors():
    idx = torch.zeros(1, 1, 2, 3, dtype=torch.int32)
    cnt = torch.zeros(1, 1, 2, dtype=torch.int32)
    with pytest.raises(LayoutError, match="int32"):
        BlockLayout(idx.long(), cnt, 16, 16)
    with pytest.raises(LayoutError, match="shape"):
        BlockLayout(idx, cnt[..., :1], 16, 16)
    with pytest.raises(LayoutError, match="power of two"):
        BlockLayout(idx, cnt, 24, 16)
    with pytest.raises(LayoutError, match="B\\|1, H"):
        BlockLayout(idx[0], cnt, 16, 16)


def test_validate_catches_bad_contents():
    good = BlockLayout.from_block_mask(torch.ones(1, 1, 2, 3, dtype=torch.bool), 16, 16)
    good.validate(48)
    with pytest.raises(LayoutError, match="past"):
        good.validate(20)
    unsorted = BlockLayout(torch.tensor([[[[2, 1, -1]]]], dtype=torch.int32),
                           torch.tensor([[[2]]], dtype=torch.int32), 16, 16)
    with pytest.raises(LayoutError, match="increasing"):
        unsorted.validate()
    badpad = BlockLayout(torch.tensor([[[[0, 1, 2]]]], dtype=torch.int32),
                         torch.tensor([[[2]]], dtype=torch.int32), 16, 16)
    with pytest.raises(LayoutError, match="padded"):
        badpad.validate()
