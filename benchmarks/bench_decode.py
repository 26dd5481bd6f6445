"""Decode-step benchmark on the CPU: one query against a long KV cache, dense SDPA vs DAM.

Usage::

    python benchmarks/bench_decode.py                       # bf16, caches 8K-32K, shipped artifact
    python benchmarks/bench_decode.py --dtypes bfloat16,float32 --lengths 8k,32k

Per cache length, for a few layers of the artifact, as shipped and with the dynamic part of every
program removed (its static blocks only), on random q/K/V of the model's attention shape
(SmolLM2: Hq 9, Hkv 3, D 64; contiguous caches, as transformers' ``DynamicCache`` holds them):

* ``dense``: what ``decode="dense"`` runs (SDPA over the whole cache, no mask);
* ``kernel``: ``dam.kernels.block_sparse_decode`` on the planned layout alone (the attention op);
* ``step``: what ``decode="sparse"`` runs per token: planning at a length the planner has not
  seen (each decode step is a new length) plus the kernel.

Timings are medians over interleaved rounds. This is the measurement behind the runtime's
``decode="auto"`` rule (:data:`dam.runtime.integration.DECODE_SPARSE_FROM`). Writes
``benchmarks/results/bench_decode_cpu.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
from pathlib import Path

import torch

from dam.compiler import load_artifact
from dam.profiler import parse_length
from dam.runtime import _kernels
from dam.runtime.eval.record import write_result
from dam.runtime.planner import Planner

log = logging.getLogger("bench_decode")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _median_times(fns: dict, rounds: int) -> dict:
    ts = {k: [] for k in fns}
    for r in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f(r)
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def measure(programs, n: int, hkv: int, d: int, block: int, dtype: torch.dtype, rounds: int,
            gen: torch.Generator) -> dict:
    hq = len(programs)
    scale = d ** -0.5
    q = torch.randn(1, hq, 1, d, generator=gen).to(dtype)
    # one contiguous cache per round, each one key longer: every step plans a new length
    ks = [torch.randn(1, hkv, n + r, d, generator=gen).to(dtype) for r in range(rounds)]
    vs = [torch.randn(1, hkv, n + r, d, generator=gen).to(dtype) for r in range(rounds)]
    lens = [torch.tensor([n + r], dtype=torch.int32) for r in range(rounds)]
    planner = Planner(programs, block, "cpu", cache_size=4)
    fixed = planner.plan(1, n, q, ks[0], scale=scale)

    def step(r):
        lay = planner.plan(1, n + r, q, ks[r], scale=scale)
        return _kernels.sparse_decode(q, ks[r], vs[r], lay, cache_seqlens=lens[r], scale=scale, backend="cpu")

    fns = {
        "dense": lambda r: _kernels.dense_attention(q, ks[r], vs[r], scale=scale),
        "kernel": lambda r: _kernels.sparse_decode(q, ks[0], vs[0], fixed, cache_seqlens=lens[0], scale=scale,
                                                   backend="cpu"),
        "step": step,
    }
    for f in fns.values():
        f(0)
    planner._cache.clear()  # the timed steps plan lengths not seen before
    med = _median_times(fns, rounds)
    nkb = -(-n // block)
    density = float(fixed.kv_counts.sum()) / (hq * nkb)
    return {"cache": n, "density": round(density, 4), "dynamic_heads": int(planner.table.num_dynamic),
            "dense_s": med["dense"], "kernel_s": med["kernel"], "step_s": med["step"],
            "kernel_speedup": med["dense"] / med["kernel"], "step_speedup": med["dense"] / med["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "smollm2-135m.dam.safetensors")
    ap.add_argument("--lengths", default="8k,16k,24k,32k")
    ap.add_argument("--layers", default="3,15,27", help="artifact layers to time")
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_decode_cpu.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    art = load_artifact(args.artifact)
    block = art.block_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip())
        for n in (parse_length(x) for x in args.lengths.split(",")):
            for layer in (int(x) for x in args.layers.split(",")):
                shipped = list(art.layer_programs(layer))
                static = [dataclasses.replace(p, dynamic_fraction=0.0) for p in shipped]
                for variant, progs in (("shipped", shipped), ("static only", static)):
                    row = measure(progs, n, args.kv_heads, args.head_dim, block, dtype, args.rounds, gen)
                    row.update(dtype=name.strip(), layer=layer, programs=variant)
                    rows.append(row)
                    log.info("%s cache %6d layer %2d %-11s density %.3f dyn %d: dense %.2f ms, kernel %.2f ms "
                             "(%.2fx), step %.2f ms (%.2fx)", row["dtype"], n, layer, variant, row["density"],
                             row["dynamic_heads"], row["dense_s"] * 1e3, row["kernel_s"] * 1e3,
                             row["kernel_speedup"], row["step_s"] * 1e3, row["step_speedup"])
    res = {"rows": rows, "config": {"artifact": str(args.artifact.relative_to(ROOT)) if args.artifact.is_relative_to(ROOT)
                                    else str(args.artifact), "Hq": art.num_heads, "Hkv": args.kv_heads,
                                    "D": args.head_dim, "block": block, "threads": args.threads,
                                    "rounds": args.rounds, "statistic": "median of interleaved rounds"},
           }
    write_result(args.out, res, dtype=args.dtypes, device="cpu")
    log.info("-> %s", args.out)


if __name__ == "__main__":
    main()
