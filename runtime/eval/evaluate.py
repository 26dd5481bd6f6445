"""Evaluation harness: DAM and baseline sparse methods against dense attention on the same inputs.

``evaluate(model, artifacts, samples, config)`` runs, per sample (``input_ids [N]``, optionally an
answer span), one dense forward and one forward per method, each method's through
:func:`dam.runtime.eval.recall.measure_recall` (so recall and density are *measured* on the layouts
the runtime really ran) and reports:

* fidelity (text samples): top-1 next-token agreement with dense, mean KL(dense || method) per
  position, perplexity and its relative change; top-1 and KL also over the last quarter of the
  positions alone (``top1_q4``, ``kl_q4``): the long-context rows, where every method is sparse
  (a method with a wide local window is exact on the first ``window`` positions, which flatters
  its whole-sequence mean);
* retrieval accuracy (samples with an answer span): the answer is fed after the prompt (teacher
  forcing) and counted correct when the argmax at every answer position is the answer token, i.e.
  greedy decoding would emit exactly the answer;
* recall / density per layer and head (means in the table, ``[L]`` profiles in the JSON).

Methods come from the registry (:mod:`dam.runtime.eval.methods`): ``dam`` (the artifact), the
baselines at DAM's measured block density on the same input (``streaming``, ``oracle``,
``minference``, ``element``), parameterised variants (``dam:last_query=0.1``) and any other named
artifact passed in (``dam-paper``). ``dense`` is always run (it is the reference).

No profiler, zarr or scikit-learn here: the caller supplies token tensors and artifacts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dam.compiler import Artifact

from ..errors import DamRuntimeError
from ..integration import apply
from . import methods as registry
from .logits import forward_logits
from .recall import measure_recall

log = logging.getLogger(__name__)

TASKS = ("fidelity", "passkey", "kv-retrieval", "recall")
#: what ``dam eval`` runs by default
METHODS = ("dam", "streaming", "oracle", "minference", "dam-paper")


@dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate`` runs.

    Attributes:
        methods: method names (:func:`dam.runtime.eval.methods.parse`); ``dam`` is required (the
            baselines are matched to it); a name that is not a registered method must be a given
            artifact.
        tasks: subset of :data:`TASKS` (what the report shows; recall is always measured).
        backend: kernel backend for :func:`dam.runtime.apply`.
        max_elements: scores per chunk when computing exact attention mass.
        recall_stride: measure recall on every ``recall_stride``-th query block only (a
            systematic sample, that many times cheaper; :func:`measure_recall`'s ``query_stride``).
        last_query: DAM's last-query estimate budget (``None``: the artifact's default; see
            :class:`dam.runtime.RuntimeConfig`). Artifact baselines keep their own default.
    """

    methods: tuple[str, ...] = ("dam", "streaming", "oracle", "minference")
    tasks: tuple[str, ...] = TASKS
    backend: str = "auto"
    max_elements: int = 1 << 24
    recall_stride: int = 1
    last_query: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if "dam" not in self.methods:
            raise DamRuntimeError("methods must include 'dam' (the baselines are matched to its density)")
        if len(set(self.methods)) != len(self.methods) or "dense" in self.methods:
            raise DamRuntimeError(f"methods must be distinct and not 'dense' (always run), got {self.methods}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise DamRuntimeError(f"unknown tasks {bad}; choose from {', '.join(TASKS)}")
        if self.max_elements < 1:
            raise DamRuntimeError("max_elements must be positive")
        if isinstance(self.recall_stride, bool) or not isinstance(self.recall_stride, int) or self.recall_stride < 1:
            raise DamRuntimeError(f"recall_stride must be a positive int, got {self.recall_stride!r}")


@dataclass(frozen=True)
class EvalSample:
    """One input: ``kind`` is ``"text"`` (fidelity) or a retrieval task (``"passkey"``,
    ``"kv-retrieval"``) with the answer's token ids, fed after ``input_ids`` (LongTensor ``[N]``)."""

    kind: str
    input_ids: torch.Tensor
    answer_ids: tuple[int, ...] = ()
    answer: str = ""
    depth: float | None = None  # where a pass key sits (fraction of the prompt's filler), when set
    domain: str | None = None  # the data source a text window came from (fidelity is also reported per domain)

    def __post_init__(self) -> None:
        if self.kind not in ("text", "passkey", "kv-retrieval"):
            raise DamRuntimeError(f"sample kind must be text, passkey or kv-retrieval, got {self.kind!r}")
        if self.input_ids.dim() != 1 or self.input_ids.numel() < 2:
            raise DamRuntimeError(f"input_ids must be a 1-D tensor of >= 2 tokens, got {tuple(self.input_ids.shape)}")
        if self.kind != "text" and not self.answer_ids:
            raise DamRuntimeError(f"a {self.kind} sample needs answer_ids")
        object.__setattr__(self, "answer_ids", tuple(int(t) for t in self.answer_ids))

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())


@dataclass
class MethodResult:
    """One (sample, method) run."""

    method: str
    kind: str
    length: int
    density: float = 1.0
    recall: float = 1.0
    static_recall: float = 1.0
    min_recall: float = 1.0
    top1: float | None = None
    kl: float | None = None
    top1_q4: float | None = None
    kl_q4: float | None = None
    nll: float | None = None
    correct: bool | None = None
    depth: float | None = None
    domain: str | None = None
    layer_density: list[float] = field(default_factory=list)
    layer_recall: list[float] = field(default_factory=list)
    head_density: list[list[float]] = field(default_factory=list)
    logits: torch.Tensor | None = field(default=None, repr=False)  # while scoring; not reported


@dataclass
class EvalReport:
    """All runs plus per-(length, method) aggregates (see :meth:`rows`)."""

    results: list[MethodResult]
    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One dict per (length, method), means over samples; ``dense`` first per length. Where the
        text windows come from more than one domain, ``by_domain`` holds the fidelity per domain."""
        out = []
        lengths = sorted({r.length for r in self.results})
        for n in lengths:
            dense_text = [r for r in self.results if r.length == n and r.method == "dense" and r.kind == "text"]
            ppl_dense = math.exp(_mean([r.nll for r in dense_text])) if dense_text else None
            domains = sorted({r.domain for r in dense_text if r.domain is not None})
            ppl_domain = {d: math.exp(_mean([r.nll for r in dense_text if r.domain == d])) for d in domains}
            for m in ("dense", "floor", *self.methods):
                rs = [r for r in self.results if r.length == n and r.method == m]
                if not rs:
                    continue
                text = [r for r in rs if r.kind == "text"]
                row: dict = {"length": n, "method": m, "samples": len(rs),
                             "density": _mean([r.density for r in rs]),
                             "recall": _mean([r.recall for r in rs]),
                             "static_recall": _mean([r.static_recall for r in rs]),
                             "min_head_recall": min(r.min_recall for r in rs)}
                if text and "fidelity" in self.tasks:
                    row.update(_fidelity(text, ppl_dense))
                    if len(domains) > 1:
                        row["by_domain"] = {
                            d: {"samples": sum(r.domain == d for r in text),
                                **_fidelity([r for r in text if r.domain == d], ppl_domain[d])}
                            for d in domains if any(r.domain == d for r in text)}
                for task in ("passkey", "kv-retrieval"):
                    tr = [r for r in rs if r.kind == task]
                    if tr and task in self.tasks:
                        row[f"{task}_acc"] = _mean([float(bool(r.correct)) for r in tr])
                        row[f"{task}_n"] = len(tr)
                        depths = sorted({r.depth for r in tr if r.depth is not None})
                        if depths:  # accuracy per depth: {"0.1": acc, ...}
                            row[f"{task}_by_depth"] = {f"{d:g}": _mean([float(bool(r.correct)) for r in tr
                                                                         if r.depth == d]) for d in depths}
                layers = [r.layer_density for r in rs if r.layer_density]
                if layers:
                    row["layer_density"] = [_mean(col) for col in zip(*layers, strict=True)]
                    row["layer_recall"] = [_mean(col) for col in
                                           zip(*[r.layer_recall for r in rs if r.layer_recall], strict=True)]
                heads = [r.head_density for r in rs if r.head_density]
                if heads:
                    row["head_density"] = torch.tensor(heads).mean(0).tolist()
                out.append(row)
        return out

    def to_json(self) -> dict:
        return {"schema": "dam.eval/1", "methods": list(self.methods), "tasks": list(self.tasks),
                "skipped": dict(self.skipped), "rows": self.rows(),
                "runs": [{k: v for k, v in r.__dict__.items() if k not in ("head_density", "logits")}
                         for r in self.results]}

    def format_table(self) -> str:
        """The summary table (one line per length and method)."""
        cols = [("length", "{:>6}"), ("method", "{:<11}"), ("density", "{:>8.4f}"), ("recall", "{:>7.4f}"),
                ("top1", "{:>7.4f}"), ("kl", "{:>8.5f}"), ("dppl", "{:>+8.2%}"), ("top1_q4", "{:>8.4f}"),
                ("kl_q4", "{:>8.5f}"),
                ("passkey_acc", "{:>8.2f}"), ("kv-retrieval_acc", "{:>8.2f}")]
        heads = {"dppl": "ΔPPL", "passkey_acc": "passkey", "kv-retrieval_acc": "kv-ret", "top1_q4": "top1-q4",
                 "kl_q4": "kl-q4"}
        head = " ".join(f"{heads.get(c, c):>{_w(f)}}" if c != "method" else f"{c:<11}" for c, f in cols)
        lines = [head]
        for row in self.rows():
            cells = []
            for c, f in cols:
                v = row.get(c)
                cells.append(f.format(v) if v is not None else f"{'-':>{_w(f)}}")
            lines.append(" ".join(cells))
        for m, why in self.skipped.items():
            lines.append(f"skipped {m}: {why}")
        return "\n".join(lines)


def _fidelity(text: Sequence[MethodResult], ppl_dense: float | None) -> dict:
    """Means of the fidelity figures over text runs, with ΔPPL against ``ppl_dense``."""
    ppl = math.exp(_mean([r.nll for r in text]))
    return {"top1": _mean([r.top1 for r in text]), "kl": _mean([r.kl for r in text]), "ppl": ppl,
            "top1_q4": _mean([r.top1_q4 for r in text]), "kl_q4": _mean([r.kl_q4 for r in text]),
            "ppl_dense": ppl_dense, "dppl": (ppl / ppl_dense - 1.0) if ppl_dense else None}


def _w(fmt: str) -> int:
    import re

    m = re.search(r"[<>]\+?(\d+)", fmt)
    return int(m.group(1)) if m else 8


def _mean(xs: Sequence[float | None]) -> float:
    xs = [float(x) for x in xs if x is not None]
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _per_position(dense_logits: torch.Tensor, logits: torch.Tensor | None, ids: torch.Tensor,
                  chunk: int = 512) -> dict[str, torch.Tensor]:
    """Per position of ``[N, V]`` logits, in chunks of positions, float32 log-softmax: ``agree``
    (top-1 equal) and ``kl`` (KL(dense || other), nats) ``[N]``, next-token NLL of ``other``
    (``nll``) and of dense (``dense_nll``) ``[N - 1]``. ``logits`` None: dense's NLL alone."""
    N = ids.numel()
    out = {"agree": torch.zeros(N, dtype=torch.bool), "kl": torch.zeros(N, dtype=torch.float64),
           "nll": torch.zeros(max(0, N - 1), dtype=torch.float64),
           "dense_nll": torch.zeros(max(0, N - 1), dtype=torch.float64)}
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        ld = torch.log_softmax(dense_logits[s:e].float(), -1)
        ls = torch.log_softmax(logits[s:e].float(), -1) if logits is not None else None
        if ls is not None:
            out["agree"][s:e] = (ld.argmax(-1) == ls.argmax(-1)).cpu()
            out["kl"][s:e] = (ld.exp() * (ld - ls)).sum(-1).clamp(min=0).double().cpu()
        tgt_end = min(e, N - 1)
        if tgt_end > s:
            tgt = ids[s + 1:tgt_end + 1].to(ld.device)[:, None]
            out["dense_nll"][s:tgt_end] = -ld[: tgt_end - s].gather(-1, tgt)[:, 0].double().cpu()
            if ls is not None:
                out["nll"][s:tgt_end] = -ls[: tgt_end - s].gather(-1, tgt)[:, 0].double().cpu()
    return out


def compare_logits(dense_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor,
                   chunk: int = 512) -> tuple[float, float, float, float]:
    """``(top1, kl, nll, dense_nll)`` over the positions of ``[N, V]`` logits: top-1 agreement,
    mean KL(dense || other) (nats), mean next-token NLL of ``other`` and of dense on ``ids [N]``.
    Computed in chunks of positions, float32 log-softmax."""
    return _means(_per_position(dense_logits, logits, ids, chunk))


def _means(pp: dict[str, torch.Tensor], start: int = 0) -> tuple[float, float, float, float]:
    """``(top1, kl, nll, dense_nll)`` means of :func:`_per_position`'s figures from position ``start`` on."""
    return (float(pp["agree"][start:].double().mean()), float(pp["kl"][start:].mean()),
            float(pp["nll"][start:].mean()), float(pp["dense_nll"][start:].mean()))


def compare_tail(dense_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """``(top1, kl)`` of :func:`compare_logits` over the last quarter of the positions only."""
    q4 = (3 * ids.numel()) // 4
    top1, kl, _, _ = compare_logits(dense_logits[q4:], logits[q4:], ids[q4:])
    return top1, kl


def answer_correct(logits: torch.Tensor, prompt_len: int, answer_ids: Sequence[int]) -> bool:
    """Greedy exact match of the answer span: ``logits [N + a, V]`` of prompt + answer."""
    a = len(answer_ids)
    pred = logits[prompt_len - 1: prompt_len - 1 + a].argmax(-1).tolist()
    return pred == list(answer_ids)


def _dense_forward(model, ids: torch.Tensor):
    return forward_logits(model, ids[None])


def evaluate(
    model: torch.nn.Module,
    artifacts: dict[str, Artifact],
    samples: Sequence[EvalSample],
    config: EvalConfig,
    progress: Callable[[int, int], None] | None = None,
    floor_model: torch.nn.Module | None = None,
) -> EvalReport:
    """Run every sample densely and with every method (see the module docstring).

    With ``floor_model`` (the same model in float32), each text window also runs densely in it:
    row ``floor`` is the dtype's own noise floor, ``model``'s dense logits against float32 dense
    (top-1, KL(float32 ‖ dense)), its ΔPPL the float32 perplexity against ``model``'s.

    Args:
        model: a transformers causal LM (eval mode), batch 1 inputs on its device.
        artifacts: ``"dam"`` -> DAM's artifact, plus any artifact-backed method (``"dam-paper"``).
        samples: the inputs (text and/or retrieval prompts, any lengths).
        config: :class:`EvalConfig`.
        progress: ``fn(done, total)`` over (sample, method) runs.
    """
    if "dam" not in artifacts:
        raise DamRuntimeError("evaluate needs artifacts['dam']")
    specs = [registry.parse(m, artifacts) for m in order_methods(config.methods)]
    dev = next(model.parameters()).device
    results: list[MethodResult] = []
    n_floor = sum(s.kind == "text" for s in samples) if floor_model is not None else 0
    total = len(samples) * (1 + len(specs)) + n_floor
    done = 0
    cache: dict = {}
    if progress:
        progress(0, total)  # the bar shows before the first (dense) forward
    for sample in samples:
        ids = sample.input_ids.to(dev)
        full = torch.cat([ids, torch.tensor(sample.answer_ids, dtype=ids.dtype, device=dev)]) \
            if sample.kind != "text" else ids
        dense_logits = _dense_forward(model, full)
        results.append(_score(MethodResult("dense", sample.kind, sample.length, depth=sample.depth,
                                           domain=sample.domain), sample, ids, dense_logits, dense_logits))
        done += 1
        if progress:
            progress(done, total)
        if floor_model is not None and sample.kind == "text":
            results.append(_floor(floor_model, sample, ids, dense_logits))
            done += 1
            if progress:
                progress(done, total)
        ctx = registry.RunContext(artifacts, full.numel(), max_elements=config.max_elements,
                                  last_query=config.last_query, cache=cache)
        for spec in specs:  # "dam" first: the baselines are matched to it
            r = run_method(model, spec, ctx, full, config)
            r.kind, r.length, r.depth, r.domain = sample.kind, sample.length, sample.depth, sample.domain
            if spec.name == "dam":
                ctx = dataclasses.replace(ctx, density=r.density, recall=min(r.recall, 1.0))
            results.append(_score(r, sample, ids, dense_logits, r.logits))
            r.logits = None
            log.info("%s %s N=%d: density %.4f recall %.4f top1 %s", spec.name, sample.kind, sample.length,
                     r.density, r.recall, f"{r.top1:.4f}" if r.top1 is not None else "-")
            done += 1
            if progress:
                progress(done, total)
    return EvalReport(results, tuple(order_methods(config.methods)), config.tasks)


def _floor(floor_model: torch.nn.Module, sample: EvalSample, ids: torch.Tensor, dense_logits) -> MethodResult:
    """Row ``floor``: float32 dense as the reference, ``dense_logits`` compared with it."""
    pp = _per_position(_dense_forward(floor_model, ids), dense_logits, ids)
    r = MethodResult("floor", "text", sample.length, domain=sample.domain)
    r.top1, r.kl, _, r.nll = _means(pp)  # the float32 NLL: ΔPPL is float32's against the dtype's
    r.top1_q4, r.kl_q4, _, _ = _means(pp, (3 * ids.numel()) // 4)
    return r


def run_method(model: torch.nn.Module, spec: registry.MethodSpec, ctx: registry.RunContext, input_ids: torch.Tensor,
               config: EvalConfig) -> MethodResult:
    """One forward of ``input_ids [N]`` with the method applied: the density and recall it ran,
    measured on its layouts (:func:`measure_recall`), and its logits (in ``.logits``)."""
    p = registry.plan(spec, ctx)
    with apply(model, p.artifact, backend=config.backend, min_length=1, last_query=p.last_query) as handle:
        handle.layout_hook = p.hook(handle) if p.hook is not None else None
        rep = measure_recall(model, handle, input_ids[None], keep_logits=True, max_elements=config.max_elements,
                             query_stride=config.recall_stride)
    r = MethodResult(spec.name, "text", input_ids.numel(), density=rep.mean_density, recall=rep.mean_recall,
                     static_recall=rep.mean_static_recall, min_recall=float(rep.recall[rep.measured].min()),
                     layer_density=rep.density.mean(1).tolist(), layer_recall=rep.recall.mean(1).tolist(),
                     head_density=rep.density.tolist())
    r.logits = rep.logits
    return r


def _score(r: MethodResult, sample: EvalSample, ids: torch.Tensor, dense_logits: torch.Tensor,
           logits: torch.Tensor) -> MethodResult:
    """Fill ``r``'s fidelity (text) or answer correctness (retrieval) against dense."""
    if sample.kind == "text":
        if logits is dense_logits:  # the dense row itself: exact agreement, only its NLL to compute
            r.top1, r.kl, r.top1_q4, r.kl_q4 = 1.0, 0.0, 1.0, 0.0
            r.nll = float(_per_position(dense_logits, None, ids)["dense_nll"].mean())
            return r
        pp = _per_position(dense_logits, logits, ids)  # one pass: whole sequence and last quarter
        r.top1, r.kl, r.nll, _ = _means(pp)
        r.top1_q4, r.kl_q4, _, _ = _means(pp, (3 * ids.numel()) // 4)
    else:
        r.correct = answer_correct(logits, sample.length, sample.answer_ids)
    return r


def order_methods(methods: Sequence[str]) -> list[str]:
    return ["dam"] + [m for m in methods if m != "dam"]


def plot_report(rows: list[dict], out_dir: str, prefix: str = "eval") -> list[str]:
    """fidelity vs length per method, density vs recall, DAM's per-layer density map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    by = {(r["method"], r["length"]): r for r in rows}

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for m in methods:
        for ax, key, label in ((axes[0], "top1", "top-1 agreement (all positions)"),
                               (axes[1], "top1_q4", "top-1 agreement (last quarter)"),
                               (axes[2], "kl", "mean KL(dense‖method)"), (axes[3], "dppl", "ΔPPL (relative)")):
            xs = [n for n in lengths if by.get((m, n), {}).get(key) is not None]
            if xs:
                ax.plot(xs, [by[(m, n)][key] for n in xs], marker="o", label=m)
                ax.set_xlabel("length (tokens)")
                ax.set_ylabel(label)
                ax.set_xscale("log", base=2)
    for ax in axes[2:]:  # dense sits at 0 and the seed paper far above: a symlog axis shows both
        ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    fig.suptitle("fidelity vs length (same inputs, equal block density)")
    save(fig, "fidelity")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in methods:
        pts = [(by[(m, n)]["density"], by[(m, n)]["recall"], n) for n in lengths if (m, n) in by]
        if pts:
            ax.plot([a for a, _, _ in pts], [b for _, b, _ in pts], marker="o", label=m)
            for a, b, n in pts:
                ax.annotate(f"{n}", (a, b), fontsize=7)
    ax.set_xlabel("block density (kept / causal blocks)")
    ax.set_ylabel("attention-mass recall (measured)")
    ax.legend(fontsize=8)
    ax.set_title("density vs recall")
    save(fig, "density_recall")

    dam_rows = [by[("dam", n)] for n in lengths if ("dam", n) in by and "head_density" in by[("dam", n)]]
    if dam_rows:
        r = dam_rows[-1]
        hd = np.asarray(r["head_density"])
        fig, ax = plt.subplots(figsize=(5, 6))
        im = ax.imshow(hd, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(f"DAM block density per layer/head at {r['length']} tokens")
        fig.colorbar(im, ax=ax)
        save(fig, "layer_density")
    return paths


__all__ = ["METHODS", "TASKS", "EvalConfig", "EvalReport", "EvalSample", "MethodResult",
           "answer_correct", "compare_logits", "compare_tail", "evaluate", "plot_report", "run_method"]
