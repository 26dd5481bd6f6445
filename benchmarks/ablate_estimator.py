"""Ablation of the run-time last-query estimate on one held-out window.

Runs, against dense attention on the same input: DAM (the artifact's programs + the estimate, budget
shared ``uniform`` and ``adaptive`` among a layer's heads), then at DAM's measured density the
estimator alone (``baselines.ElementVSHook``: diagonal + first block + the element-level estimate,
no programs) and the MInference-style baseline (pooled vertical/slash blocks). What the programs
add is DAM vs the estimator alone; what the element ranking adds is the estimator alone vs
MInference-style.

    python benchmarks/ablate_estimator.py --start 64 --last-query 0.15 \\
        --artifact artifacts/smollm2-135m.dam.safetensors --out benchmarks/results/estimator_ablation_8k_w64.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

KEYS = ("density", "top1", "kl", "dppl", "top1_q4", "kl_q4")


def main() -> None:
    from bench_objective import run_method  # this directory's sibling script

    from dam.compiler import load_artifact
    from dam.profiler import calibration_samples, load_model, parse_length
    from dam.runtime.baselines import ElementVSHook, MInferenceHook

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", default="artifacts/smollm2-135m.dam.safetensors")
    ap.add_argument("--data", default="builtin:stdlib")
    ap.add_argument("--length", default="8k")
    ap.add_argument("--start", type=int, default=64)
    ap.add_argument("--last-query", type=float, default=0.15)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    n = parse_length(a.length)
    torch.set_grad_enabled(False)
    model, tok = load_model(a.model)
    art = load_artifact(a.artifact)
    x = calibration_samples(a.data, tok, n, 1, seed=0, start=a.start)[0]
    dense = model(x[None]).logits[0]
    res = {}
    for share in ("uniform", "adaptive"):
        res[share] = run_method(model, art, x, dense, last_query=a.last_query, last_query_share=share)
    d = res["uniform"]["density"]
    res["element_vs"] = run_method(model, art, x, dense, lambda h: ElementVSHook(h, d), last_query=0.0)
    res["minference"] = run_method(model, art, x, dense, lambda h: MInferenceHook(h, d), last_query=0.0)
    for name, r in res.items():
        print(f"{name:10s} " + " ".join(f"{k} {r[k]:.4f}" for k in KEYS), flush=True)
    with open(a.out, "w", encoding="utf-8") as fh:
        json.dump({"args": vars(a), "device": "cpu", "torch": torch.__version__, "platform": platform.platform(),
                   **{name: {k: r[k] for k in KEYS} for name, r in res.items()}}, fh, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
