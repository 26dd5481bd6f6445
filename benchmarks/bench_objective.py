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
import json
import math
import platform
import time

import torch

VARIANTS = {
    # name: CompileConfig overrides
    "mass": dict(objective="mass"),
    "mass-global": dict(objective="mass", allocate="global"),
    "error": dict(objective="error"),
    "error-sink-window": dict(objective="error", max_verticals=0, max_slashes=0, block_slashes=False,
                              dynamic=False),
}


def _len(s: str) -> int:
    s = s.strip().lower()
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def run_method(model, art, ids: torch.Tensor, dense_logits: torch.Tensor, make_hook=None, **apply_kwargs) -> dict:
    """One forward with ``art`` applied: density it ran, and fidelity against ``dense_logits``.
    ``make_hook(handle)`` may return a ``layout_hook`` that replaces the planned layouts;
    ``apply_kwargs`` go to :func:`dam.runtime.apply` (e.g. ``last_query``)."""
    from dam.runtime import apply
    from dam.runtime.baselines import causal_block_mask
    from dam.runtime.evaluate import compare_logits, compare_tail

    n = ids.numel()
    B = art.block_size
    causal = float(causal_block_mask(n, n, B).sum())
    dens = []

    with apply(model, art, backend="cpu", min_length=1, **apply_kwargs) as h:
        inner = make_hook(h) if make_hook is not None else None

        def observe(layer, q, k, layout):  # the layout every layer really ran
            if inner is not None:
                layout = inner(layer, q, k, layout)
            dens.append(float(layout.kv_counts[0].sum(-1).double().mean()) / causal)
            return layout

        h.layout_hook = observe
        t = time.perf_counter()
        logits = model(ids[None]).logits[0]
        wall = time.perf_counter() - t
    top1, kl, nll, dnll = compare_logits(dense_logits, logits, ids)
    top1_q4, kl_q4 = compare_tail(dense_logits, logits, ids)
    return {"density": sum(dens) / len(dens), "top1": top1, "kl": kl, "dppl": math.exp(nll - dnll) - 1.0,
            "top1_q4": top1_q4, "kl_q4": kl_q4, "wall_s": wall}


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
    from dam.runtime.baselines import streaming_artifact

    n = _len(a.length)
    target = _len(a.target_length) if a.target_length else n
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    torch.set_grad_enabled(False)
    prof = read_profile(a.profile)
    model, tok = load_model(a.model)
    xs = calibration_samples(a.data, tok, n, a.samples, seed=0, start=a.start)
    dense = [model(x[None]).logits[0] for x in xs]
    out = {"args": vars(a), "device": "cpu", "torch": torch.__version__, "platform": platform.platform(),
           "threads": torch.get_num_threads(), "variants": {}}
    for name in names:
        cfg = CompileConfig(recall=a.recall, target_length=target, **VARIANTS[name])
        art = compile_profile(prof, cfg).artifact
        runs = []
        for x, dl in zip(xs, dense, strict=True):
            dam = run_method(model, art, x, dl)
            stream = run_method(model, streaming_artifact(art, n, dam["density"]), x, dl)
            runs.append({"dam": dam, "streaming": stream})
        mean = {m: {k: sum(r[m][k] for r in runs) / len(runs) for k in runs[0][m]} for m in ("dam", "streaming")}
        out["variants"][name] = {"compile": VARIANTS[name], "figures": art.metadata["figures"], "runs": runs,
                                 "mean": mean}
        for m in ("dam", "streaming"):
            r = mean[m]
            print(f"{name:18s} {m:9s} density {r['density']:.4f} top1 {r['top1']:.4f} kl {r['kl']:.5f} "
                  f"dppl {r['dppl']:+.2%} | last quarter: top1 {r['top1_q4']:.4f} kl {r['kl_q4']:.5f}", flush=True)
        with open(a.out, "w", encoding="utf-8") as fh:  # after every variant: nothing lost on interruption
            json.dump(out, fh, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
