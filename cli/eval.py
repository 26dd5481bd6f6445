"""``dam eval``: DAM and baseline sparse methods against dense attention, at equal block density."""

from __future__ import annotations

import click

from .common import one_line_errors, parse_lengths

_TASKS = ("fidelity", "passkey", "kv-retrieval", "recall")
_METHODS = ("dam", "streaming", "oracle", "minference", "dam-paper")


def _csv(choices):
    def convert(ctx, param, value):
        items = tuple(v.strip() for v in str(value).split(",") if v.strip())
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise click.BadParameter(f"{bad or value!r}: choose from {', '.join(choices)}")
        return items

    return convert


def _depths(value):
    if value is None:
        return None
    try:
        depths = tuple(float(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give fractions such as 0.1,0.5,0.9") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise click.BadParameter(f"{value!r}: depths are fractions in [0, 1]")
    return depths


def _methods(ctx, param, value):
    """Comma-separated method names (parsed once the --compare names are known)."""
    items = tuple(v.strip() for v in str(value).split(",") if v.strip())
    if not items:
        raise click.BadParameter("give at least one method")
    return items


def _compare(ctx, param, value):
    """``NAME=PATH`` pairs -> ``{NAME: PATH}``; a NAME may not shadow a built-in method."""
    from dam.runtime.eval.methods import REGISTRY

    named = {}
    for item in value:
        name, eq, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not eq or not name or not path or ":" in name or "," in name:
            raise click.BadParameter(f"{item!r}: give NAME=PATH, e.g. r95=/tmp/r95.dam.safetensors")
        if name in REGISTRY or name in ("dam", "dam-paper", "dense", "floor") or name in named:
            raise click.BadParameter(f"{item!r}: the name {name!r} is taken; choose another")
        named[name] = click.Path(exists=True, dir_okay=False).convert(path, param, ctx)
    return named


def _check_methods(methods, artifacts):
    from dam.runtime.errors import DamRuntimeError
    from dam.runtime.eval.methods import parse

    try:
        for v in methods:
            parse(v, artifacts)
    except DamRuntimeError as e:
        raise click.BadParameter(str(e), param_hint="'--methods'") from None


@click.command("eval")
@click.argument("model")
@click.option("--artifact", required=True, type=click.Path(exists=True, dir_okay=False),
              help="DAM's compiled artifact (.safetensors).")
@click.option("--data", default="builtin:stdlib", show_default=True,
              help="Text sources of the fidelity/recall inputs (a --data spec as in dam profile); with "
                   "several, fidelity is also reported per source.")
@click.option("--start", default=64, show_default=True, type=click.IntRange(min=0),
              help="First item of each source's stream used (skip what a profile of up to this many "
                   "windows per source saw).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the data stream.")
@click.option("--lengths", default="2k", show_default=True, help="Comma-separated lengths, e.g. 2k,4k,8k.")
@click.option("--tasks", default=",".join(_TASKS), show_default=True, callback=_csv(_TASKS))
@click.option("--methods", default=",".join(_METHODS), show_default=True, callback=_methods,
              help="Comma-separated: dam, streaming, oracle, minference, element, dam-paper (needs --profile); "
                   "parameters after colons, e.g. dam:last_query=0.1, minference:last_q=128.")
@click.option("--samples", default=1, show_default=True, type=click.IntRange(min=1),
              help="Text samples per --data source (and prompts per retrieval task) per length.")
@click.option("--passkey-depths", default=None, callback=lambda ctx, p, v: _depths(v),
              help="Pass-key depths, e.g. 0.1,0.5,0.9: --samples prompts at each (default: one random depth "
                   "per prompt).")
@click.option("--compare", multiple=True, metavar="NAME=PATH", callback=_compare,
              help="Another artifact to evaluate beside --artifact, as method NAME (repeatable; each is "
                   "run as compiled, after the methods given).")
@click.option("--profile", "profile_store", default=None, type=click.Path(exists=True),
              help="Profile store to compile the dam-paper baseline from.")
@click.option("--backend", type=click.Choice(["auto", "triton", "cpu"]), default="auto", show_default=True)
@click.option("--last-query", default=None, type=click.FloatRange(0.0, 1.0),
              help="DAM's last-query estimate budget per non-dense head, a fraction of causal blocks "
                   "(default: the artifact's; 0: off).")
@click.option("--recall-stride", default=1, show_default=True, type=click.IntRange(min=1),
              help="Measure recall on every N-th query block only (a systematic sample, N times cheaper).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="Model dtype (dense and DAM alike); auto: bf16 on a GPU or a CPU with "
                                      "native bf16 (AMX/AVX512-BF16), else float32.")
@click.option("--floor", is_flag=True,
              help="Also run each text window densely in float32: row 'floor' is the dtype's own noise "
                   "floor (dense in --dtype against dense float32), the best top-1 any method can show.")
@click.option("--out", default="out/eval", show_default=True, type=click.Path(file_okay=False),
              help="Directory for eval.json and the PNG plots.")
@one_line_errors
def eval_cmd(model, artifact, data, start, seed, lengths, tasks, methods, samples, passkey_depths, compare,
             profile_store, backend, last_query, recall_stride, device, dtype, floor, out):
    """Evaluate MODEL with DAM's ARTIFACT and baselines against dense attention."""
    from dam.compiler import load_artifact
    from dam.profiler import load_model
    from dam.runtime.eval.bench import default_dtype
    from dam.runtime.eval.evaluate import EvalConfig, evaluate

    from ._pipeline import build_samples, paper_artifact, tqdm_progress, write_report

    lens = parse_lengths(lengths)
    _check_methods(methods, {"dam-paper": None, **compare})
    art = load_artifact(artifact)
    arts = {"dam": art, **{name: load_artifact(path) for name, path in compare.items()}}
    skipped = {}
    methods = tuple(methods) + tuple(n for n in compare if not any(m.split(":")[0] == n for m in methods))
    if "dam-paper" in methods:
        if profile_store is None:
            skipped["dam-paper"] = "needs --profile STORE (the profile to compile it from)"
            methods = tuple(m for m in methods if m != "dam-paper")
        else:
            arts["dam-paper"] = paper_artifact(profile_store, max(lens))
    if "dam" not in methods:
        methods = ("dam", *methods)
    cfg = EvalConfig(methods=methods, tasks=tasks, backend=backend, last_query=last_query,
                     recall_stride=recall_stride)
    if dtype == "auto":
        dtype = default_dtype(device)
        click.echo(f"dtype {dtype} (auto for {device}; --dtype float32 to change)")
    mdl, tok = load_model(model, device=device, dtype=dtype)
    inputs = build_samples(tok, data, lens, tasks, samples, seed=seed, start=start, passkey_depths=passkey_depths)
    ref = None
    if floor and dtype == "float32":
        click.echo("--floor: the model already runs in float32; no floor to measure")
    elif floor:
        ref, _ = load_model(model, device=device, dtype="float32")
    progress, close = tqdm_progress("eval")
    try:
        report = evaluate(mdl, arts, inputs, cfg, progress=progress, floor_model=ref)
    finally:
        close()
    report.skipped.update(skipped)
    meta = {"model": model, "artifact": artifact, "data": data, "start": start, "seed": seed,
            "lengths": lens, "samples": samples, "profile": profile_store,
            "compare": compare or None, "backend": backend, "device": device,
            "dtype": dtype, "recall_stride": recall_stride, "passkey_depths": passkey_depths}
    paths = write_report(report, out, meta)
    click.echo(report.format_table())
    for row in report.rows():
        if "passkey_by_depth" in row:
            click.echo(f"passkey by depth, {row['length']} tokens, {row['method']}: "
                       + ", ".join(f"{d}: {a:.2f}" for d, a in row["passkey_by_depth"].items()))
        if "by_domain" in row:
            click.echo(f"fidelity by domain, {row['length']} tokens, {row['method']}: " + "; ".join(
                f"{d} top-1 {f['top1']:.4f} KL {f['kl']:.5f} ΔPPL {f['dppl']:+.2%}" for d, f in row["by_domain"].items()))
    click.echo("wrote " + ", ".join(paths))
