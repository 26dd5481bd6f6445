"""Sweep: compiled programs x last-query budgets, each against MInference-style at the same density.

For every artifact and every ``--last-query`` fraction, one held-out window is run through DAM
(the artifact's programs + the run-time last-query estimate, :mod:`dam.runtime.estimate`) and
then through the MInference-style baseline at the density DAM measured on that input. Fidelity
is against dense attention on the same input (top-1, KL, ΔPPL, and on the last quarter of the
positions). Rows are appended to ``--out`` as they finish, so an interrupted sweep keeps them.

    python benchmarks/sweep_last_query.py --length 8k --start 64 \\
        --artifacts /tmp/r0.90.safetensors,/tmp/r0.85.safetensors --fractions 0.1,0.15 \\
        --out benchmarks/results/last_query_sweep_8k.json

(the artifacts come from ``dam compile STORE --recall R --target-length 8k``; run from the repo root.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

KEYS = ("density", "top1", "kl", "dppl", "top1_q4", "kl_q4", "wall_s")


def main() -> None:
    from bench_objective import run_method  # this directory's sibling script

    from dam.compiler import load_artifact
    from dam.profiler import calibration_samples, load_model, parse_length
    from dam.runtime.baselines import ElementVSHook, MInferenceHook

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="builtin:stdlib")
    ap.add_argument("--length", default="8k")
    ap.add_argument("--start", type=int, default=64, help="held-out window (stream item index)")
    ap.add_argument("--artifacts", required=True, help="comma-separated artifact paths")
    ap.add_argument("--fractions", default="0.1", help="comma-separated last-query budgets")
    ap.add_argument("--element-baseline", action="store_true",
                    help="also run DAM's element-level estimator alone (no programs) at DAM's density")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    n = parse_length(a.length)
    torch.set_grad_enabled(False)
    model, tok = load_model(a.model)
    x = calibration_samples(a.data, tok, n, 1, seed=0, start=a.start)[0]
    dense = model(x[None]).logits[0]
    rec = {"args": vars(a), "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "platform": platform.platform(), "rows": []}
    if os.path.exists(a.out):
        with open(a.out, encoding="utf-8") as fh:
            rec["rows"] = json.load(fh).get("rows", [])
    for path in a.artifacts.split(","):
        art = load_artifact(path)
        recall = art.metadata.get("compile", {}).get("recall")
        for f in (float(v) for v in a.fractions.split(",")):
            dam = run_method(model, art, x, dense, last_query=f)
            d = dam["density"]
            minf = run_method(model, art, x, dense, lambda h, d=d: MInferenceHook(h, d), last_query=0.0)
            res = {"dam": dam, "minference": minf}
            if a.element_baseline:
                res["element_vs"] = run_method(model, art, x, dense, lambda h, d=d: ElementVSHook(h, d), last_query=0.0)
            for name, r in res.items():
                print(f"recall {recall} last-query {f:.2f} {name:10s} " + " ".join(f"{k} {r[k]:.4f}" for k in KEYS),
                      flush=True)
            rec["rows"].append({"length": n, "start": a.start, "artifact": os.path.basename(path),
                                "compile_recall": recall, "last_query": f,
                                **{name: {k: r[k] for k in KEYS} for name, r in res.items()}})
            with open(a.out, "w", encoding="utf-8") as fh:
                json.dump(rec, fh, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
