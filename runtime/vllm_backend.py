"""DAM inside vLLM on the CPU: a subclass of vLLM's CPU attention backend (imports vLLM).

Registered by :mod:`dam.runtime.vllm_plugin`. With no artifact configured every call goes to
vLLM's implementation unchanged. With one (``additional_config["dam_artifact"]`` or
``DAM_ARTIFACT``):

* at engine start (model construction, in every worker) the artifact is loaded and checked
  against the served model (:meth:`Artifact.check_compatible`: a mismatch or a damaged file
  stops the engine with the artifact's error), and one line is logged;
* the metadata builder marks, per step, the requests whose whole prompt is in this step (no
  cached or earlier-chunk context) and has at least ``min_length`` tokens
  (``additional_config["dam_min_length"]``, default :class:`RuntimeConfig`'s);
* the attention call runs DAM for those requests where ``dam.runtime`` would run a block-sparse
  kernel (:meth:`DamHandle.runs_sparse`: not a layer of dense programs, not over the dense rule's
  break-even) on their own queries, keys and values (:meth:`DamHandle.attend`), and vLLM's kernel
  for everything else: those layers, decode tokens, short prompts, later chunks of a chunked
  prefill and prompts with a prefix-cache hit. A step whose requests all run DAM skips vLLM's
  kernel; in a mixed step (continuous batching: prefills beside decodes) vLLM's kernel runs on
  the other requests only, through metadata of their own (their rows, lengths, block-table rows
  and vLLM's scheduler metadata for them, made once per step and subset).

The KV cache is always written by vLLM (``do_kv_cache_update`` is inherited), so decode reads
the same cache whichever path a prompt took. Tensor parallelism: a rank's query heads are
``[rank * num_heads, (rank + 1) * num_heads)``; it applies those columns of the artifact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from dam.compiler import load_artifact

from .integration import DamHandle, RuntimeConfig

log = logging.getLogger("vllm.dam")  # under vLLM's logger: printed with its own lines

_HANDLES: dict[tuple, DamHandle] = {}
_LOCK = threading.Lock()


def artifact_path(additional_config) -> str | None:
    """The configured artifact: ``additional_config["dam_artifact"]``, else ``DAM_ARTIFACT``."""
    cfg = additional_config if isinstance(additional_config, dict) else {}
    return cfg.get("dam_artifact") or os.environ.get("DAM_ARTIFACT") or None


def runtime_config(additional_config) -> RuntimeConfig:
    """DAM's run-time settings from ``additional_config``: ``dam_min_length`` (prompts shorter
    run vLLM's kernel) and ``dam_dense_above`` (the dense rule's break-even; default: the one
    measured against vLLM's own kernel)."""
    cfg = additional_config if isinstance(additional_config, dict) else {}
    kw = {}
    if "dam_min_length" in cfg:
        kw["min_length"] = int(cfg["dam_min_length"])
    if "dam_dense_above" in cfg:
        kw["dense_above"] = float(cfg["dam_dense_above"])
    return RuntimeConfig(backend="cpu", dense_kernel="vllm", **kw)


def _handle(vllm_config, num_heads: int) -> DamHandle | None:
    """This process's DAM handle for the served model (None: no artifact configured), loaded and
    checked once per (artifact, rank)."""
    path = artifact_path(getattr(vllm_config, "additional_config", None))
    if path is None:
        return None
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    try:
        rank = get_tensor_model_parallel_rank()
    except Exception:  # noqa: BLE001 - no model-parallel group (a single process)
        rank = 0
    key = (os.path.abspath(path), rank, num_heads)
    with _LOCK:
        if key not in _HANDLES:
            art = load_artifact(path)
            art.check_compatible(vllm_config.model_config.hf_config)
            config = runtime_config(vllm_config.additional_config)
            h0 = rank * num_heads
            _HANDLES[key] = DamHandle(None, art.select_heads(h0, h0 + num_heads), config)
            log.info("DAM active: artifact %s (%d layers, query heads %d-%d of %d), prompts of %d+ tokens",
                     path, art.num_layers, h0, h0 + num_heads - 1, art.num_heads, config.min_length)
        return _HANDLES[key]


@dataclasses.dataclass
class DamCPUAttentionMetadata(CPUAttentionMetadata):
    #: ``(first, end)`` token rows of each request DAM computes this step
    dam_requests: tuple[tuple[int, int], ...] = ()
    #: every request with tokens this step is one of them (vLLM's kernel is skipped)
    dam_only: bool = False
    #: the other requests' own metadata, made on first use: ``rest(frozenset of DAM rows) ->
    #: (CPUAttentionMetadata of the others, int64 token rows of theirs)``
    rest: object = None


class DamCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._dam = artifact_path(vllm_config.additional_config) is not None
        self._min_length = runtime_config(vllm_config.additional_config).min_length

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if not self._dam:
            return md
        cm = common_attn_metadata
        starts = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
        seqs = cm.seq_lens[: cm.num_reqs].tolist()
        reqs, busy = [], 0
        for i, seq in enumerate(seqs):
            q0, q1 = starts[i], starts[i + 1]
            busy += q1 > q0
            if q1 - q0 == seq and seq >= self._min_length:  # the whole prompt, in this step
                reqs.append((q0, q1))
        if not reqs:
            return md
        fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(md)}
        # made lazily: a step whose layers all run every request through DAM never builds one
        rest = None if md.dynamic_causal is not None else _RestMetadata(
            self, md, tuple(zip(starts[:-1], starts[1:], strict=True)), seqs)
        return DamCPUAttentionMetadata(**fields, dam_requests=tuple(reqs), dam_only=len(reqs) == busy, rest=rest)


class _RestMetadata:
    """vLLM's CPU attention metadata for the requests of a step that DAM does not compute (as the
    base builder makes it, for those requests alone), per subset, made once per step."""

    def __init__(self, builder: CPUAttentionMetadataBuilder, md: CPUAttentionMetadata, rows, seqs) -> None:
        self._b, self._md, self._rows, self._seqs = builder, md, rows, seqs
        self._made: dict[frozenset, tuple] = {}

    def __call__(self, dam_rows: frozenset):
        got = self._made.get(dam_rows)
        if got is None:
            keep = [i for i, r in enumerate(self._rows) if r not in dam_rows and r[1] > r[0]]
            lens = [self._rows[i][1] - self._rows[i][0] for i in keep]
            qsl = torch.zeros(len(keep) + 1, dtype=self._md.query_start_loc.dtype)
            qsl[1:] = torch.tensor(lens, dtype=qsl.dtype).cumsum(0)
            seq_lens = self._md.seq_lens[keep]
            b = self._b
            sched = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(keep), num_heads=b.num_heads, num_kv_heads=b.num_kv_heads, head_dim=b.head_dim,
                seq_lens=seq_lens, dtype=b.dtype, query_start_loc=qsl, causal=self._md.causal,
                sliding_window_size=b.window_size, isa=b.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                dynamic_causal=None, kv_cache_dtype=b.kv_cache_dtype)
            md = dataclasses.replace(
                self._md, num_actual_tokens=int(qsl[-1]), max_query_len=max(lens), query_start_loc=qsl,
                max_seq_len=max(self._seqs[i] for i in keep), seq_lens=seq_lens,
                block_table=self._md.block_table[keep], scheduler_metadata=sched)
            tok = torch.cat([torch.arange(*self._rows[i]) for i in keep])
            got = self._made[dam_rows] = (md, tok)
        return got


class DamCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        self._dam = _handle(get_current_vllm_config(), self.num_heads)
        self._layer: int | None = None
        window = getattr(self, "sliding_window", None)
        if window not in (None, (-1, -1), -1) or getattr(self, "logits_soft_cap", None):
            self._dam = None  # sliding-window / soft-capped layers stay on vLLM's own kernel

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        reqs = getattr(attn_metadata, "dam_requests", ())
        if self._dam is not None and reqs and key is not None:
            if self._layer is None:
                from vllm.model_executor.models.utils import extract_layer_index

                self._layer = extract_layer_index(layer.layer_name)
            sparse = [(q0, q1) for q0, q1 in reqs
                      if self._dam.runs_sparse(self._layer, q1 - q0, q1 - q0, query.device, query.dtype)]
        else:
            sparse = []
        if not sparse:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                            output_block_scale)
        elif len(sparse) < len(reqs) or not attn_metadata.dam_only:
            # vLLM's kernel for the other rows (dense requests, decode, chunks), with their own metadata
            rest = attn_metadata.rest
            if rest is None:  # (a dynamic causal mask): vLLM's kernel for every row, DAM overwrites its own
                super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                output_block_scale)
            else:
                md, tok = rest(frozenset(sparse))
                out = torch.empty((md.num_actual_tokens, *output.shape[1:]), dtype=output.dtype)
                super().forward(layer, query.index_select(0, tok), None, None, kv_cache, md, out, output_scale,
                                output_block_scale)
                output.index_copy_(0, tok, out)
        for q0, q1 in sparse:  # [T, H, D] rows -> [1, H, T, D] views
            q = query[q0:q1].transpose(0, 1).unsqueeze(0)
            k = key[q0:q1].transpose(0, 1).unsqueeze(0)
            v = value[q0:q1].transpose(0, 1).unsqueeze(0)
            out = self._dam.attend(self._layer, q, k, v, self.scale)
            output[q0:q1].copy_(out[0].transpose(0, 1))
        return output


class DamCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU backend (its name, cache layout and KV update) with DAM's builder and impl."""

    @staticmethod
    def get_impl_cls():
        return DamCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return DamCPUMetadataBuilder
