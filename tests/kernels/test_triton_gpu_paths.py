"""What only a GPU launch of the Triton kernels does, run on the CPU under the interpreter.

Each case runs in its own interpreter process: the autotune list is fixed when the kernel module
is imported (``DAM_TRITON_CONFIGS=full`` must be set before), and a bad pointer under the
interpreter ends the process rather than raising.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_FULL_CONFIGS = """
import torch
from dam.kernels import BlockLayout, block_sparse_attention
from dam.kernels import triton_kernels as tk
from dam.kernels.reference import attention_reference

kern = tk._block_sparse_fwd_kernel
assert len(kern.configs) == len(tk._gpu_fwd_configs()) > 1, len(kern.configs)
g = torch.Generator().manual_seed(0)
for bm, bn, dtype in ((16, 16, torch.float32), (32, 16, torch.float16), (64, 32, torch.bfloat16)):
    nq = nk = 2 * bm + 5  # ragged tail
    q = torch.randn(1, 4, nq, 16, generator=g).to(dtype)
    k = torch.randn(1, 2, nk, 16, generator=g).to(dtype)
    v = torch.randn(1, 2, nk, 16, generator=g).to(dtype)
    nqb, nkb = -(-nq // bm), -(-nk // bn)
    qa = torch.arange(nqb).view(-1, 1) * bm + bm - 1
    mask = (torch.arange(nkb).view(1, -1) * bn <= qa).expand(1, 4, nqb, nkb).clone()
    mask[0, 1, -1, 0] = False  # a head that skips its sink block
    lay = BlockLayout.from_block_mask(mask, bm, bn)
    out = block_sparse_attention(q, k, v, lay, backend="triton")
    timed = len(kern.configs_timings)  # the autotuner launched every config the prune kept
    best = kern.best_config.kwargs
    assert timed > 1 and best["BLOCK_M"] <= bm and bm % best["BLOCK_M"] == 0, (timed, best)
    assert best["BLOCK_N"] <= bn and bn % best["BLOCK_N"] == 0, best
    ref = attention_reference(q.double(), k.double(), v.double(), lay, causal=True)[0]
    tol = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    err = (out.double() - ref).abs().max().item()
    assert err <= tol, (bm, dtype, err)
    print("ok", bm, bn, dtype, timed, err)
"""

_LARGE_OFFSETS = """
import torch
from dam.kernels import BlockLayout, block_sparse_attention
from dam.kernels.reference import attention_reference

g = torch.Generator().manual_seed(0)
nq, d, stride_m = 48, 16, 1 << 26  # query row 47 lies 47 * 2^26 > 2^31 elements in
base = torch.empty(stride_m * (nq - 1) + d, dtype=torch.float16)  # virtual: only 48 rows touched
q = base.as_strided((1, 1, nq, d), (0, 0, stride_m, 1))
src = torch.randn(1, 1, nq, d, generator=g).half()
q.copy_(src)
k = torch.randn(1, 1, nq, d, generator=g).half()
v = torch.randn(1, 1, nq, d, generator=g).half()
lay = BlockLayout.from_block_mask(torch.tril(torch.ones(3, 3, dtype=torch.bool)).expand(1, 1, 3, 3), 16, 16)
out = block_sparse_attention(q, k, v, lay, backend="triton")
ref = attention_reference(src.double(), k.double(), v.double(), lay, causal=True)[0]
err = (out.double() - ref).abs().max().item()
assert err <= 4 * torch.finfo(torch.float16).eps, err
print("ok", err)
"""


def _run(script: str, **env: str) -> str:
    full_env = {**os.environ, "TRITON_INTERPRET": "1", **env}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=full_env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_gpu_autotune_list_and_prune_hook_under_interpreter():
    """DAM_TRITON_CONFIGS=full: the interpreter autotunes over the GPU config list, through the
    prune hook (which reads LAYOUT_M/LAYOUT_N from the launcher's keyword arguments), launches
    every kept config, and the chosen one is right against the float64 reference."""
    out = _run(_FULL_CONFIGS, DAM_TRITON_CONFIGS="full")
    assert out.count("ok") == 3


def test_prefill_row_offsets_past_2_31():
    """Query rows whose row x stride passes 2^31 elements (a [B, N, H, D] view at a few hundred
    thousand tokens) are addressed in int64."""
    assert "ok" in _run(_LARGE_OFFSETS)
