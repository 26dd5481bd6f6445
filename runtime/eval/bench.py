"""End-to-end timing: prefill and per-token decode, DAM vs dense, plus attention-only time.

``bench(model, artifact, inputs, config)`` times, per length, on the model's own device and dtype
(the caller picks; ``default_dtype``: bf16 on a GPU or a CPU with native bf16, else fp32):

* prefill: ``model(ids, logits_to_keep=1)`` (cache built; the last position's logits, as
  ``generate``'s prefill computes them), dense vs DAM, interleaved per repeat;
* decode: ``decode_tokens`` greedy steps after that prefill (each run decodes from its own
  prefill's cache), seconds per token;
* attention only: one layer's attention call on q/k/v captured from a DAM forward of the same
  input (dense SDPA vs DAM's plan + block-sparse kernel);
* peak memory of one prefill each: CUDA peak allocated bytes on a GPU; on the CPU the rise of
  the process's peak RSS (``VmHWM`` after resetting it via ``/proc/self/clear_refs``), or None
  where that is not available.

Medians of ``repeats`` runs after ``warmup`` runs; the ratios (dense / DAM) come from the same run.
``prefill_only`` keeps prefill and decode alone (no attention share, effective density, peak
memory or attention-only timing: those figures are NaN / None), for a quick side-by-side.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from dam.compiler import Artifact, MaskProgram

from .. import _kernels
from ..errors import DamRuntimeError
from ..integration import MIN_LENGTH, apply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """Attributes: repeats (median over them), warmup (untimed runs first), decode_tokens (steps
    timed per decode run), backend, min_length (as :func:`dam.runtime.apply`), attention_layer
    (the layer of the attention-only timing; None = the middle layer), decode (see
    :class:`dam.runtime.RuntimeConfig`), last_query (``None``: the artifact's default),
    prefill_only (time prefill and decode only; see the module docstring)."""

    repeats: int = 3
    warmup: int = 1
    decode_tokens: int = 8
    backend: str = "auto"
    min_length: int = MIN_LENGTH
    attention_layer: int | None = None
    decode: str = "auto"
    last_query: float | None = None
    prefill_only: bool = False

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


def fit_break_even(n: int, rows: list[dict]) -> dict:
    """A length's record: its per-layer ``rows`` (``bound``, ``ratio`` = sparse / dense), the
    least-squares line of ratio against bound and the bound where it crosses 1."""
    xs = [r["bound"] for r in rows]
    ys = [r["ratio"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    icpt = my - slope * mx
    even = (1.0 - icpt) / slope if slope > 0 else None
    log.info("N=%d: sparse/dense ~ %.3f + %.3f * bound -> break-even bound %s", n, icpt, slope,
             "none" if even is None else f"{even:.3f}")
    return {"length": n, "layers": rows, "fit": {"intercept": icpt, "slope": slope}, "break_even_bound": even}


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
    #: share of dense prefill time spent in attention (1 - time with a no-op attention / dense)
    attn_share: float = float("nan")
    #: mean over layers of the block density that runs (1.0 for layers the dense rule runs dense)
    density: float = float("nan")
    #: layers the dense rule ran dense at this length (None: not measured, ``prefill_only``)
    dense_layers: int | None = 0
    #: 1 / (1 - s + s * d): the prefill speed-up if attention took density x its dense time
    ceiling: float = float("nan")
    #: share of DAM's prefill time spent planning (static lookup, dynamic scores, estimate)
    plan_share: float = float("nan")


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
                 f"{'length':>7} {'prefill dense':>14} {'prefill dam':>12} {'x':>6} {'ceiling':>8} "
                 f"{'attn%':>6} {'density':>8} {'dense L':>8} {'plan%':>6} {'decode dense':>13} "
                 f"{'decode dam':>11} {'x':>6} {'attn dense':>11} {'attn dam':>9} {'x':>6} {'peak dense':>11} "
                 f"{'peak dam':>9}"]
        for r in self.rows:
            lines.append(
                f"{r.length:>7} {r.prefill_dense_s:>13.3f}s {r.prefill_dam_s:>11.3f}s {r.prefill_speedup:>5.2f}x "
                f"{_num(r.ceiling, '{:.2f}x'):>8} {_num(100 * r.attn_share, '{:.0f}%'):>6} "
                f"{_num(r.density, '{:.3f}'):>8} {'-' if r.dense_layers is None else r.dense_layers:>8} {_num(100 * r.plan_share, '{:.1f}%'):>6} "
                f"{1e3 * r.decode_dense_s_per_token:>10.2f}ms {1e3 * r.decode_dam_s_per_token:>8.2f}ms "
                f"{r.decode_speedup:>5.2f}x {_num(1e3 * r.attn_dense_s, '{:.2f}ms'):>11} "
                f"{_num(1e3 * r.attn_dam_s, '{:.2f}ms'):>9} {_num(r.attn_speedup, '{:.2f}x'):>6} "
                f"{_mib(r.peak_mem_dense_bytes):>11} {_mib(r.peak_mem_dam_bytes):>9}")
        lines.append("ceiling = 1 / (1 - attn% + attn% * density): the prefill speed-up if attention took "
                     "density x its dense time (dense L: layers the dense rule ran dense, density 1)")
        return "\n".join(lines)


def _num(x: float, fmt: str) -> str:
    """``fmt`` of x, or "-" for a figure not measured (NaN)."""
    return "-" if x != x else fmt.format(x)


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


def default_dtype(device: str | torch.device) -> str:
    """The dtype a user of ``device`` runs: bf16 on CUDA and on CPUs with native bf16 matmuls
    (AMX-BF16 or AVX512-BF16, read from ``/proc/cpuinfo``), else float32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bfloat16"
    return "bfloat16" if cpu_has_bf16() else "float32"


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matmul instructions (amx_bf16 or avx512_bf16)."""
    from dam.kernels.cpu_flex import cpu_flags

    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def _null_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An attention that costs nothing: zeros ``[B, N, Hq, D]`` (for the attention share)."""
    B, H, N, D = query.shape
    return query.new_zeros((B, N, H, value.shape[-1])), None


class _NullAttention:
    """Context: the model's attention replaced by :func:`_null_attention` (configs switched)."""

    NAME = "dam_null_bench"

    def __init__(self, model) -> None:
        from transformers import AttentionInterface

        from ..integration import _configs

        AttentionInterface.register(self.NAME, _null_attention)
        self.configs = _configs(model)

    def __enter__(self):
        self.saved = [(c, c._attn_implementation_internal) for c in self.configs]
        for c in self.configs:
            c._attn_implementation_internal = self.NAME
        return self

    def __exit__(self, *exc) -> None:
        for c, prev in self.saved:
            c._attn_implementation_internal = prev


def _layout_density(layout, nk: int) -> float:
    """Kept blocks over causal blocks (queries = keys, square blocks), mean over rows and heads."""
    nkb = -(-nk // layout.block_n)
    causal = (torch.arange(nkb)[None, :] <= torch.arange(layout.num_q_blocks)[:, None]).sum().item()
    return float(layout.kv_counts.double().sum(-1).mean().item() / causal)


def _effective_density(model, artifact, config: BenchConfig, ids: torch.Tensor) -> tuple[float, int, float]:
    """(mean over layers of the block density that runs, layers the dense rule runs dense, planning
    seconds of one warm forward) for DAM on ``ids``: a layer's planned block density where it runs
    sparse, 1.0 where it runs dense (all-dense programs, below ``min_length``, or the dense rule),
    the band's block density on a sliding-window layer."""
    p0 = next(model.parameters())
    dev, dtype = p0.device, p0.dtype
    L, n = artifact.num_layers, ids.shape[1]
    h = _apply(model, artifact, config)
    plan_s = [0.0]
    seen: dict[int, float] = {}
    try:
        dense = {layer for layer in range(L) if not h.runs_sparse(layer, n, n, dev, dtype)}
        wrapped: set[int] = set()
        for layer in range(L):
            p = h.planner(layer, dev)
            if id(p) in wrapped:
                continue
            wrapped.add(id(p))

            def timed(*a, orig=p.plan, **kw):
                t0 = time.perf_counter()
                out = orig(*a, **kw)
                _sync(dev)
                plan_s[0] += time.perf_counter() - t0
                return out

            p.plan = timed
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)  # warm: the static layouts are cached per length
            plan_s[0] = 0.0
            model(ids, use_cache=False, logits_to_keep=1)  # the planning time of a warm forward
        plan_time = plan_s[0]  # before the observing forward below (it plans every layer)

        def hook(layer, q, k, layout):
            seen[layer] = _layout_density(layout, k.shape[2])
            return layout

        h.layout_hook = hook  # with a hook every layer runs sparse: its planned layout is seen
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
    finally:
        h.remove()
    band = {layer: MaskProgram(window=w).density(n, n, h.block_size) for layer, w in artifact.sliding_windows().items()}
    dense -= set(band)  # sliding layers run their exact band, never dense nor planned
    dens = [band[layer] if layer in band else 1.0 if layer in dense else seen.get(layer, 1.0) for layer in range(L)]
    return statistics.fmean(dens), len(dense), plan_time


def _decode_run(model, cache, last_token: torch.Tensor, steps: int, dev) -> float:
    """``steps`` greedy decode steps from ``cache`` (which they extend); seconds per token."""
    tok = last_token
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    _sync(dev)
    return (time.perf_counter() - t0) / steps


def _capture_qkv(model, handle, layer: int, ids: torch.Tensor):
    """(q, k, v, scale, planned layout) of ``layer`` from one DAM forward (post-RoPE q/k)."""
    with handle.capture(layer) as got, torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
    if "layout" not in got:
        raise DamRuntimeError(f"layer {layer} ran no block-sparse call (is the length below min_length?)")
    return got["q"], got["k"], got["v"], got["scale"], got["layout"]


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
    layer = _attention_layer(artifact, config.attention_layer)
    rows: list[BenchRow] = []
    runs = config.warmup + config.repeats
    total = len(inputs) * runs * 2
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    if progress:
        progress(0, total)
    for n in sorted(inputs):
        ids = inputs[n].to(dev)
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise DamRuntimeError(f"inputs[{n}] must be [1, N], got {tuple(ids.shape)}")
        if n < config.min_length:
            log.warning("length %d < min_length %d: DAM runs dense SDPA there", n, config.min_length)
        _apply(model, artifact, config).remove()  # re-applied per run below; validated once here
        _build_kernels(model, artifact, config, ids)
        times, dec = _time_prefill_decode(model, artifact, config, ids, runs, tick)
        nan = float("nan")
        if config.prefill_only:
            peaks = {"dense": None, "dam": None}
            density, n_dense, plan_s = nan, None, nan
            amed, lay_density = {"dense": nan, "dam": nan}, nan
        else:
            peaks = {mode: _peak_memory(model, artifact if mode == "dam" else None, config, ids)
                     for mode in ("dense", "dam")}
            density, n_dense, plan_s = _effective_density(model, artifact, config, ids)
            amed, lay_density = _attention_only(model, artifact, config, ids, layer, runs)
        med = {m: statistics.median(v) for m, v in times.items() if v}
        dmed = {m: statistics.median(v) for m, v in dec.items()}
        share = min(1.0, max(0.0, 1.0 - med["null"] / med["dense"])) if times["null"] else nan
        rows.append(BenchRow(
            length=n, prefill_dense_s=med["dense"], prefill_dam_s=med["dam"],
            prefill_speedup=med["dense"] / med["dam"],
            decode_dense_s_per_token=dmed["dense"], decode_dam_s_per_token=dmed["dam"],
            decode_speedup=dmed["dense"] / dmed["dam"],
            attn_dense_s=amed["dense"], attn_dam_s=amed["dam"], attn_speedup=amed["dense"] / amed["dam"],
            attn_layer=layer, attn_layer_density=lay_density,
            peak_mem_dense_bytes=peaks["dense"], peak_mem_dam_bytes=peaks["dam"],
            attn_share=share, density=density, dense_layers=n_dense,
            ceiling=1.0 / (1.0 - share + share * density), plan_share=plan_s / med["dam"],
        ))
        log.info("bench N=%d: prefill %.3fs dense / %.3fs dam", n, med["dense"], med["dam"])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    cfg = asdict(config)
    if dev.type == "cpu":
        from dam.kernels import cpu_flex, cpu_native

        cfg["cpu_kernel"] = {"flex_mode": cpu_flex.attention_mode(), "flex_ready": cpu_flex.ready_signatures(),
                             "native": cpu_native.state()}
    return BenchReport(rows, name, str(dtype).replace("torch.", ""), torch.get_num_threads(), cfg)


def _attention_layer(artifact: Artifact, asked: int | None) -> int:
    """The layer timed alone: ``asked``, else the middle one of the full-attention layers (a
    sliding-window layer runs its band, never a planned block-sparse call)."""
    L = artifact.num_layers
    if asked is not None:
        if not 0 <= asked < L:
            raise DamRuntimeError(f"attention_layer must lie in [0, {L}), got {asked}")
        if asked in artifact.sliding_windows():
            raise DamRuntimeError(f"layer {asked} is a sliding-window layer (it runs its exact band); "
                                  "pick a full-attention layer")
        return asked
    full = [layer for layer in range(L) if layer not in artifact.sliding_windows()]
    return full[len(full) // 2]


def _time_prefill_decode(model, artifact, config: BenchConfig, ids: torch.Tensor, runs: int, tick):
    """Per run: the model without attention (the attention share), then dense and DAM prefill
    followed by ``decode_tokens`` steps. -> ``(times {null, dense, dam}, decode {dense, dam})``."""
    dev = ids.device
    times: dict[str, list[float]] = {"dense": [], "dam": [], "null": []}
    dec: dict[str, list[float]] = {"dense": [], "dam": []}
    null = _NullAttention(model)
    for r in range(runs):
        if not config.prefill_only:
            with null, torch.no_grad():
                t_null = _timed(lambda: model(ids, use_cache=True, logits_to_keep=1), dev)
            if r >= config.warmup:
                times["null"].append(t_null)
        for mode in ("dense", "dam"):
            h = _apply(model, artifact, config) if mode == "dam" else None
            try:
                box: dict = {}

                def run(box=box):
                    with torch.no_grad():
                        box["out"] = model(ids, use_cache=True, logits_to_keep=1)

                t = _timed(run, dev)
                out = box.pop("out")
                last = out.logits[:, -1:].argmax(-1)
                with torch.no_grad():
                    d = _decode_run(model, out.past_key_values, last, config.decode_tokens, dev)
                del out
            finally:
                if h is not None:
                    h.remove()
            if r >= config.warmup:
                times[mode].append(t)
                dec[mode].append(d)
            tick()
    return times, dec


def _peak_memory(model, artifact: Artifact | None, config: BenchConfig, ids: torch.Tensor) -> int | None:
    """Peak memory of one prefill, DAM applied when ``artifact`` is given (see the module docstring)."""
    h = _apply(model, artifact, config) if artifact is not None else None
    try:
        with _PeakMemory(ids.device) as pm, torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1)
    finally:
        if h is not None:
            h.remove()
    return pm.peak


def _attention_only(model, artifact: Artifact, config: BenchConfig, ids: torch.Tensor, layer: int, runs: int):
    """One layer's call as the runtime makes it (dense rule, plan, kernel) against dense SDPA on
    the same captured q/k/v. -> ``({dense, dam}: median seconds, the layer's planned density)``."""
    dev = ids.device
    with apply(model, artifact, backend=config.backend, min_length=1, last_query=config.last_query) as h:
        h.layout_hook = lambda _layer, _q, _k, layout: layout  # every layer plans: none runs dense
        q, k, v, scale, layout = _capture_qkv(model, h, layer, ids)
    h_run = _apply(model, artifact, config)
    fns = {"dense": lambda: _kernels.dense_attention(q, k, v, scale=scale),
           "dam": lambda: h_run.attend(layer, q, k, v, scale)}
    at: dict[str, list[float]] = {"dense": [], "dam": []}
    try:
        with torch.no_grad():
            for r in range(runs):
                for mode, fn in fns.items():
                    t = _timed(fn, dev)
                    if r >= config.warmup:
                        at[mode].append(t)
    finally:
        h_run.remove()
    return {m: statistics.median(v) for m, v in at.items()}, _layout_density(layout, ids.shape[1])


def _build_kernels(model, artifact, config: BenchConfig, ids: torch.Tensor) -> None:
    """One untimed DAM forward, then wait for the kernel builds it started (the CPU path's
    compiled kernels build in the background; timings are of the steady state)."""
    if next(model.parameters()).device.type != "cpu":
        return
    from dam.kernels import cpu_flex

    if cpu_flex.attention_mode() == "off":  # nothing to build: the ATen path runs
        return
    with _apply(model, artifact, config), torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
    cpu_flex.wait_for_builds()


__all__ = ["BenchConfig", "BenchReport", "BenchRow", "bench", "cpu_has_bf16", "default_dtype", "fit_break_even"]
