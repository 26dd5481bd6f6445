"""Orchestration shared by ``dam eval`` and ``dam demo``: building evaluation inputs from the
profiler's data sources, baseline artifacts with the compiler, and writing JSON + PNG plots.
(cli may import every stage; the runtime harness itself never sees the profiler or zarr.)"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

log = logging.getLogger(__name__)

# sample seeds of the synthetic retrieval prompts used for evaluation: far from the profiler's
# (sample j of a profile run uses seed * 1000003 + j), so no prompt is one the profile saw
RETRIEVAL_SEED_BASE = 7_000_000


def build_samples(tokenizer, data: str, lengths: Sequence[int], tasks: Sequence[str], samples: int,
                  *, seed: int = 0, start: int = 64):
    """EvalSamples: ``samples`` text windows of ``data`` (stream items ``start ..``) per length for
    fidelity/recall, and ``samples`` passkey / kv-retrieval prompts per length when asked."""
    import torch

    from dam.profiler import calibration_samples, make_kv_retrieval_ids, make_passkey_ids
    from dam.runtime.evaluate import EvalSample

    out = []
    for n in lengths:
        text = calibration_samples(data, tokenizer, n, samples, seed=seed, start=start)
        out += [EvalSample("text", row.clone()) for row in text]
        # the answer as it continues the prompt: ' 12345' after "The pass key is", ' "<uuid>' after
        # "...the specified key is:" (values are quoted in the prompt's JSON)
        for task, make, lead in (("passkey", make_passkey_ids, " "), ("kv-retrieval", make_kv_retrieval_ids, ' "')):
            if task not in tasks:
                continue
            for i in range(samples):
                ids, ans = make(tokenizer, n, RETRIEVAL_SEED_BASE + 1000 * n + i)
                ans_ids = tokenizer(lead + ans, add_special_tokens=False)["input_ids"]
                out.append(EvalSample(task, torch.tensor(ids, dtype=torch.long), tuple(ans_ids), ans))
    return out


def paper_artifact(store: str, target_length: int | None = None):
    """The seed paper's method compiled from a profile store (``dam compile --method dam-paper``)."""
    from dam.compiler import CompileConfig, compile_profile

    return compile_profile(store, CompileConfig(method="dam-paper", target_length=target_length)).artifact


def write_report(report, out_dir: str, meta: dict | None = None, prefix: str = "eval") -> list[str]:
    """``{prefix}.json`` and the PNG plots into ``out_dir``; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    data = report.to_json()
    if meta:
        data["meta"] = meta
    path = os.path.join(out_dir, f"{prefix}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, allow_nan=True)
    return [path, *plot_report(data["rows"], out_dir, prefix)]


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


def tqdm_progress(desc: str, unit: str = "run"):
    """A ``progress(done, total)`` callback driving one tqdm bar, and a closer."""
    from tqdm import tqdm

    bars: list = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=desc, unit=unit))
        bars[0].total = total
        bars[0].n = done
        bars[0].refresh()

    def close() -> None:
        for b in bars:
            b.close()

    return progress, close
