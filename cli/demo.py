"""``dam demo``: DAM against dense attention and the baselines, fidelity and speed side by side.

By default it takes the model's shipped artifact (``artifacts/``, built by the commands in
``artifacts/README.md``) and runs it where it is meant to run: at the served length (8K for
SmolLM2), in the dtype a user runs (bf16 on a CPU with native bf16, on a GPU), on held-out text.
``--build`` runs the whole pipeline instead: profile -> compile (DAM and the seed paper's method)
-> eval -> bench. Steps whose outputs exist in --out (for the same settings) are reused;
--overwrite recomputes everything. Writes ``OUT/summary.json``, ``eval.json``, ``bench.json`` and
the plots.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from dam.compiler.ir import DEFAULT_LAST_QUERY, DEFAULT_RECALL

from .common import one_line_errors, parse_length, parse_lengths

#: model alias -> file name of its shipped artifact in the repository's ``artifacts/``
SHIPPED = {"smollm2-135m": "smollm2-135m.dam.safetensors", "gemma3-270m": "gemma3-270m.dam.safetensors"}


def shipped_artifact(model: str) -> str | None:
    """The shipped artifact for a model alias, when this checkout has one."""
    name = SHIPPED.get(model)
    if name is None:
        return None
    path = Path(__file__).resolve().parents[1] / "artifacts" / name
    return str(path) if path.is_file() else None


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
@click.option("--artifact", default=None, type=click.Path(dir_okay=False, exists=True),
              help="DAM artifact to demonstrate (default: the model's shipped artifact; --build without one).")
@click.option("--build", is_flag=True,
              help="Profile and compile an artifact (and the seed paper's) here instead of using a shipped one.")
@click.option("--profile-data", default="builtin:mix", show_default=True, help="With --build: calibration data.")
@click.option("--profile-length", default=None,
              help="With --build: calibration length (default: the longest eval length).")
@click.option("--profile-samples", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--recall", default=DEFAULT_RECALL, show_default=True, type=float, help="With --build: compile recall target.")
@click.option("--last-query", default=DEFAULT_LAST_QUERY, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="With --build: DAM's run-time last-query budget (as `dam compile --last-query`).")
@click.option("--lengths", default="8k", show_default=True, help="Eval lengths.")
@click.option("--eval-data", default="builtin:stdlib", show_default=True,
              help="Held-out text (stream items from --eval-start on).")
@click.option("--eval-start", default=64, show_default=True, type=click.IntRange(min=0))
@click.option("--samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="Text samples (and retrieval prompts) per length.")
@click.option("--recall-stride", default=4, show_default=True, type=click.IntRange(min=1),
              help="Measure recall on every N-th query block (1: all of them; the exact mass costs about "
                   "one dense attention per layer and method).")
@click.option("--passkey", is_flag=True,
              help="Also run pass-key prompts (SmolLM2-135M finds none beyond 2K even dense).")
@click.option("--bench-lengths", default=None, help="Bench lengths (default: the eval lengths).")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1),
              help="Timed bench runs per mode (the eval's runs are the warm-up).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="Model dtype for eval and bench; auto: bf16 on a GPU or a CPU with "
                                      "native bf16 (AMX/AVX512-BF16), else float32.")
@click.option("--backend", type=click.Choice(["auto", "triton", "cpu"]), default="auto", show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda when present, else cpu).")
@click.option("--overwrite", is_flag=True, help="Recompute every step even when its outputs exist.")
@one_line_errors
def demo(model, out, artifact, build, profile_data, profile_length, profile_samples, recall, last_query, lengths,
         eval_data, eval_start, samples, recall_stride, passkey, bench_lengths, repeats, dtype, backend, device, overwrite):
    """DAM vs dense and the baselines on held-out text: fidelity, then prefill speed; one summary table."""
    import torch

    from dam.profiler import load_model
    from dam.runtime.eval.bench import default_dtype

    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = default_dtype(device)
    lens = parse_lengths(lengths)
    blens = parse_lengths(bench_lengths) if bench_lengths else lens
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if artifact is None and not build:
        artifact = shipped_artifact(model)
        if artifact is None:
            click.echo(f"no shipped artifact for {model}: building one (--build)")
            build = True
    if build:
        if artifact is not None:
            raise click.UsageError("give --artifact or --build, not both")
        plen = parse_length(profile_length) if profile_length else max(lens)
        arts = _build(model, out, device, profile_data, plen, profile_samples, recall, last_query,
                      max(lens + blens), overwrite)
    else:
        from dam.compiler import load_artifact

        click.echo(f"[1/3] artifact {artifact} (--build to profile and compile your own)")
        arts = {"dam": load_artifact(artifact)}
    timings["artifact"] = time.perf_counter() - t0

    step = 3 if build else 2
    total = 4 if build else 3
    t0 = time.perf_counter()
    click.echo(f"[{step}/{total}] eval at {', '.join(map(str, lens))} tokens, {dtype}, on held-out {eval_data}")
    mdl, tok = load_model(model, device=device, dtype=dtype)
    tasks = ("fidelity", "recall", *(("passkey",) if passkey else ()))
    report, paths = _eval(mdl, tok, arts, out, model, eval_data, eval_start, lens, samples, tasks, backend,
                          device, dtype, recall_stride)
    timings["eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    click.echo(f"[{total}/{total}] bench prefill and decode at {', '.join(map(str, blens))} tokens, {dtype}, "
               f"on {device}")
    brep = _bench(mdl, tok, arts["dam"], out, eval_data, eval_start, blens, repeats, backend,
                  warmup=0 if set(blens) <= set(lens) else 1)
    timings["bench"] = time.perf_counter() - t0

    from dam.runtime.eval.record import write_result

    rows = report.rows()
    summary = summary_json(rows, brep.rows, dtype)
    spath = os.path.join(out, "summary.json")
    timings["total"] = time.perf_counter() - t_start
    write_result(spath, {"model": model, "artifact": artifact or os.path.join(out, "dam.safetensors"), **summary,
                         "steps_s": {k: round(v, 1) for k, v in timings.items()}},
                 command="dam demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else None,
                 dtype=dtype, device=device)
    click.echo("")
    click.echo(report.format_table())
    click.echo("")
    click.echo(brep.format_table())
    click.echo("")
    click.echo(summary_table(rows, brep.rows))
    if recall_stride > 1:
        click.echo(f"(recall measured on every {recall_stride}th query block; --recall-stride 1 for all)")
    click.echo("steps: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    click.echo("plots: " + ", ".join(p for p in paths if p.endswith(".png")))
    click.echo(f"json: {spath}, {paths[0]}, {os.path.join(out, 'bench.json')}")


def _build(model, out, device, data, plen, samples, recall, last_query, target, overwrite) -> dict:
    """Profile (reused when its settings match) and compile DAM and the seed paper's method."""
    from dam.compiler import CompileConfig, compile_profile, load_artifact, save_artifact
    from dam.profiler import ProfileConfig
    from dam.profiler import profile as run_profile

    from ._pipeline import tqdm_progress

    store = os.path.join(out, "profile.zarr")
    psettings = {"model": model, "data": data, "length": plen, "samples": samples}
    if overwrite or not _stamp_ok(store, psettings):
        click.echo(f"[1/4] profile {model} on {data}: {samples} x {plen} tokens -> {store}")
        progress, close = tqdm_progress("profile", "sample")
        try:
            run_profile(ProfileConfig(model=model, out=store, data=data, length=plen, samples=samples,
                                      device=device, overwrite=True), progress=progress)
        finally:
            close()
        _stamp(store, psettings)
    else:
        click.echo(f"[1/4] profile: reusing {store}")
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
    return arts


def _eval(mdl, tok, arts, out, model, data, start, lens, samples, tasks, backend, device, dtype, recall_stride):
    """Every method on the same held-out inputs; writes eval.json and the plots."""
    from dam.runtime.eval.evaluate import EvalConfig, evaluate

    from ._pipeline import build_samples, tqdm_progress, write_report

    inputs = build_samples(tok, data, lens, tasks, samples, start=start)
    methods = ("dam", "streaming", "minference", *(("oracle", "dam-paper") if "dam-paper" in arts else ()))
    progress, close = tqdm_progress("eval")
    try:
        report = evaluate(mdl, arts, inputs, EvalConfig(methods=methods, tasks=tasks, backend=backend,
                                                        recall_stride=recall_stride), progress=progress)
    finally:
        close()
    paths = write_report(report, out, {"model": model, "data": data, "start": start, "lengths": lens,
                                       "samples": samples, "device": device, "dtype": dtype,
                                       "recall_stride": recall_stride}, prefix="eval")
    return report, paths


def _bench(mdl, tok, artifact, out, data, start, blens, repeats, backend, warmup):
    """Dense vs DAM prefill/decode, side by side in this run; writes bench.json."""
    from dam.profiler import calibration_samples
    from dam.runtime.eval.bench import BenchConfig
    from dam.runtime.eval.bench import bench as run_bench

    from ._pipeline import tqdm_progress

    binputs = {n: calibration_samples(data, tok, n, 1, start=start) for n in blens}
    progress, close = tqdm_progress("bench")
    try:
        # warmup 0 when the eval's dense and DAM forwards at these lengths came first in this process
        cfg = BenchConfig(repeats=repeats, warmup=warmup, decode_tokens=4, backend=backend, min_length=min(blens),
                          prefill_only=True)
        brep = run_bench(mdl, artifact, binputs, cfg, progress=progress)
    finally:
        close()
    with open(os.path.join(out, "bench.json"), "w", encoding="utf-8") as fh:
        json.dump(brep.to_json(), fh, indent=1)
    return brep


def _longest(rows: list[dict], bench_rows) -> tuple[int, list[dict], dict[int, float]]:
    """The longest eval length, its rows, and the bench's prefill speed-up per length."""
    n = max(r["length"] for r in rows)
    return n, [r for r in rows if r["length"] == n], {b.length: b.prefill_speedup for b in bench_rows}


def summary_json(rows: list[dict], bench_rows, dtype: str) -> dict:
    """``{"length", "dtype", "methods": {NAME: {density, recall, top1, kl, dppl, prefill_speedup}}}`` at the
    longest eval length; prefill_speedup is measured for dense (1.0) and DAM, null for the baselines."""
    n, at_n, speed = _longest(rows, bench_rows)
    methods = {}
    for r in at_n:
        sp = 1.0 if r["method"] == "dense" else (speed.get(n) if r["method"] == "dam" else None)
        methods[r["method"]] = {k: r.get(k) for k in ("density", "recall", "top1", "kl", "dppl")}
        methods[r["method"]]["prefill_speedup"] = sp
    return {"length": n, "dtype": dtype, "methods": methods}


def summary_table(rows: list[dict], bench_rows) -> str:
    """density, recall, top-1, KL, ΔPPL per method at the longest length, and DAM's prefill speedup."""
    n, at_n, speed = _longest(rows, bench_rows)
    lines = [f"summary at {n} tokens (held-out text; baselines at DAM's block density)",
             f"{'method':<11} {'density':>8} {'recall':>7} {'top-1':>7} {'KL':>8} {'ΔPPL':>8} {'passkey':>8} "
             f"{'prefill':>8}"]
    for r in at_n:
        sp = f"{speed[n]:.2f}x" if r["method"] == "dam" and n in speed else ("1.00x" if r["method"] == "dense" else "-")
        top1 = f"{r['top1']:.4f}" if r.get("top1") is not None else "-"
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "-"
        dppl = f"{r['dppl']:+.2%}" if r.get("dppl") is not None else "-"
        pk = f"{r['passkey_acc']:.2f}" if r.get("passkey_acc") is not None else "-"
        lines.append(f"{r['method']:<11} {r['density']:>8.4f} {r['recall']:>7.4f} {top1:>7} {kl:>8} {dppl:>8} "
                     f"{pk:>8} {sp:>8}")
    return "\n".join(lines)
