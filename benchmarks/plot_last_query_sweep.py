"""Plot a last-query sweep (``sweep_last_query.py`` JSON): fidelity vs measured density, DAM with
the run-time estimate next to MInference-style at the same density; optionally the recall-0.95
programs alone (``--alone`` = a ``probe_hybrid.py`` JSON, whose ``dam`` entry ran without it).

    python benchmarks/plot_last_query_sweep.py benchmarks/results/last_query_sweep_8k.json \\
        --alone benchmarks/results/hybrid_probe_8k_w64.json --out benchmarks/results/last_query_sweep_8k.png
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep")
    ap.add_argument("--alone", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with open(a.sweep, encoding="utf-8") as fh:
        rows = json.load(fh)["rows"]
    alone = None
    if a.alone:
        with open(a.alone, encoding="utf-8") as fh:
            alone = json.load(fh)["dam"]
    panels = (("top1", "top-1 agreement", False), ("kl", "KL(dense ‖ sparse)", True),
              ("top1_q4", "top-1, last quarter", False), ("kl_q4", "KL, last quarter", True))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        for name, style in (("dam", dict(color="C0", marker="o")), ("minference", dict(color="C1", marker="s"))):
            xs = [r[name]["density"] for r in rows]
            ys = [r[name][key] for r in rows]
            label = "DAM + last-query" if name == "dam" else "MInference-style (same density)"
            ax.scatter(xs, ys, label=label, **style)
        for r in rows:
            ax.plot([r["dam"]["density"], r["minference"]["density"]], [r["dam"][key], r["minference"][key]],
                    color="0.7", lw=0.8, zorder=0)
            ax.annotate(f"{r['compile_recall']:.2f}+{r['last_query']:.2f}", (r["dam"]["density"], r["dam"][key]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        if alone is not None:
            ax.scatter([alone["density"]], [alone[key]], color="C3", marker="x", s=60,
                       label="DAM programs alone (recall 0.95)")
        ax.set_xlabel("measured block density")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    n = rows[0]["length"] if rows else "?"
    fig.suptitle(f"SmolLM2-135M, {n} tokens of held-out text: compile recall + last-query budget (labels)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(a.out, dpi=110)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
