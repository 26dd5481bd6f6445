"""``dam demo``: the whole pipeline on the embedded default (SmolLM2-135M + built-in data).

profile (small) -> compile (DAM and the seed paper's method) -> eval against dense and baselines
-> bench; one summary table at the end and the plots' paths. Steps whose outputs exist in --out
(for the same settings) are reused; --overwrite recomputes everything.
"""

from __future__ import annotations

import json
import os
import time

import click

from .common import one_line_errors, parse_length, parse_lengths


def _stamp_ok(path: str, settings: dict) -> bool:
    """True when ``path`` exists and ``path.settings.json`` records the same settings."""
    side = path + ".settings.json"
    if not os.path.exists(path) or not os.path.exists(side):
        return False
    with open(side, encoding="utf-8") as fh:
        return json.load(fh) == settings


def _stamp(path: str, settings: dict) -> None:
    with open(path + ".settings.json", "w", encoding="utf-8") as fh:
        json.dump(settings, fh, sort_keys=True)


@click.command("demo")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model (alias, local dir or HF id).")
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--profile-data", default="builtin:mix", show_default=True)
@click.option("--profile-length", default="1k", show_default=True)
@click.option("--profile-samples", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--recall", default=0.9, show_default=True, type=float, help="Compile recall target.")
@click.option("--last-query", default=0.15, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="DAM's run-time last-query budget (as `dam compile --last-query`).")
@click.option("--lengths", default="1k", show_default=True, help="Eval lengths.")
@click.option("--eval-data", default="builtin:stdlib", show_default=True,
              help="Held-out text (stream items from --eval-start on).")
@click.option("--eval-start", default=64, show_default=True, type=click.IntRange(min=0))
@click.option("--samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="Text samples and retrieval prompts per length.")
@click.option("--bench-lengths", default=None, help="Bench lengths (default: the eval lengths).")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1),
              help="Timed bench runs per mode (after one warm-up).")
@click.option("--backend", type=click.Choice(["auto", "triton", "cpu"]), default="auto", show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda when present, else cpu).")
@click.option("--overwrite", is_flag=True, help="Recompute every step even when its outputs exist.")
@one_line_errors
def demo(model, out, profile_data, profile_length, profile_samples, recall, last_query, lengths, eval_data, eval_start,
         samples, bench_lengths, repeats, backend, device, overwrite):
    """Profile, compile, evaluate and benchmark DAM end to end; print one summary table."""
    import torch

    from dam.compiler import CompileConfig, compile_profile, load_artifact, save_artifact
    from dam.profiler import ProfileConfig, calibration_samples, load_model
    from dam.profiler import profile as run_profile
    from dam.runtime.eval.bench import BenchConfig
    from dam.runtime.eval.bench import bench as run_bench
    from dam.runtime.eval.evaluate import EvalConfig, evaluate

    from ._pipeline import build_samples, tqdm_progress, write_report

    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lens = parse_lengths(lengths)
    blens = parse_lengths(bench_lengths) if bench_lengths else lens
    plen = parse_length(profile_length)
    timings: dict[str, float] = {}

    # 1. profile
    store = os.path.join(out, "profile.zarr")
    psettings = {"model": model, "data": profile_data, "length": plen, "samples": profile_samples}
    t0 = time.perf_counter()
    if overwrite or not _stamp_ok(store, psettings):
        click.echo(f"[1/4] profile {model} on {profile_data}: {profile_samples} x {plen} tokens -> {store}")
        progress, close = tqdm_progress("profile", "sample")
        try:
            run_profile(ProfileConfig(model=model, out=store, data=profile_data, length=plen,
                                      samples=profile_samples, device=device, overwrite=True), progress=progress)
        finally:
            close()
        _stamp(store, psettings)
    else:
        click.echo(f"[1/4] profile: reusing {store}")
    timings["profile"] = time.perf_counter() - t0

    # 2. compile (DAM and the seed paper's method, at the longest eval length)
    t0 = time.perf_counter()
    target = max(lens + blens)
    arts = {}
    for name, method in (("dam", "recall"), ("dam-paper", "dam-paper")):
        path = os.path.join(out, f"{name}.safetensors")
        lq = last_query if method == "recall" else 0.0
        csettings = {**psettings, "method": method, "recall": recall, "target_length": target, "last_query": lq}
        if overwrite or not _stamp_ok(path, csettings):
            click.echo(f"[2/4] compile {name} (target length {target}) -> {path}")
            res = compile_profile(store, CompileConfig(method=method, recall=recall, target_length=target,
                                                       last_query=lq))
            save_artifact(res.artifact, path)
            _stamp(path, csettings)
        else:
            click.echo(f"[2/4] compile: reusing {path}")
        arts[name] = load_artifact(path)
    timings["compile"] = time.perf_counter() - t0

    # 3. eval
    t0 = time.perf_counter()
    click.echo(f"[3/4] eval at {', '.join(map(str, lens))} tokens on held-out {eval_data}")
    mdl, tok = load_model(model, device=device)
    # kv-retrieval is left to `dam eval`: SmolLM2-135M fails it densely at these lengths, so in the
    # demo it would cost a third of the eval time and show nothing
    tasks = ("fidelity", "passkey", "recall")
    inputs = build_samples(tok, eval_data, lens, tasks, samples, start=eval_start)
    cfg = EvalConfig(methods=("dam", "streaming", "oracle", "minference", "dam-paper"), tasks=tasks,
                     backend=backend)
    progress, close = tqdm_progress("eval")
    try:
        report = evaluate(mdl, arts, inputs, cfg, progress=progress)
    finally:
        close()
    paths = write_report(report, out, {"model": model, "data": eval_data, "start": eval_start,
                                       "lengths": lens, "samples": samples}, prefix="eval")
    timings["eval"] = time.perf_counter() - t0

    # 4. bench (GPU bf16 when present)
    t0 = time.perf_counter()
    click.echo(f"[4/4] bench at {', '.join(map(str, blens))} tokens on {device}")
    if device.startswith("cuda"):
        mdl, tok = load_model(model, device=device, dtype="bfloat16")
    binputs = {n: calibration_samples(eval_data, tok, n, 1, start=eval_start) for n in blens}
    progress, close = tqdm_progress("bench")
    try:
        brep = run_bench(mdl, arts["dam"], binputs, BenchConfig(repeats=repeats, decode_tokens=4, backend=backend,
                                                                min_length=min(blens)), progress=progress)
    finally:
        close()
    bpath = os.path.join(out, "bench.json")
    with open(bpath, "w", encoding="utf-8") as fh:
        json.dump(brep.to_json(), fh, indent=1)
    timings["bench"] = time.perf_counter() - t0

    click.echo("")
    click.echo(report.format_table())
    click.echo("")
    click.echo(brep.format_table())
    click.echo("")
    click.echo(summary_table(report.rows(), brep.rows))
    total = time.perf_counter() - t_start
    click.echo("steps: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
    click.echo("plots: " + ", ".join(p for p in paths if p.endswith(".png")))
    click.echo(f"json: {paths[0]}, {bpath}")


def summary_table(rows: list[dict], bench_rows) -> str:
    """density, recall, top-1, ΔPPL per method at the longest length, and DAM's prefill speedup."""
    n = max(r["length"] for r in rows)
    speed = {b.length: b.prefill_speedup for b in bench_rows}
    lines = [f"summary at {n} tokens (held-out text; baselines at DAM's block density)",
             f"{'method':<11} {'density':>8} {'recall':>7} {'top-1':>7} {'ΔPPL':>8} {'passkey':>8} {'speedup':>8}"]
    for r in rows:
        if r["length"] != n:
            continue
        sp = f"{speed[n]:.2f}x" if r["method"] == "dam" and n in speed else ("1.00x" if r["method"] == "dense" else "-")
        top1 = f"{r['top1']:.4f}" if r.get("top1") is not None else "-"
        dppl = f"{r['dppl']:+.2%}" if r.get("dppl") is not None else "-"
        pk = f"{r['passkey_acc']:.2f}" if r.get("passkey_acc") is not None else "-"
        lines.append(f"{r['method']:<11} {r['density']:>8.4f} {r['recall']:>7.4f} {top1:>7} {dppl:>8} {pk:>8} {sp:>8}")
    return "\n".join(lines)
