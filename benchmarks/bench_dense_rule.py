"""Where sparse prefill stops paying: per layer of a real model, dense SDPA vs DAM's sparse call.

Usage::

    python benchmarks/bench_dense_rule.py                          # SmolLM2, bf16, 4K and 8K
    python benchmarks/bench_dense_rule.py --dtype float32 --lengths 8k

Runs the model once on held-out text per length and keeps every layer's q/k/v (post-RoPE, as
the attention function receives them). Then, per layer, interleaved: dense causal SDPA, and the
sparse call the runtime makes with the dense rule off (planning at a cached length + the
kernel, the compiled CPU kernel once built). Fits ``sparse / dense`` against the layer's
density bound (:meth:`Planner.density_bound`, what the rule compares) with a least-squares line
and reports where it crosses 1: the break-even behind ``dam.runtime.integration.DENSE_ABOVE``.
Writes ``benchmarks/results/dense_rule_<model>_<dtype>.json``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch

from dam.compiler import load_artifact
from dam.kernels import cpu_flex, cpu_native
from dam.profiler import load_model, parse_length
from dam.profiler.data import calibration_samples
from dam.runtime import DamHandle, RuntimeConfig, _kernels
from dam.runtime.eval.bench import fit_break_even
from dam.runtime.eval.record import write_result

log = logging.getLogger("bench_dense_rule")
ROOT = Path(__file__).resolve().parent.parent


def capture(model, artifact, ids) -> dict[int, tuple]:
    """Every layer's (q, k, v, scale) of one forward, as DAM's attention function receives them."""
    import dam.runtime

    caps: dict[int, tuple] = {}
    with dam.runtime.apply(model, artifact, dense_above=1.0) as h:

        def keep(layer, q, k, v, mask, scaling, sliding_window, softcap=None):
            caps[layer] = (q.clone(), k.clone(), v.clone(), float(scaling))
            return _kernels.dense_attention(q, k, v, scale=float(scaling))

        h._attend = keep
        with torch.no_grad():
            model(ids, use_cache=False)
    return caps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "smollm2-135m.dam.safetensors")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", default="4k,8k")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="builtin:stdlib", help="held-out text (not the calibration data)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype)
    model.eval()
    art = load_artifact(args.artifact)
    handle = DamHandle(None, art, RuntimeConfig(backend="cpu", min_length=1, dense_above=1.0))
    results = []
    for n in (parse_length(x) for x in args.lengths.split(",")):
        ids = calibration_samples(args.data, tok, n, 1, seed=123, start=5)
        caps = capture(model, art, ids)
        rows = []
        for layer in sorted(caps):
            q, k, v, scale = caps[layer]
            bound = handle.planner(layer, q.device).density_bound(n, n)

            def sparse(layer=layer, q=q, k=k, v=v, scale=scale):
                return handle._attend(layer, q, k, v, None, scale, None)

            def dense(q=q, k=k, v=v, scale=scale):
                return _kernels.dense_attention(q, k, v, scale=scale)

            sparse()  # caches the length; starts the compiled kernel's build
            cpu_flex.wait_for_builds()
            sparse()
            ts: dict[str, list[float]] = {"dense": [], "sparse": []}
            for _ in range(args.rounds):
                for name, fn in (("dense", dense), ("sparse", sparse)):
                    t = time.perf_counter()
                    fn()
                    ts[name].append(time.perf_counter() - t)
            med = {k_: statistics.median(v_) for k_, v_ in ts.items()}
            rows.append({"layer": layer, "bound": bound, "dense_s": med["dense"], "sparse_s": med["sparse"],
                         "ratio": med["sparse"] / med["dense"]})
            log.info("N=%d layer %2d bound %.3f: dense %.1f ms sparse %.1f ms (%.2f)", n, layer, bound,
                     med["dense"] * 1e3, med["sparse"] * 1e3, med["sparse"] / med["dense"])
        results.append(fit_break_even(n, rows))
    out = args.out or ROOT / "benchmarks" / "results" / f"dense_rule_{args.model}_{args.dtype}.json"
    write_result(out, {"results": results, "model": args.model, "artifact": str(args.artifact), "rounds": args.rounds,
                       "cpu_kernel": {"flex_mode": cpu_flex.mode(), "flex_ready": cpu_flex.ready_signatures(),
                                      "native": cpu_native.state()}},
                 dtype=args.dtype, device="cpu")
    log.info("-> %s", out)


if __name__ == "__main__":
    main()
