"""CPU prefill through a compiled FlexAttention kernel (private), where one can be built.

On this project's CPU (AMX-BF16), inductor's FlexAttention CPU template, given the layout as a
``BlockMask``, reads each kept K/V block in place; the ATen path (:mod:`.cpu`) gathers the kept
blocks into buffers and calls the fused flash kernel per row group, which costs about twice as
much per kept block (``benchmarks/results/kernels_cpu_bfloat16.json``). So causal block-sparse bf16 prefill on CPU
tensors runs here once a kernel for its signature (dtype, heads, head dim, layout block sizes)
is compiled, and on the ATen path until then:

* on a CPU without AMX-BF16 (AVX512-BF16 alone, such as AMD's Zen 4) the compiled bf16 kernel
  measured slower than the ATen path, so there it is off unless ``DAM_CPU_FLEX`` asks for it
  (:func:`attention_mode`);
* nothing is compiled at install time; kernels are built on first use with
  ``torch.compile(flex_attention, dynamic=True)`` (one build serves every sequence length) and
  cached on disk by inductor;
* a build runs in a background thread (``DAM_CPU_FLEX=background``, the default): the call that
  starts it, and every call until it is ready, take the ATen path, so no call waits for a
  compiler (a process that ends during a build waits for it at exit). Only calls over at least
  :data:`BUILD_FROM_KEYS` keys start a build. ``DAM_CPU_FLEX=sync`` builds in the calling thread;
  ``DAM_CPU_FLEX=0`` turns the path off;
* where no kernel can be built (no C++ compiler, an unsupported dtype or head dim, any error of
  the build or of a call), the ATen path takes over for that signature, with one logged warning.

The layout is translated per call: kept blocks that lie wholly at or below the causal boundary
(and inside the keys) are *full* blocks, computed without a mask; the others (diagonal blocks,
ragged tails) are *partial*, masked by ``q + (Nk - Nq) >= kv``. ``compute_q_blocks=False``: no
backward structures are built.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field

import torch

from .layout import BlockLayout

log = logging.getLogger(__name__)

#: dtypes that take this path: where it measured faster than the ATen path (bf16; in fp32 the
#: ATen path was as fast or faster: benchmarks/results/kernels_cpu_*.json)
_DTYPES = (torch.bfloat16,)
#: a call with fewer keys never starts a build (it uses a kernel already built): short prompts,
#: where the kernel matters little, do not pay for a compiler run
BUILD_FROM_KEYS = 4096
#: the name of every background build thread of DAM's compiled CPU kernels (this module's and
#: :mod:`.scores`'): :func:`wait_for_builds` joins them
BUILD_THREAD = "dam-flex-build"


def mode() -> str:
    """``"background"`` (default), ``"sync"`` or ``"off"`` (``DAM_CPU_FLEX``)."""
    v = os.environ.get("DAM_CPU_FLEX", "background").strip().lower()
    if v in ("0", "off", "false", "no"):
        return "off"
    return "sync" if v == "sync" else "background"


def attention_mode() -> str:
    """:func:`mode` for the attention kernel. Unset ``DAM_CPU_FLEX`` means ``"background"`` on a CPU
    with AMX-BF16 and ``"off"`` on one without: there the compiled bf16 kernel measured slower than
    the ATen path (``benchmarks/results/INDEX.md``, the kernel benchmarks per CPU)."""
    if "DAM_CPU_FLEX" not in os.environ and "amx_bf16" not in cpu_flags():
        return "off"
    return mode()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty where that cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@dataclass
class _Kernel:
    """One signature's compiled kernel: its causal offset lives in ``offset`` (a tensor the
    mask function closes over, so a new length is a new value, not a new function)."""

    state: str = "new"  # new | building | ready | failed
    offset: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    lock: threading.Lock = field(default_factory=threading.Lock)
    fn: object = None  # the compiled call (its own code object)

    def mask_mod(self):
        off = self.offset

        def causal(b, h, q_idx, kv_idx):
            return q_idx + off >= kv_idx

        return causal


_KERNELS: dict[tuple, _Kernel] = {}
_KERNELS_LOCK = threading.Lock()
_WARNED: set[str] = set()
_CALL_SRC = """
def dam_flex_call(q, k, v, block_mask, scale, enable_gqa):
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
"""


def _compiled():
    """A compiled FlexAttention call with a code object of its own (one per kernel): dynamo keys
    its cache and its recompile limit on the code object, so neither a caller's own compiled
    ``flex_attention`` nor DAM's other signatures share or exhaust this one's (past the limit,
    dynamo would fall back to the unfused implementation, which materialises every score)."""
    from torch.nn.attention.flex_attention import flex_attention

    ns = {"flex_attention": flex_attention}
    exec(_CALL_SRC, ns)  # noqa: S102 - a fixed source: a fresh code object per kernel
    return torch.compile(ns["dam_flex_call"], dynamic=True)


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


_NO_COMPILER: list[str | None] = []  # memo of _no_compiler (one check per process)


def _no_compiler() -> str | None:
    """Why no kernel can be built on this machine (None: it can); checked once per process."""
    if not _NO_COMPILER:
        _NO_COMPILER.append(_find_no_compiler())
    return _NO_COMPILER[0]


def _find_no_compiler() -> str | None:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as exc:  # pragma: no cover - every supported torch has it
        return f"torch has no FlexAttention ({exc})"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return f"no C++ compiler ({cxx!r} not on PATH) for inductor's CPU kernels"
    return None


def _block_mask(layout: BlockLayout, nq: int, nk: int, kern: _Kernel):
    """The layout as a BlockMask: full blocks (wholly visible) and partial ones (masked)."""
    from torch.nn.attention.flex_attention import BlockMask

    bm, bn = layout.block_m, layout.block_n
    nkb = -(-nk // bn)
    idx = layout.kv_indices.long()
    active = torch.arange(layout.max_blocks).view(1, 1, 1, -1) < layout.kv_counts.unsqueeze(-1).long()
    q0 = (nk - nq) + torch.arange(layout.num_q_blocks).view(1, 1, -1, 1) * bm  # first query position
    last_key = (idx + 1) * bn - 1
    full = active & (last_key <= q0) & (last_key < nk)
    part = active & ~full

    def compact(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cnt = sel.sum(-1, dtype=torch.int32)
        key = torch.where(sel, idx, idx.new_full((), nkb))  # kept first, ascending
        srt = key.sort(-1).values
        width = max(nkb, 1)
        out = torch.zeros((*srt.shape[:3], width), dtype=torch.int32)
        m = min(srt.shape[-1], width)
        out[..., :m] = torch.where(srt[..., :m] >= nkb, 0, srt[..., :m]).to(torch.int32)
        return cnt.contiguous(), out.contiguous()

    pc, pi = compact(part)
    fc, fi = compact(full)
    kern.offset.fill_(nk - nq)
    return BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=(bm, bn), mask_mod=kern.mask_mod(),
                                    seq_lengths=(nq, nk), compute_q_blocks=False)


def _run(q, k, v, layout, scale, kern: _Kernel) -> torch.Tensor:
    bmask = _block_mask(layout, q.shape[2], k.shape[2], kern)
    if kern.fn is None:
        kern.fn = _compiled()
    with torch.no_grad():  # the CPU template is inference-only (and gives no LSE)
        return kern.fn(q, k, v, bmask, float(scale), q.shape[1] != k.shape[1])


def _signature(q, k, layout) -> tuple:
    return (q.dtype, q.shape[1], k.shape[1], q.shape[3], layout.heads, layout.block_m, layout.block_n)


def _build(sig: tuple, kern: _Kernel) -> None:
    """Compile (and check) the kernel of ``sig`` on small inputs of its signature."""
    dtype, hq, hkv, d, lh, bm, bn = sig
    try:
        n = 4 * max(bm, bn) + 3  # several blocks and a ragged tail: a general (dynamic) build
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, hq, n, d, generator=g).to(dtype)
        k = torch.randn(1, hkv, n, d, generator=g).to(dtype)
        v = torch.randn(1, hkv, n, d, generator=g).to(dtype)
        nqb, nkb = -(-n // bm), -(-n // bn)
        qa = torch.arange(nqb).view(-1, 1) * bm + bm - 1
        mask = (torch.arange(nkb).view(1, -1) * bn <= qa).expand(1, lh, nqb, nkb)
        lay = BlockLayout.from_block_mask(mask.contiguous(), bm, bn)
        out = _run(q, k, v, lay, d ** -0.5, kern)
        if not torch.isfinite(out).all():
            raise RuntimeError("the built kernel gave non-finite values on a dense causal check")
        kern.state = "ready"
    except Exception as exc:  # noqa: BLE001 - any failure: the ATen path takes over
        kern.state = "failed"
        if not threading.main_thread().is_alive():  # the process is ending: nothing to tell
            return
        _warn_once(f"build{sig}", "dam.kernels: no compiled FlexAttention CPU kernel for %s (%s: %s); "
                   "using the ATen path", _describe(sig), type(exc).__name__, exc)


def _describe(sig: tuple) -> str:
    dtype, hq, hkv, d, lh, bm, bn = sig
    return f"{str(dtype).replace('torch.', '')} Hq={hq} Hkv={hkv} D={d} layout heads={lh} blocks {bm}x{bn}"


def try_attention(q, k, v, layout: BlockLayout, *, causal: bool, scale: float, out: torch.Tensor,
                  lse: torch.Tensor | None) -> bool:
    """Run causal prefill through the compiled kernel into ``out`` when its signature has one
    ready (True); otherwise start a build if none was tried and return False (the caller takes
    the ATen path). Calls that want the LSE or a gradient take the ATen path (the CPU template
    gives neither)."""
    m = attention_mode()
    if m == "off" or not causal or lse is not None or q.dtype not in _DTYPES or q.shape[-1] != v.shape[-1] \
            or q.shape[2] == 0 or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return False
    if torch.compiler.is_compiling():  # inside someone's torch.compile: leave it to the ATen path
        return False
    why = _no_compiler()
    if why is not None:
        _warn_once("nocompiler", "dam.kernels: %s; the CPU path uses ATen kernels", why)
        return False
    sig = _signature(q, k, layout)
    with _KERNELS_LOCK:
        kern = _KERNELS.get(sig)
        start = kern is None and k.shape[2] >= BUILD_FROM_KEYS
        if start:
            kern = _KERNELS[sig] = _Kernel(state="building")
    if kern is None:
        return False
    if start:
        if m == "sync":
            _build(sig, kern)
        else:  # not a daemon: a process that ends during a build waits for it (never kills it)
            threading.Thread(target=_build, args=(sig, kern), name=BUILD_THREAD, daemon=False).start()
    if kern.state != "ready":
        return False
    try:
        with kern.lock:  # the offset tensor is per kernel: one call at a time per signature
            o = _run(q, k, v, layout, scale, kern)
    except Exception as exc:  # noqa: BLE001 - a failing call: ATen from now on for this signature
        kern.state = "failed"
        _warn_once(f"call{sig}", "dam.kernels: the compiled FlexAttention CPU kernel failed for %s (%s: %s); "
                   "using the ATen path", _describe(sig), type(exc).__name__, exc)
        return False
    out.copy_(o)
    return True


def wait_for_builds(timeout: float | None = None) -> None:
    """Block until every started build has finished (benchmarks and tests)."""
    for t in threading.enumerate():
        if t.name == BUILD_THREAD:
            t.join(timeout)


def ready_for(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout) -> bool:
    """Whether calls shaped like these run the compiled kernel now."""
    kern = _KERNELS.get(_signature(q, k, layout))
    return kern is not None and kern.state == "ready"


def ready_signatures() -> list[str]:
    """The signatures with a ready kernel, described (for logs and benchmark records)."""
    return [_describe(s) for s, k in _KERNELS.items() if k.state == "ready"]
