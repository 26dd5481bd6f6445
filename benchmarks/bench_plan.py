"""Planning time against the attention it plans, per layer of a DAM artifact (SmolLM2 shapes).

For each length and each sampled layer of the artifact, with the runtime's settings (last-query
estimate as the artifact's metadata sets it): the per-call plan (static part cached: the dynamic
top-k and the estimate), split into its dynamic-score and estimate parts, beside dense causal
SDPA on the same q/k/v, interleaved (median of ``--rounds``). Random inputs of the model's
shapes: planning cost depends on shapes and programs, not on values.

    OMP_WAIT_POLICY=passive python benchmarks/bench_plan.py --out benchmarks/results/plan_cpu_bfloat16.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dam.compiler import load_artifact
from dam.kernels import block_sparse_attention, cpu_flex, cpu_native
from dam.runtime import Planner, RuntimeConfig
from dam.runtime.estimate import last_query_mask
from dam.runtime.eval.record import write_result
from dam.runtime.planner import dynamic_indices


def _len(s: str) -> int:
    s = s.strip().lower()
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default="artifacts/smollm2-135m.dam.safetensors")
    ap.add_argument("--lengths", default="4k,8k,16k")
    ap.add_argument("--layers", default="0,3,9,15,21,27", help="comma-separated layer indices")
    ap.add_argument("--heads", default="9,3,64", help="Hq,Hkv,D of the model (SmolLM2-135M)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    art = load_artifact(args.artifact)
    frac, nlast = RuntimeConfig().resolve_last_query(art)
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    dtype = getattr(torch, args.dtype)
    B = art.block_size
    rows = []
    for n in (_len(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(n)
        q = torch.randn(1, hq, n, d, generator=g).to(dtype)
        k = torch.randn(1, hkv, n, d, generator=g).to(dtype)
        v = torch.randn(1, hkv, n, d, generator=g).to(dtype)
        for layer in (int(x) for x in args.layers.split(",")):
            p = Planner(art.layer_programs(layer), B, "cpu", last_query=frac, last_query_queries=nlast)
            entry = p._static(n, n)
            # warm: the cached static part, and the compiled kernels' builds (an attention call
            # starts DAM's CPU kernel, whose fused planning ops the runtime then uses)
            block_sparse_attention(q, k, v, p.plan(n, n, q, k), validate=False)
            cpu_flex.wait_for_builds()
            eh = list(p._estimate_list)
            cur = entry.layout.block_mask(-(-n // B))[:, eh]
            fns = {
                "sdpa_s": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),  # noqa: B023
                "plan_s": lambda: p.plan(n, n, q, k),  # noqa: B023 (called in this iteration)
            }
            if entry.bias is not None:
                fns["dynamic_s"] = lambda: dynamic_indices(p.table, entry.bias, entry.budget, q, k,  # noqa: B023
                                                           None, None, B)
            if p.estimates(n):
                fns["estimate_s"] = lambda: last_query_mask(q, k, cur, eh, frac, nlast, B)  # noqa: B023
            times: dict[str, list[float]] = {name: [] for name in fns}
            for fn in fns.values():
                fn()
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    times[name].append(_once(fn))
            row = {"length": n, "layer": layer, "dynamic_heads": p.table.num_dynamic, "estimate_heads": len(eh)}
            row.update({name: statistics.median(ts) for name, ts in times.items()})
            row["plan_share_of_sdpa"] = row["plan_s"] / row["sdpa_s"]
            rows.append(row)
            print(json.dumps({k_: round(v_, 4) if isinstance(v_, float) else v_ for k_, v_ in row.items()}), flush=True)
    summary = {}
    for n in sorted({r["length"] for r in rows}):
        sel = [r for r in rows if r["length"] == n]
        summary[str(n)] = {"plan_share_of_sdpa_mean": statistics.mean(r["plan_share_of_sdpa"] for r in sel),
                           "plan_s_mean": statistics.mean(r["plan_s"] for r in sel),
                           "sdpa_s_mean": statistics.mean(r["sdpa_s"] for r in sel)}
    print(json.dumps(summary, indent=1))
    if args.out:
        write_result(args.out, {"summary": summary, "rows": rows}, dtype=args.dtype, device="cpu",
                     artifact=str(args.artifact), rounds=args.rounds, last_query=frac, last_query_queries=nlast,
                     compiled=cpu_flex.mode(), native=cpu_native.state())


if __name__ == "__main__":
    main()
