"""Compile objectives side by side: each against a StreamingLLM window of the *same* density.

For every variant (objective x allocation x component set) the script compiles an artifact from
one profile store, then on held-out text windows (stream items ``--start ..`` of ``--data``, which
the profile never saw) runs dense, DAM with that artifact, and a StreamingLLM-style artifact whose
window gives the block density DAM really ran on that input. Reported per variant: measured block
density, top-1 agreement with dense, mean KL(dense || method), ΔPPL, and top-1/KL over the last
quarter of the positions (the long-context rows: a wide local window is exact on the first
``window`` positions, which flatters its whole-sequence mean).

    python benchmarks/bench_objective.py --profile /tmp/smollm2-mix-2k.zarr --length 4096 --samples 2 \\
        --out benchmarks/results/objective_smollm2_4k.json

The store must hold ``block_err`` (written by ``dam profile`` since the value-aware objective).
"""

from __future__ import annotations

import argparse

import torch

VARIANTS = {
    # name: CompileConfig overrides
    "mass": dict(objective="mass"),
    "mass-global": dict(objective="mass", allocate="global"),
    "error": dict(objective="error"),
    "error-sink-window": dict(objective="error", max_verticals=0, max_slashes=0, block_slashes=False,
                              dynamic=False),
}


KEYS = ("density", "top1", "kl", "dppl", "top1_q4", "kl_q4")


def _len(s: str) -> int:
    s = s.strip().lower()
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", required=True, help="profile store (with block_err)")
    ap.add_argument("--recall", type=float, default=0.95)
    ap.add_argument("--target-length", default=None, help="compile target (default: --length)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--data", default="builtin:stdlib")
    ap.add_argument("--length", default="4k")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--start", type=int, default=64)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from dam.compiler import CompileConfig, compile_profile, read_profile
    from dam.profiler import calibration_samples, load_model
    from dam.runtime.eval import EvalConfig, EvalSample, evaluate
    from dam.runtime.eval.record import write_result

    n = _len(a.length)
    target = _len(a.target_length) if a.target_length else n
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    torch.set_grad_enabled(False)
    prof = read_profile(a.profile)
    model, tok = load_model(a.model)
    samples = [EvalSample("text", x) for x in calibration_samples(a.data, tok, n, a.samples, seed=0, start=a.start)]
    cfg = EvalConfig(methods=("dam", "streaming"), tasks=("fidelity",), backend="cpu")
    out = {"args": vars(a), "variants": {}}
    for name in names:
        art = compile_profile(prof, CompileConfig(recall=a.recall, target_length=target, **VARIANTS[name])).artifact
        rows = {r["method"]: r for r in evaluate(model, {"dam": art}, samples, cfg).rows()}
        mean = {m: {k: rows[m][k] for k in KEYS} for m in ("dam", "streaming")}
        out["variants"][name] = {"compile": VARIANTS[name], "figures": art.metadata["figures"], "mean": mean}
        for m in ("dam", "streaming"):
            r = mean[m]
            print(f"{name:18s} {m:9s} density {r['density']:.4f} top1 {r['top1']:.4f} kl {r['kl']:.5f} "
                  f"dppl {r['dppl']:+.2%} | last quarter: top1 {r['top1_q4']:.4f} kl {r['kl_q4']:.5f}", flush=True)
        write_result(a.out, out, dtype="float32", device="cpu")  # after every variant: nothing lost
    print("wrote", a.out)


if __name__ == "__main__":
    main()
