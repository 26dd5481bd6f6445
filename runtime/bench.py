"""End-to-end timing: prefill and per-token decode, DAM vs dense, plus attention-only time.

``bench(model, artifact, inputs, config)`` times, per length, on the model's own device and dtype
(the caller picks: GPU bf16 when present, else CPU fp32):

* prefill: ``model(ids)`` (cache built), dense vs DAM, interleaved per repeat;
* decode: ``decode_tokens`` greedy steps after that prefill (the cache is cropped back to the
  prompt between repeats), seconds per token;
* attention only: one layer's attention call on q/k/v captured from a DAM forward of the same
  input (dense SDPA vs DAM's plan + block-sparse kernel);
* peak memory of one prefill each: CUDA peak allocated bytes on a GPU; on the CPU the rise of
  the process's peak RSS (``VmHWM`` after resetting it via ``/proc/self/clear_refs``), or None
  where that is not available.

Medians of ``repeats`` runs after ``warmup`` runs; the ratios (dense / DAM) come from the same run.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from dam.compiler import Artifact

from . import _kernels
from .errors import DamRuntimeError
from .integration import apply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """Attributes: repeats (median over them), warmup (untimed runs first), decode_tokens (steps
    timed per decode run), backend, min_length (as :func:`dam.runtime.apply`), attention_layer
    (the layer of the attention-only timing; None = the middle layer), decode (see
    :class:`dam.runtime.RuntimeConfig`), last_query (``None``: the artifact's default)."""

    repeats: int = 3
    warmup: int = 1
    decode_tokens: int = 8
    backend: str = "auto"
    min_length: int = 1024
    attention_layer: int | None = None
    decode: str = "auto"
    last_query: float | None = None

    def __post_init__(self) -> None:
        for name in ("repeats", "decode_tokens", "min_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DamRuntimeError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise DamRuntimeError(f"warmup must be a non-negative int, got {self.warmup!r}")
        if self.backend not in ("auto", "triton", "cpu"):
            raise DamRuntimeError(f"backend must be auto, triton or cpu, got {self.backend!r}")
        if self.decode not in ("auto", "sparse", "dense"):
            raise DamRuntimeError(f"decode must be auto, sparse or dense, got {self.decode!r}")


def _apply(model, artifact, config: BenchConfig):
    """DAM on ``model`` as the benchmark runs it (backend, min_length, decode, last_query from ``config``)."""
    return apply(model, artifact, backend=config.backend, min_length=config.min_length, decode=config.decode,
                 last_query=config.last_query)


@dataclass
class BenchRow:
    """One length's medians (seconds, bytes) and ratios dense / DAM."""

    length: int
    prefill_dense_s: float
    prefill_dam_s: float
    prefill_speedup: float
    decode_dense_s_per_token: float
    decode_dam_s_per_token: float
    decode_speedup: float
    attn_dense_s: float
    attn_dam_s: float
    attn_speedup: float
    attn_layer: int
    attn_layer_density: float
    peak_mem_dense_bytes: int | None
    peak_mem_dam_bytes: int | None


@dataclass
class BenchReport:
    rows: list[BenchRow]
    device: str
    dtype: str
    threads: int
    config: dict

    def to_json(self) -> dict:
        return {"schema": "dam.bench/1", "device": self.device, "dtype": self.dtype, "threads": self.threads,
                "config": self.config, "rows": [asdict(r) for r in self.rows]}

    def format_table(self) -> str:
        lines = [f"device {self.device}, {self.dtype}, {self.threads} threads; medians of "
                 f"{self.config['repeats']} runs after {self.config['warmup']} warm-up",
                 f"{'length':>7} {'prefill dense':>14} {'prefill dam':>12} {'x':>6} {'decode dense':>13} "
                 f"{'decode dam':>11} {'x':>6} {'attn dense':>11} {'attn dam':>9} {'x':>6} {'peak dense':>11} "
                 f"{'peak dam':>9}"]
        for r in self.rows:
            lines.append(
                f"{r.length:>7} {r.prefill_dense_s:>13.3f}s {r.prefill_dam_s:>11.3f}s {r.prefill_speedup:>5.2f}x "
                f"{1e3 * r.decode_dense_s_per_token:>10.2f}ms {1e3 * r.decode_dam_s_per_token:>8.2f}ms "
                f"{r.decode_speedup:>5.2f}x {1e3 * r.attn_dense_s:>8.2f}ms {1e3 * r.attn_dam_s:>6.2f}ms "
                f"{r.attn_speedup:>5.2f}x {_mib(r.peak_mem_dense_bytes):>11} {_mib(r.peak_mem_dam_bytes):>9}")
        return "\n".join(lines)


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}MiB"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Callable[[], object], dev: torch.device) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


class _PeakMemory:
    """Peak memory of a block: CUDA peak allocated, or the CPU process's peak-RSS rise."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.peak: int | None = None

    @staticmethod
    def _hwm() -> int | None:
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self) -> _PeakMemory:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
            self._base = torch.cuda.memory_allocated(self.dev)
        else:
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                    fh.write("5")  # resets VmHWM to the current RSS
                self._base = self._rss()
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            self.peak = int(torch.cuda.max_memory_allocated(self.dev) - self._base)
        elif self._base is not None:
            hwm = self._hwm()
            self.peak = None if hwm is None else max(0, hwm - self._base)


def _decode_run(model, cache, last_token: torch.Tensor, n_prompt: int, steps: int, dev) -> float:
    """``steps`` greedy decode steps from ``cache`` (cropped back to the prompt after); s/token."""
    tok = last_token
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    _sync(dev)
    dt = time.perf_counter() - t0
    extra = cache.get_seq_length() - n_prompt
    if extra > 0:
        cache.crop(-extra)  # transformers 5: a negative count removes that many tokens
    return dt / steps


def _capture_qkv(model, handle, layer: int, ids: torch.Tensor):
    """(q, k, v, planned layout) of ``layer`` from one DAM forward (post-RoPE q/k, v as used)."""
    got: dict = {}
    mod = handle._modules[layer]

    def on_layout(li, q, k, layout):
        if li == layer:
            got["q"], got["k"], got["layout"] = q.clone(), k.clone(), layout
        return layout

    def on_v(_m, _inp, out):
        got["v_raw"] = out.detach().clone()

    h = mod.v_proj.register_forward_hook(on_v)
    handle.layout_hook = on_layout
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        handle.layout_hook = None
        h.remove()
    if "q" not in got:
        raise DamRuntimeError(f"layer {layer} ran no block-sparse call (is the length below min_length?)")
    q = got["q"]
    Bt, N = ids.shape
    D = q.shape[-1]
    v = got["v_raw"].view(Bt, N, -1, D).transpose(1, 2).contiguous()
    return q, got["k"], v, got["layout"]


def bench(
    model: torch.nn.Module,
    artifact: Artifact,
    inputs: dict[int, torch.Tensor],
    config: BenchConfig,
    progress: Callable[[int, int], None] | None = None,
) -> BenchReport:
    """Time dense vs DAM on ``inputs`` (length -> LongTensor ``[1, N]``) on the model's device."""
    if model.training:
        raise DamRuntimeError("bench needs model.eval()")
    p0 = next(model.parameters())
    dev, dtype = p0.device, p0.dtype
    L = artifact.num_layers
    layer = L // 2 if config.attention_layer is None else config.attention_layer
    if not 0 <= layer < L:
        raise DamRuntimeError(f"attention_layer must lie in [0, {L}), got {layer}")
    rows: list[BenchRow] = []
    runs = config.warmup + config.repeats
    total = len(inputs) * runs * 2
    done = 0
    for n in sorted(inputs):
        ids = inputs[n].to(dev)
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise DamRuntimeError(f"inputs[{n}] must be [1, N], got {tuple(ids.shape)}")
        if n < config.min_length:
            log.warning("length %d < min_length %d: DAM runs dense SDPA there", n, config.min_length)
        handle = _apply(model, artifact, config)
        handle.remove()  # re-applied per run below; validated once here
        times: dict[str, list[float]] = {"dense": [], "dam": []}
        dec: dict[str, list[float]] = {"dense": [], "dam": []}
        for r in range(runs):
            for mode in ("dense", "dam"):
                h = _apply(model, artifact, config) \
                    if mode == "dam" else None
                try:
                    box: dict = {}

                    def run(box=box, ids=ids):
                        with torch.no_grad():
                            box["out"] = model(ids, use_cache=True)

                    t = _timed(run, dev)
                    out = box.pop("out")
                    last = out.logits[:, -1:].argmax(-1)
                    with torch.no_grad():
                        d = _decode_run(model, out.past_key_values, last, n, config.decode_tokens, dev)
                    del out
                finally:
                    if h is not None:
                        h.remove()
                if r >= config.warmup:
                    times[mode].append(t)
                    dec[mode].append(d)
                done += 1
                if progress:
                    progress(done, total)
        peaks: dict[str, int | None] = {}
        for mode in ("dense", "dam"):
            h = _apply(model, artifact, config) if mode == "dam" else None
            try:
                with _PeakMemory(dev) as pm, torch.no_grad():
                    model(ids, use_cache=True)
            finally:
                if h is not None:
                    h.remove()
            peaks[mode] = pm.peak
        # attention only
        with apply(model, artifact, backend=config.backend, min_length=1, last_query=config.last_query) as h:
            q, k, v, layout = _capture_qkv(model, h, layer, ids)
            mod = h._modules[layer]
            scale = float(getattr(mod, "scaling", 1.0 / math.sqrt(q.shape[-1])))
            planner = h.planner(layer, dev)

            def dam_attn(planner=planner, n=n, q=q, k=k, v=v, scale=scale):
                lay = planner.plan(n, n, q, k)
                return _kernels.sparse_prefill(q, k, v, lay, scale=scale, backend=config.backend)

            def dense_attn(q=q, k=k, v=v, scale=scale):
                return _kernels.dense_attention(q, k, v, scale=scale)

            at: dict[str, list[float]] = {"dense": [], "dam": []}
            with torch.no_grad():
                for r in range(runs):
                    for mode, fn in (("dense", dense_attn), ("dam", dam_attn)):
                        t = _timed(fn, dev)
                        if r >= config.warmup:
                            at[mode].append(t)
            nkb = -(-n // layout.block_n)
            causal = (torch.arange(nkb)[None, :] <= torch.arange(layout.num_q_blocks)[:, None]).sum().item()
            lay_density = float(layout.kv_counts.double().sum(-1).mean().item() / causal)
        med = {m: statistics.median(v) for m, v in times.items()}
        dmed = {m: statistics.median(v) for m, v in dec.items()}
        amed = {m: statistics.median(v) for m, v in at.items()}
        rows.append(BenchRow(
            length=n, prefill_dense_s=med["dense"], prefill_dam_s=med["dam"],
            prefill_speedup=med["dense"] / med["dam"],
            decode_dense_s_per_token=dmed["dense"], decode_dam_s_per_token=dmed["dam"],
            decode_speedup=dmed["dense"] / dmed["dam"],
            attn_dense_s=amed["dense"], attn_dam_s=amed["dam"], attn_speedup=amed["dense"] / amed["dam"],
            attn_layer=layer, attn_layer_density=lay_density,
            peak_mem_dense_bytes=peaks["dense"], peak_mem_dam_bytes=peaks["dam"],
        ))
        log.info("bench N=%d: prefill %.3fs dense / %.3fs dam", n, med["dense"], med["dam"])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return BenchReport(rows, name, str(dtype).replace("torch.", ""), torch.get_num_threads(), asdict(config))


__all__ = ["BenchConfig", "BenchReport", "BenchRow", "bench"]
