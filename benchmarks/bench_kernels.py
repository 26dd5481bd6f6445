"""CPU speed benchmark of dam.kernels: ours vs dense causal SDPA vs FlexAttention on the same mask.

Usage::

    python benchmarks/bench_kernels.py            # the CPU figures
    python benchmarks/bench_kernels.py --quick    # smaller sizes (smoke run)

GPUs are measured by ``benchmarks/gpu_check.sh``. CPU: bf16 then fp32 (``--dtypes``), 2 threads; "ours" is what ``block_sparse_attention`` runs
once its compiled kernel is built (``dam.kernels.cpu_flex``), "ours_aten" the ATen path beside
it; SmolLM2's shape (Hq/Hkv 9/3, D 64, 64-blocks) at N 4K-32K and densities 5-100 %, Llama-3-8B's (32/8, D 128, 128-blocks) at 8K across densities,
128-blocks at SmolLM2's shape (:func:`cpu_cases`; ``--full``: the whole grid); decode at a 32K
cache for both shapes; against causal SDPA and ``torch.compile``-d FlexAttention with a
``BlockMask`` built directly from the layout (``BlockMask.from_kv_blocks``: the diagonal blocks as partial blocks with a
causal ``mask_mod``, the others as full blocks). Timings are medians over interleaved rounds.
The layouts are :mod:`dam.kernels.synthetic`'s: a sink block, a local window (the diagonal block and
the one before) and random far blocks per query block up to the target fraction of the causal blocks.

Writes ``benchmarks/results/kernels_cpu_<dtype>.json`` and ``.png`` (with the device name).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from dam.kernels import (
    BlockLayout,
    block_sparse_attention,
    block_sparse_decode,
    cpu_flex,
    cpu_native,
)
from dam.kernels.cpu import attention_cpu
from dam.kernels.synthetic import element_density, flex_block_mask, gqa_mask, realistic_mask
from dam.runtime.eval.record import write_result

log = logging.getLogger("bench_kernels")
RESULTS = Path(__file__).resolve().parent / "results"


# --- timing --------------------------------------------------------------------------------
def _time_cpu(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Median wall seconds and median process-CPU seconds per function over interleaved rounds.

    On a shared machine the CPU time (all of this process's threads) is the steadier figure of
    the work done; the wall time is what a user waits."""
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            c, t = time.process_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    med = statistics.median
    return {k: med(v) for k, v in wall.items()}, {k: med(v) for k, v in cpu.items()}


def _first_call(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


#: (N, density, Hq, Hkv, D, block) of the default CPU run: SmolLM2's shape (9/3, D 64, block 64)
#: across lengths and densities, Llama-3-8B's (32/8, D 128, block 128) across densities, and
#: block 128 at SmolLM2's shape. ``--full`` runs the whole grid of issue 11 (hours on 2 cores).
def cpu_cases(quick: bool, full: bool) -> list[tuple[int, float, int, int, int, int]]:
    sweep = (0.05, 0.10, 0.25, 0.50, 1.00)
    if quick:
        return [(2048, dd, 9, 3, 64, 64) for dd in (0.10, 0.50)] + [(2048, 0.10, 8, 2, 128, 128)]
    if full:
        return [(n, dd, hq, hkv, d, blk) for n in (4096, 8192, 16384, 32768) for hq, hkv in ((9, 3), (32, 8))
                for d in (64, 128) for blk in (64, 128) for dd in sweep]
    return ([(8192, dd, 9, 3, 64, 64) for dd in sweep]
            + [(n, dd, 9, 3, 64, 64) for n in (4096, 16384) for dd in (0.10, 0.25)]
            + [(32768, 0.10, 9, 3, 64, 64)]
            + [(8192, dd, 32, 8, 128, 128) for dd in sweep]
            + [(8192, dd, 9, 3, 64, 128) for dd in (0.10, 0.25)])


def cpu_benchmark(quick: bool, threads: int, dtype: torch.dtype = torch.bfloat16, full: bool = False) -> dict:
    torch.set_num_threads(threads)
    from torch.nn.attention.flex_attention import flex_attention

    gen = torch.Generator().manual_seed(0)
    # one static compile per shape and dtype: more than dynamo's default recompile limit (8) over
    # the grid, past which it would fall back to the unfused (score-materialising) flex
    torch._dynamo.config.recompile_limit = 256
    flex = torch.compile(flex_attention, dynamic=False)
    rounds = 3 if quick else 5
    rows, sdpa_cache, flex_compiled_for = [], {}, set()
    for n, dens, hq, hkv, d, block in cpu_cases(quick, full):
        q = torch.randn(1, hq, n, d, generator=gen).to(dtype)
        k = torch.randn(1, hkv, n, d, generator=gen).to(dtype)
        v = torch.randn(1, hkv, n, d, generator=gen).to(dtype)
        if hq == hkv:
            mask = realistic_mask(hq, n // block, dens, gen)  # one layout row per query head
        else:  # heads sharing most blocks per KV head, as a real artifact's do
            mask = gqa_mask(hq, hkv, n // block, dens, gen)
        layout = BlockLayout.from_block_mask(mask, block, block)
        bmask = flex_block_mask(mask, block, q.device)
        aten_out = torch.empty_like(q)
        fns = {
            "ours": partial(block_sparse_attention, q, k, v, layout, backend="cpu"),
            "aten": partial(attention_cpu, q, k, v, layout, causal=True, scale=d ** -0.5, out=aten_out, lse=None),
            "flex": partial(flex, q, k, v, block_mask=bmask, enable_gqa=hq != hkv),
        }
        first = {"ours": _first_call(fns["ours"])}  # starts the compiled kernel's build (background)
        cpu_flex.wait_for_builds()
        shape = (n, hq, hkv, d, block)
        if shape not in flex_compiled_for:
            first["flex"] = _first_call(fns["flex"])  # includes the compile for this shape
            flex_compiled_for.add(shape)
        else:
            first["flex"] = None
            fns["flex"]()
        if shape[:4] not in sdpa_cache:
            fns["sdpa"] = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True,
                                  enable_gqa=hq != hkv)
            fns["sdpa"]()
        med, cpu = _time_cpu(fns, rounds)
        if "sdpa" in med:
            sdpa_cache[shape[:4]] = (med["sdpa"], cpu["sdpa"])
        med["sdpa"], cpu["sdpa"] = sdpa_cache[shape[:4]]
        err = (fns["ours"]().float() - fns["flex"]().float()).abs().max().item()
        ed = element_density(mask, block)
        row = {
            "N": n, "density_target": dens, "density": round(ed, 4), "Hq": hq, "Hkv": hkv, "D": d,
            "block": block,
            "sdpa_s": med["sdpa"], "ours_s": med["ours"], "flex_s": med["flex"], "ours_aten_s": med["aten"],
            "ours_kernel": ("dam native" if dtype == torch.bfloat16 and cpu_native.state() == "ready"
                            else "compiled flex" if cpu_flex.ready_for(q, k, layout) else "aten"),
            "ours_aten_over_sdpa_per_density": med["aten"] / med["sdpa"] / ed,
            "ours_first_call_s": first["ours"], "flex_first_call_s": first["flex"],
            "ours_over_sdpa": med["ours"] / med["sdpa"],
            "ours_over_sdpa_per_density": med["ours"] / med["sdpa"] / ed,
            "flex_over_sdpa_per_density": med["flex"] / med["sdpa"] / ed,
            "speedup_vs_flex": med["flex"] / med["ours"],
            "cpu_time_s": cpu,
            "cpu_time_ours_over_sdpa_per_density": cpu["ours"] / cpu["sdpa"] / ed,
            "cpu_time_flex_over_sdpa_per_density": cpu["flex"] / cpu["sdpa"] / ed,
            "max_abs_diff_vs_flex": err,
        }
        rows.append(row)
        log.info(
            "CPU N=%5d Hq/Hkv=%d/%d D=%d block=%d density=%.3f  sdpa %.4fs  ours %.4fs (%.2fx dens; ATen path"
            " %.4fs, %.2fx)  flex %.4fs (%.2fx dens)  ours/flex %.2fx  first call: ours %.2fs flex %s  |diff| %.1e",
            n, hq, hkv, d, block, ed, med["sdpa"], med["ours"], row["ours_over_sdpa_per_density"], med["aten"],
            row["ours_aten_over_sdpa_per_density"], med["flex"],
            row["flex_over_sdpa_per_density"], row["speedup_vs_flex"], first["ours"],
            "n/a" if first["flex"] is None else f"{first['flex']:.1f}s", err,
        )
    decode = _cpu_decode(quick, dtype, gen)
    return {"prefill": rows, "decode": decode, "config": {
        "dtype": str(dtype).replace("torch.", ""), "B": 1, "threads": threads, "rounds": rounds,
        "cpu_flex_mode": cpu_flex.mode(), "cpu_flex_ready": cpu_flex.ready_signatures(),
        "cpu_native": cpu_native.state(),
        "grid": "full" if full else ("quick" if quick else "default"), "statistic": "median"}}


def _cpu_decode(quick: bool, dtype: torch.dtype, gen: torch.Generator) -> list[dict]:
    """Decode steps against one cache: DAM's block-sparse decode vs dense SDPA."""
    decode = []
    # caches not a multiple of the block (+37: what a growing HF cache looks like)
    dec_cases = [(4096 + 37, 9, 3, 64, 64, 0.10)] if quick else [
        (32768 + 37, hq, hkv, d, blk, dd) for hq, hkv, d, blk in ((9, 3, 64, 64), (32, 8, 128, 128))
        for dd in (0.05, 0.10, 0.25)]
    for s, hq, hkv, d, block, dd in dec_cases:
        qd = torch.randn(1, hq, 1, d, generator=gen).to(dtype)
        kc = torch.randn(1, hkv, s, d, generator=gen).to(dtype)
        vc = torch.randn(1, hkv, s, d, generator=gen).to(dtype)
        nkb = -(-s // block)
        m = realistic_mask(hq, nkb, dd, gen)[:, :, -1:, :]  # the last query block's row
        lay = BlockLayout.from_block_mask(m, block, block)
        lens = torch.tensor([s])
        fns = {
            "ours": partial(block_sparse_decode, qd, kc, vc, lay, cache_seqlens=lens, backend="cpu"),
            "dense": partial(F.scaled_dot_product_attention, qd, kc, vc, enable_gqa=hq != hkv),
        }
        for f in fns.values():
            f()
        med, cpu = _time_cpu(fns, 20)
        kept = float(lay.kv_counts.sum()) / (hq * nkb)
        decode.append({"cache": s, "Hq": hq, "Hkv": hkv, "D": d, "block": block, "density": round(kept, 4),
                       "dense_s": med["dense"], "ours_s": med["ours"], "speedup": med["dense"] / med["ours"],
                       "cpu_time_s": cpu, "cpu_time_speedup": cpu["dense"] / cpu["ours"]})
        log.info("CPU decode cache=%d Hq/Hkv=%d/%d D=%d density=%.3f: dense %.5fs ours %.5fs (%.2fx)",
                 s, hq, hkv, d, kept, med["dense"], med["ours"], med["dense"] / med["ours"])
    return decode


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["prefill"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    shape = lambda r: (r.get("Hq"), r.get("Hkv"), r.get("D"), r.get("block"))  # noqa: E731
    rows = [r for r in rows if shape(r) == shape(rows[0])]  # the first (main) attention shape
    at10 = sorted((r for r in rows if r["density_target"] == 0.10), key=lambda r: r["N"])
    ns = [r["N"] for r in at10]
    for key, label in (("sdpa_s", "dense causal SDPA"), ("flex_s", "FlexAttention (compiled)"),
                       ("ours_s", "dam block_sparse_attention")):
        ax1.plot(ns, [r[key] * 1e3 for r in at10], marker="o", label=label)
    ax1.set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel="ms",
            title="prefill at 10 % of causal blocks" + _shape_label(rows[0]))
    ax1.set_xticks(ns, [f"{n // 1024}K" for n in ns])
    ax1.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.legend()
    n_sweep = max({r["N"] for r in rows}, key=lambda n: sum(r["N"] == n for r in rows))
    sw = sorted((r for r in rows if r["N"] == n_sweep), key=lambda r: r["density"])
    ds = [r["density"] for r in sw]
    ax2.plot(ds, [r["ours_s"] / r["sdpa_s"] for r in sw], marker="o", label="ours / SDPA")
    ax2.plot(ds, [r["flex_s"] / r["sdpa_s"] for r in sw], marker="s", label="Flex / SDPA")
    ax2.plot(ds, ds, "k--", lw=1, label="1.0 x density (floor)")
    ax2.plot(ds, [1.5 * x for x in ds], "k:", lw=1, label="1.5 x density (goal)")
    ax2.set(xlabel="kept fraction of causal attention", ylabel="time / dense causal SDPA",
            title=f"density sweep at N={n_sweep // 1024}K" + _shape_label(rows[0]))
    ax2.legend()
    meta = result.get("meta", result)  # write_result keeps them in the record's meta
    fig.suptitle(f"{meta.get('figure_kind', 'CPU figure')} - {meta.get('device', 'cpu')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shape_label(r: dict) -> str:
    return f" (Hq/Hkv {r['Hq']}/{r['Hkv']}, D {r['D']})" if "Hq" in r and "D" in r else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--cpu", action="store_true", help="accepted for old command lines (this benchmark is the "
                    "CPU one; benchmarks/gpu_check.sh measures GPUs)")
    ap.add_argument("--full", action="store_true", help="CPU: the whole grid (4 lengths x 2 head shapes x "
                    "2 head dims x 2 blocks x 5 densities; hours on 2 cores)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU benchmark)")
    ap.add_argument("--dtypes", default="bfloat16,float32",
                    help="CPU benchmark dtypes, comma-separated (one JSON each)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--replot", type=Path, default=None, help="only redraw the plot of a JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    for name in args.dtypes.split(","):
        load_before = os.getloadavg()
        res = cpu_benchmark(args.quick, args.threads, getattr(torch, name.strip()), args.full)
        # other processes on a shared machine: worker threads suffer most from oversubscription
        res["loadavg_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
        res["env"] = {v: os.environ.get(v) for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
        kind = f"CPU figure (no GPU used, {args.threads} thread{'s' if args.threads > 1 else ''})"
        stem = f"kernels_cpu_{name.strip()}" + ("" if args.threads == 2 else f"_{args.threads}thread") \
            + ("_full" if args.full else "")
        _write(res, args, kind, stem)


def _write(res: dict, args, kind: str, stem: str) -> None:
    if args.quick:
        stem += "_quick"
    write_result(args.out / f"{stem}.json", res, dtype=res.get("dtype"), device="cpu", figure_kind=kind)
    plot(res, args.out / f"{stem}.png")
    log.info("%s -> %s.{json,png}", kind, args.out / stem)


if __name__ == "__main__":
    main()
