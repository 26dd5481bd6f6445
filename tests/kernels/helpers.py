"""Shared helpers for the kernel tests: backends, random layouts, dtype-derived tolerances."""

from __future__ import annotations

import os

import pytest
import torch

from dam.kernels import BlockLayout

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_device(backend: str) -> torch.device:
    """The device a backend's test tensors live on (skips when the backend cannot run here)."""
    if backend == "cpu":
        return torch.device("cpu")
    if HAS_CUDA:
        return torch.device("cuda")
    if not INTERPRET:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    return torch.device("cpu")


def mixed_block_mask(bl: int, h: int, nqb: int, nkb: int, *, p: float = 0.4,
                     gen: torch.Generator | None = None) -> torch.Tensor:
    """bool [bl, h, nqb, nkb]: each row randomly empty, a single block, full, or random (p)."""
    kind = torch.randint(0, 4, (bl, h, nqb, 1), generator=gen)
    rnd = torch.rand(bl, h, nqb, nkb, generator=gen) < p
    single = torch.zeros(bl, h, nqb, nkb, dtype=torch.bool)
    pick = torch.randint(0, nkb, (bl, h, nqb, 1), generator=gen)
    single.scatter_(-1, pick, True)
    mask = torch.where(kind == 0, torch.zeros_like(rnd), rnd)
    mask = torch.where(kind == 1, single, mask)
    mask = torch.where(kind == 2, torch.ones_like(rnd), mask)
    return mask


def causal_local_mask(bl: int, h: int, nq: int, nk: int, bm: int, bn: int, density: float,
                      gen: torch.Generator | None = None) -> torch.Tensor:
    """Realistic layout: sink block, the diagonal block(s) and random far blocks to ``density``."""
    nqb, nkb = -(-nq // bm), -(-nk // bn)
    off = nk - nq
    rows = torch.arange(nqb)
    last_key = (off + torch.clamp((rows + 1) * bm, max=nq) - 1) // bn  # diagonal block per row
    first_key = (off + rows * bm) // bn
    cols = torch.arange(nkb)
    causal = cols.view(1, -1) <= last_key.view(-1, 1)
    diag = (cols.view(1, -1) >= first_key.view(-1, 1) - 1) & causal
    rnd = (torch.rand(bl, h, nqb, nkb, generator=gen) < density) & causal
    return rnd | diag | (cols == 0).view(1, -1)


def layout_from(mask: torch.Tensor, bm: int, bn: int, device: torch.device) -> BlockLayout:
    return BlockLayout.from_block_mask(mask, bm, bn).to(device)


def out_atol(dtype: torch.dtype, vmax: float) -> float:
    """Output tolerance: the output is a convex mix of V rows. Rounding the probabilities and
    the output to ``dtype`` costs at most eps * max|v|; fp32 accumulation of the scores and
    sums adds a few fp32 eps per term; 2x margin."""
    eps = torch.finfo(dtype).eps if dtype != torch.float64 else torch.finfo(torch.float32).eps
    return 2.0 * vmax * (eps + 32 * torch.finfo(torch.float32).eps)


def lse_atol(lse_ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """LSE is computed in fp32 from exactly-representable inputs: relative fp32 error. With
    16-bit inputs the fused kernel may also round the probabilities to the input dtype before
    summing them (as it does for P.V): a relative error of the sum of at most eps(dtype), i.e.
    an absolute LSE error of eps(dtype)."""
    fin = lse_ref[torch.isfinite(lse_ref)]
    scale = float(fin.abs().max()) if fin.numel() else 1.0
    tol = 64 * torch.finfo(torch.float32).eps * max(1.0, scale)
    if dtype in (torch.float16, torch.bfloat16):
        tol = max(tol, torch.finfo(dtype).eps)
    return tol


def assert_close_to_reference(out, lse, ref_out, ref_lse, dtype, vmax):
    assert out.dtype == dtype
    assert lse.dtype == torch.float32
    assert not torch.isnan(out).any(), "output has NaN"
    assert not torch.isnan(lse).any(), "lse has NaN"
    out64, lse64 = out.double().cpu(), lse.double().cpu()
    ref_out, ref_lse = ref_out.cpu(), ref_lse.cpu()
    err = (out64 - ref_out).abs().max().item() if out.numel() else 0.0
    assert err <= out_atol(dtype, vmax), f"max |out - ref| = {err:.3g} > {out_atol(dtype, vmax):.3g}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse64), empty), "lse must be -inf exactly on empty rows"
    assert torch.all(out64[empty] == 0), "empty rows must be 0"
    if (~empty).any():
        lerr = (lse64[~empty] - ref_lse[~empty]).abs().max().item()
        assert lerr <= lse_atol(ref_lse, dtype), f"max |lse - ref| = {lerr:.3g}"


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
