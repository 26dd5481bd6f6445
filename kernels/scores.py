"""Block log-sum-exp of key-major scores: the planner's per-block score (``dam.runtime.planner``).

``block_logsumexp(s, B)`` takes scores laid out *key-major*, ``s [..., N, C]`` (the product
``k · colsᵀ`` of N keys and C query columns, which reads k as it lies), and returns, for every
column ``c`` and KV block ``b`` of ``B`` keys, ``log Σ_{j in block b} exp(s[j, c])`` in float32
(``-inf`` for a block whose keys are all ``-inf``; the last block may be ragged). Each block is
shifted by its own maximum, so nothing underflows.

On CPU tensors the reduction runs as one compiled (inductor) kernel where one can be built,
under the same rules as the compiled attention kernel (:mod:`.cpu_flex`): nothing at install
time, built on first use in a background thread for calls over at least ``BUILD_FROM_KEYS``
keys, ``DAM_CPU_FLEX=sync|0``, one warning and the eager form where no compiler exists or a
build fails. The eager form (:func:`block_logsumexp_eager`) is the reference: it is the same
sequence of ATen ops, unfused (several passes over an fp32 copy of ``s``).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from . import cpu_flex

__all__ = ["block_logsumexp", "block_logsumexp_eager"]

#: calls with fewer keys never start a build (they use one already built)
BUILD_FROM_KEYS = 4096

_SRC = """
def dam_block_lse(s, key_bias, B: int):
    x = s.float()
    if key_bias is not None:
        x = x + key_bias
    n, c = x.shape
    xv = x.view(n // B, B, c)
    m = xv.amax(1, keepdim=True).clamp(min=-1e30)  # an all -inf block: -inf, not nan
    return torch.exp(xv - m).sum(1).log() + m.squeeze(1)
"""


def _function():
    ns = {"torch": torch, "F": F}
    exec(_SRC, ns)  # noqa: S102 - a fixed source: a fresh code object per compiled kernel
    return ns["dam_block_lse"]


_EAGER = _function()


def block_logsumexp_eager(s: torch.Tensor, block: int, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The eager form of :func:`block_logsumexp` (its definition)."""
    return _per_matrix(_EAGER, s, block, key_bias)


def _per_matrix(fn, s: torch.Tensor, block: int, key_bias: torch.Tensor | None) -> torch.Tensor:
    """``fn`` (one ``[N, C]`` matrix) over the leading dims of ``s``: the compiled kernel is
    built for 2-D inputs, whose loops it parallelises well at every shape (leading dims of size
    1, which the compiler specialises, made some shapes several times slower)."""
    *lead, n, c = s.shape
    B = int(block)
    full = n // B * B  # whole blocks through fn; a ragged last block on its own (eager)
    out = torch.empty((*lead, -(-n // B), c), dtype=torch.float32, device=s.device)
    sf, of = s.reshape(-1, n, c), out.view(-1, out.shape[-2], c)
    kb = None if key_bias is None else key_bias.expand(*lead, n, 1).reshape(-1, n, 1)
    for i in range(sf.shape[0]):
        if full:
            of[i, : full // B] = fn(sf[i, :full], None if kb is None else kb[i, :full], B)
        if full < n:
            of[i, full // B:] = _EAGER(sf[i, full:], None if kb is None else kb[i, full:], n - full)
    return out


class _Built:
    __slots__ = ("state", "fn")

    def __init__(self) -> None:
        self.state, self.fn = "building", None


_BUILT: dict[tuple, _Built] = {}
_LOCK = threading.Lock()


def _signature(s: torch.Tensor, block: int, key_bias: torch.Tensor | None) -> tuple:
    return (s.dtype, int(block), key_bias is not None)


def _build(sig: tuple, entry: _Built) -> None:
    dtype, block, bias = sig
    try:
        fn = torch.compile(_function(), dynamic=True)
        g = torch.Generator().manual_seed(0)
        shape = (3 * block, 7)
        s = torch.randn(shape, generator=g).to(dtype)
        kb = torch.zeros((shape[0], 1)) if bias else None
        got = _per_matrix(fn, s, block, kb)
        want = block_logsumexp_eager(s, block, kb)
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            raise RuntimeError("the built kernel disagrees with the eager form on a check")
        entry.fn, entry.state = fn, "ready"
    except Exception as exc:  # noqa: BLE001 - any failure: the eager form takes over
        entry.state = "failed"
        if threading.main_thread().is_alive():
            cpu_flex._warn_once(f"lse{sig}", "dam.kernels: no compiled block-logsumexp kernel for %s (%s: %s); "
                                "using the eager form", sig, type(exc).__name__, exc)


def _compiled_for(s: torch.Tensor, block: int, key_bias: torch.Tensor | None):
    """The ready compiled kernel for this call's signature, or None (then maybe start a build)."""
    m = cpu_flex.mode()
    if m == "off" or s.device.type != "cpu" or torch.compiler.is_compiling() or \
            (torch.is_grad_enabled() and s.requires_grad):
        return None
    if cpu_flex._no_compiler() is not None:
        cpu_flex._warn_once("nocompiler", "dam.kernels: %s; the CPU path uses ATen kernels", cpu_flex._no_compiler())
        return None
    sig = _signature(s, block, key_bias)
    with _LOCK:
        entry = _BUILT.get(sig)
        start = entry is None and s.shape[-2] >= BUILD_FROM_KEYS
        if start:
            entry = _BUILT[sig] = _Built()
    if entry is None:
        return None
    if start:
        if m == "sync":
            _build(sig, entry)
        else:
            threading.Thread(target=_build, args=(sig, entry), name=cpu_flex.BUILD_THREAD, daemon=False).start()
    return entry.fn if entry.state == "ready" else None


def block_logsumexp(s: torch.Tensor, block: int, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-block log-sum-exp of key-major scores (see the module docstring).

    Args:
        s: ``[..., N, C]`` scores, keys on dim -2 (any float dtype; computed in float32).
        block: keys per block ``B`` (the last block holds ``N - (ceil(N/B) - 1) * B``).
        key_bias: optional float32 broadcastable to ``[..., N, 1]``, added per key (``-inf``
            excludes a key, e.g. past a padded row's length).

    Returns:
        float32 ``[..., ceil(N/B), C]``.
    """
    fn = _compiled_for(s, block, key_bias)
    if fn is not None:
        try:
            with torch.no_grad():
                return _per_matrix(fn, s, block, key_bias)
        except Exception as exc:  # noqa: BLE001 - a failing call: eager from now on
            _BUILT[_signature(s, block, key_bias)].state = "failed"
            cpu_flex._warn_once(f"lsecall{_signature(s, block, key_bias)}", "dam.kernels: the compiled "
                                "block-logsumexp kernel failed (%s: %s); using the eager form",
                                type(exc).__name__, exc)
    return block_logsumexp_eager(s, block, key_bias)
