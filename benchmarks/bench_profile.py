"""Benchmark: tokens/s and peak RSS of ``dam.profiler.capture`` vs a plain forward on SmolLM2.

Each (mode, N) runs in its own subprocess so that peak RSS (``ru_maxrss``) belongs to that mode
alone; modes are interleaved per round so that machine load hits them alike. Modes:

- ``plain``: ``model(ids, use_cache=False)`` — the causal LM with its default (SDPA) attention;
- ``plain_decoder``: the decoder stack only (no LM head), default attention — what capture runs;
- ``capture``: ``capture(model, ids, capture_length=128, block_size=64)``.

Usage:  python benchmarks/bench_profile.py [--lengths 1024,2048] [--repeats 3] [--rounds 1] [--threads 0]
Wall time is what users see; CPU time (process_time) is reported too because it is far less
sensitive to other jobs on a shared machine (use --threads 1 there).
Writes benchmarks/results/profile_bench.json. Goal: capture ≤ 2× the plain forward's time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "plain_decoder", "capture")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(mode: str, n: int, repeats: int, threads: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from dam.profiler import capture, load_model

    model, tok = load_model("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (1, n), generator=g)
    dec = model.get_decoder()

    def run():
        with torch.no_grad():
            if mode == "plain":
                model(ids, use_cache=False)
            elif mode == "plain_decoder":
                dec(input_ids=ids, use_cache=False)
            else:
                capture(model, ids, capture_length=128, block_size=64)

    run()  # warm-up
    base = _rss_mib()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"mode": mode, "length": n, "seconds": times, "median_s": statistics.median(times),
            "tokens_per_s": n / statistics.median(times), "cpu_seconds": cpu,
            "median_cpu_s": statistics.median(cpu), "rss_after_load_mib": base,
            "peak_rss_mib": peak, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "profile_bench.json"))
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "N"))
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), a.repeats, a.threads)))
        return
    results: list[dict] = []
    for n in [int(x) for x in a.lengths.split(",")]:
        for _ in range(a.rounds):
            for mode in MODES:
                r = subprocess.run([sys.executable, __file__, "--worker", mode, str(n),
                                    "--repeats", str(a.repeats), "--threads", str(a.threads)],
                                   capture_output=True, text=True)
                if r.returncode:
                    sys.exit(r.stderr[-3000:])
                res = json.loads(r.stdout.strip().splitlines()[-1])
                results.append(res)
                print(f"N={n:5d} {mode:14s} {res['median_s']:7.3f} s  {res['tokens_per_s']:8.0f} tok/s"
                      f"  cpu {res['median_cpu_s']:7.3f} s  peak RSS {res['peak_rss_mib']:7.0f} MiB", flush=True)
    summary = {}
    for n in sorted({r["length"] for r in results}):
        med = {m: statistics.median(r["median_s"] for r in results if r["length"] == n and r["mode"] == m)
               for m in MODES}
        cpu = {m: statistics.median(r["median_cpu_s"] for r in results if r["length"] == n and r["mode"] == m)
               for m in MODES}
        peak = {m: max(r["peak_rss_mib"] for r in results if r["length"] == n and r["mode"] == m)
                for m in MODES}
        summary[str(n)] = {
            "capture_over_plain_time": med["capture"] / med["plain"],
            "capture_over_plain_decoder_time": med["capture"] / med["plain_decoder"],
            "capture_over_plain_cpu_time": cpu["capture"] / cpu["plain"],
            "capture_over_plain_decoder_cpu_time": cpu["capture"] / cpu["plain_decoder"],
            "capture_minus_plain_peak_rss_mib": peak["capture"] - peak["plain"],
            "tokens_per_s": {m: n / med[m] for m in MODES},
            "peak_rss_mib": peak,
        }
        print(f"N={n}: capture/plain time {summary[str(n)]['capture_over_plain_time']:.2f}x "
              f"(cpu {summary[str(n)]['capture_over_plain_cpu_time']:.2f}x), "
              f"capture/decoder {summary[str(n)]['capture_over_plain_decoder_time']:.2f}x, "
              f"peak RSS +{summary[str(n)]['capture_minus_plain_peak_rss_mib']:.0f} MiB")
    from dam.runtime.eval.record import write_result

    doc = {"benchmark": "bench_profile", "model": "smollm2-135m",
           "threads": a.threads or "torch default", "repeats": a.repeats, "rounds": a.rounds,
           "note": "measured while other jobs shared the machine unless stated otherwise",
           "summary": summary, "runs": results}
    write_result(a.out, doc, dtype="float32", device="cpu", cpus=os.cpu_count())
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
