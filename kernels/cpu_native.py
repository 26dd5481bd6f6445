"""CPU prefill through DAM's own AMX kernel (``cpu_native.cpp``), where one can be built (private).

On a CPU with AMX-BF16, bf16 block-sparse prefill runs this C++ kernel once it is built: it reads
the kept K/V blocks in place (no gather), runs the products on AMX through ATen's ``brgemm``
(stacked over the query heads of a KV head for the blocks they all keep), and keeps one online
softmax per query row, updated once per chunk of up to 512 kept keys. Measured against the ATen
path and the compiled FlexAttention kernel in ``benchmarks/results/kernels_cpu_bfloat16.json``.

* Nothing is compiled at install time. The extension is built on first use with
  ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja; ``-march=native``, so its name
  carries a digest of this CPU's flags and of the source) and cached on disk by torch
  (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``): later processes load it in
  well under a second.
* The build runs in a background thread (``DAM_CPU_FLEX=background``, the default), started by
  the first call with at least :data:`BUILD_FROM_KEYS` keys; until it is ready calls take the ATen
  path, so no call waits for a compiler. ``DAM_CPU_FLEX=sync`` builds in the calling thread;
  ``DAM_CPU_FLEX=0`` turns every compiled CPU kernel off, ``DAM_CPU_NATIVE=0`` this one alone
  (then the compiled FlexAttention kernel of :mod:`.cpu_flex` serves, as it does wherever this one
  cannot be built).
* Where it cannot be built (no AMX-BF16, no compiler or ninja, a failed build or check) or a call
  fails, one warning is logged and the other paths take over.
* Calls it takes: bf16, causal or not, with or without the LSE, no soft-capping, no gradient,
  even head dim, the last dim of q/k/v/out contiguous.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from . import cpu_flex
from .layout import BlockLayout

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_native.cpp")
#: a call with fewer keys never starts the build (it uses the kernel once built)
BUILD_FROM_KEYS = cpu_flex.BUILD_FROM_KEYS
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
_NEEDS = ("amx_bf16", "amx_tile", "avx512f", "avx512bw", "avx512_bf16")


class _State:
    __slots__ = ("state", "module", "lock")

    def __init__(self) -> None:
        self.state = "new"  # new | building | ready | failed | unsupported
        self.module = None
        self.lock = threading.Lock()


_STATE = _State()


def mode() -> str:
    """``"background"``, ``"sync"`` or ``"off"``: :func:`dam.kernels.cpu_flex.mode`, and off when
    ``DAM_CPU_NATIVE`` says 0."""
    if os.environ.get("DAM_CPU_NATIVE", "").strip().lower() in ("0", "off", "false", "no"):
        return "off"
    return cpu_flex.mode()


def unsupported() -> str | None:
    """Why this machine cannot build the kernel (None: it can try)."""
    missing = [f for f in _NEEDS if f not in cpu_flex.cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    why = cpu_flex._no_compiler()
    if why is not None:
        return why
    if shutil.which("ninja") is None:
        try:
            from torch.utils.cpp_extension import is_ninja_available
        except ImportError:  # pragma: no cover
            return "torch has no cpp_extension"
        if not is_ninja_available():
            return "no ninja (pip install ninja) to build DAM's CPU kernel"
    return None


def _name() -> str:
    """The extension's name: a digest of the source, torch's version and this CPU's flags
    (``-march=native`` code must not load on another CPU sharing the cache)."""
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(sorted(cpu_flex.cpu_flags())).encode())
    h.update(" ".join(_CFLAGS).encode())
    return f"dam_cpu_attention_{h.hexdigest()[:12]}"


def _build() -> None:
    try:
        from torch.utils.cpp_extension import load

        mod = load(name=_name(), sources=[str(SOURCE)], extra_cflags=_CFLAGS, verbose=False)
        if not mod.available(torch.bfloat16):
            raise RuntimeError("ATen's brgemm cannot pack bf16 on this CPU")
        _check(mod)
        _STATE.module, _STATE.state = mod, "ready"
    except Exception as exc:  # noqa: BLE001 - any failure: the other paths take over
        _STATE.state = "failed"
        if threading.main_thread().is_alive():
            cpu_flex._warn_once("native-build", "dam.kernels: DAM's CPU attention kernel could not be built "
                                "(%s: %s); using the other CPU paths", type(exc).__name__, exc)


def _check(mod) -> None:
    """The built kernel against the float64 reference on a small causal GQA case (ragged tail,
    partial and hidden blocks, an empty row)."""
    from .reference import attention_reference

    g = torch.Generator().manual_seed(0)
    bm, nq, nk, d = 16, 45, 61, 64
    q = torch.randn(1, 4, nq, d, generator=g).bfloat16()
    k = torch.randn(1, 2, nk, d, generator=g).bfloat16()
    v = torch.randn(1, 2, nk, d, generator=g).bfloat16()
    mask = torch.rand(1, 4, -(-nq // bm), -(-nk // bm), generator=g) < 0.6
    mask[0, 1, 0] = False
    lay = BlockLayout.from_block_mask(mask, bm, bm)
    out, lse = torch.empty_like(q), torch.empty(1, 4, nq)
    mod.attend(q, k, v, lay.kv_indices, lay.kv_counts, out, lse, bm, bm, d ** -0.5, True, True)
    ro, rl = attention_reference(q.double(), k.double(), v.double(), lay, causal=True)
    tol = 2 * float(v.abs().max()) * (2 ** -7 + 32 * 2 ** -23)
    fin = torch.isfinite(rl)
    if not (torch.equal(fin, torch.isfinite(lse)) and (out.double() - ro).abs().max() <= tol
            and (lse.double() - rl)[fin].abs().max() <= 1e-4):
        raise RuntimeError("the built kernel disagrees with the float64 reference on a check")


def state() -> str:
    """``new``, ``building``, ``ready``, ``failed`` or ``unsupported`` (for logs and records)."""
    return _STATE.state


def usable() -> bool:
    """Whether this kernel serves (or will serve, once built) this process's bf16 CPU prefill: the
    compiled FlexAttention kernel is then never built."""
    if mode() == "off":
        return False
    if _STATE.state == "new" and unsupported() is not None:
        _STATE.state = "unsupported"
    return _STATE.state in ("new", "building", "ready")


def block_lse_fn(k: torch.Tensor):
    """The fused dynamic block score of :func:`dam.runtime.planner.dynamic_indices` (``k · colsᵀ``
    and the per-block log-sum-exp of :func:`dam.kernels.scores.block_logsumexp` in one pass, in
    fp32), when the kernel is built and ``k`` is a bf16 CPU tensor; else None (the planner's own
    ops run). Never starts a build (attention calls do)."""
    if k.dtype != torch.bfloat16 or k.device.type != "cpu" or k.shape[-1] % 2 or k.stride(-1) != 1 \
            or _STATE.state != "ready" or mode() == "off" or torch.compiler.is_compiling():
        return None
    return _STATE.module.block_lse


def host_fn(name: str, t: torch.Tensor):
    """One of the kernel's host-side planning helpers (``select_blocks``: the estimate's block
    choice, :func:`dam.runtime.estimate.select_blocks`; ``mask_layout``: a mask's layout rows,
    :func:`dam.runtime.planner.mask_to_layout`), when the kernel is built and ``t`` (their input)
    lives on the CPU; else None. Never starts a build."""
    if t.device.type != "cpu" or _STATE.state != "ready" or mode() == "off" or torch.compiler.is_compiling():
        return None
    return getattr(_STATE.module, name)


def last_query_fn(k: torch.Tensor):
    """The fused last-query element scores of :func:`dam.runtime.estimate.last_query_scores`
    (exact softmax of the last queries, summed per key and per offset, in fp32), under the
    conditions of :func:`block_lse_fn`; else None."""
    fn = block_lse_fn(k)
    return None if fn is None else _STATE.module.last_query


def try_attention(q, k, v, layout: BlockLayout, *, causal: bool, scale: float, out: torch.Tensor,
                  lse: torch.Tensor | None) -> bool:
    """Run prefill through the kernel into ``out`` (and ``lse``) when it is built (True);
    otherwise maybe start the build and return False (the caller takes another path)."""
    if q.dtype != torch.bfloat16 or k.dtype != q.dtype or v.dtype != q.dtype or q.shape[2] == 0 \
            or q.shape[-1] % 2 or v.shape[-1] != q.shape[-1] or layout.block_n % 2 \
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)) \
            or torch.compiler.is_compiling() or not usable():
        return False
    st = _STATE
    if st.state == "new":
        with st.lock:
            start = st.state == "new" and k.shape[2] >= BUILD_FROM_KEYS
            if start:
                st.state = "building"
        if start:
            if mode() == "sync":
                _build()
            else:  # not a daemon: a process that ends during a build waits for it
                threading.Thread(target=_build, name=cpu_flex.BUILD_THREAD, daemon=False).start()
    if st.state != "ready":
        return False
    qc, kc, vc = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    o = out if out.stride(-1) == 1 else torch.empty_like(out, memory_format=torch.contiguous_format)
    lo = None if lse is None else (lse if lse.is_contiguous() else torch.empty(lse.shape, dtype=torch.float32))
    try:
        st.module.attend(qc, kc, vc, layout.kv_indices.to(torch.int32), layout.kv_counts.to(torch.int32), o, lo,
                         layout.block_m, layout.block_n, float(scale), bool(causal), True)
    except Exception as exc:  # noqa: BLE001 - a failing call: the other paths from now on
        st.state = "failed"
        cpu_flex._warn_once("native-call", "dam.kernels: DAM's CPU attention kernel failed (%s: %s); "
                            "using the other CPU paths", type(exc).__name__, exc)
        return False
    if o is not out:
        out.copy_(o)
    if lo is not None and lo is not lse:
        lse.copy_(lo)
    return True


__all__ = ["BUILD_FROM_KEYS", "SOURCE", "block_lse_fn", "host_fn", "last_query_fn", "mode", "state", "try_attention", "unsupported", "usable"]
