"""Planning time as a fraction of attention time, 8K..64K (one layer, SmolLM2-135M shapes).

For each length: the static plan of a new length (uncached), the per-call plan (static part
cached, dynamic top-k from pooled q/k), and the block-sparse attention call the plan feeds.

    python benchmarks/bench_plan.py --lengths 8k,16k,32k,64k --backend cpu --out benchmarks/results/plan_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dam.compiler import MaskProgram
from dam.kernels import block_sparse_attention
from dam.runtime import Planner

PROGRAMS = [  # a typical compiled mix for 9 query heads
    MaskProgram(sink=64, window=512),
    MaskProgram(sink=64, window=256, slashes=(640, 1280), verticals=(100,)),
    MaskProgram(window=256, dynamic_fraction=0.05),
] * 3


def _len(s: str) -> int:
    s = s.strip().lower()
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def _time(fn, reps: int, sync) -> float:
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8k,16k,32k,64k")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for n in (_len(x) for x in args.lengths.split(",")):
        q = torch.randn(1, 9, n, 64, device=dev, dtype=dtype)
        k = torch.randn(1, 3, n, 64, device=dev, dtype=dtype)
        v = torch.randn(1, 3, n, 64, device=dev, dtype=dtype)

        def fresh():
            Planner(PROGRAMS, 64, dev).plan(n, n, q, k)  # noqa: B023 (called at once)

        planner = Planner(PROGRAMS, 64, dev)
        layout = planner.plan(n, n, q, k)
        t_static = _time(fresh, args.reps, sync)
        t_call = _time(lambda: planner.plan(n, n, q, k), args.reps, sync)  # noqa: B023 (called at once)
        t_attn = _time(lambda: block_sparse_attention(q, k, v, layout, backend=args.backend), args.reps, sync)  # noqa: B023 (called at once)
        nkb = -(-n // 64)
        density = float(layout.kv_counts.double().sum() / (layout.batch * 9 * nkb * (nkb + 1) / 2))
        row = dict(length=n, density=round(density, 4), plan_uncached_s=t_static, plan_per_call_s=t_call,
                   attention_s=t_attn, plan_fraction_per_call=t_call / t_attn,
                   plan_fraction_uncached=t_static / t_attn)
        rows.append(row)
        print(json.dumps(row))
    meta = dict(device=str(dev), dtype=str(dtype), backend=args.backend, torch=torch.__version__,
                machine=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
