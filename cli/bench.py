"""``dam bench``: end-to-end prefill and decode time, DAM vs dense, plus attention-only time."""

from __future__ import annotations

import click

from .common import one_line_errors, parse_lengths


@click.command("bench")
@click.argument("model")
@click.option("--artifact", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Compiled mask artifact (.safetensors).")
@click.option("--lengths", default="2k", show_default=True, help="Comma-separated prompt lengths.")
@click.option("--data", default="builtin:stdlib", show_default=True, help="Source of the prompt tokens.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0))
@click.option("--decode-tokens", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--backend", type=click.Choice(["auto", "triton", "cpu"]), default="auto", show_default=True)
@click.option("--min-length", default=None, type=click.IntRange(min=1),
              help="Calls attending fewer keys use dense SDPA, as in serving (default: the runtime's "
                   "MIN_LENGTH).")
@click.option("--decode", type=click.Choice(["auto", "sparse", "dense"]), default="auto", show_default=True,
              help="DAM's decode steps: block-sparse, dense SDPA, or auto (where measured faster: on the CPU sparse only for layers without dynamic heads at caches of 24K+; sparse on a GPU).")
@click.option("--last-query", default=None, type=click.FloatRange(0.0, 1.0),
              help="DAM's last-query estimate budget per non-dense head, a fraction of causal blocks "
                   "(default: the artifact's; 0: off).")
@click.option("--device", default=None, help="torch device (default: cuda when present, else cpu).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="Model dtype; auto: bf16 on a GPU or a CPU with native bf16 "
                                      "(AMX/AVX512-BF16), else float32.")
@click.option("--prefill-only", is_flag=True,
              help="Time prefill and decode only (no attention share, peak memory or attention-only timing).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the JSON here.")
@one_line_errors
def bench(model, artifact, lengths, data, repeats, warmup, decode_tokens, backend, min_length, decode, last_query,
          device, dtype, prefill_only, out):
    """Time MODEL with DAM's ARTIFACT against dense attention (bf16 where the device runs it natively)."""
    import sys

    import torch

    from dam.compiler import load_artifact
    from dam.profiler import calibration_samples, load_model
    from dam.runtime.eval.bench import BenchConfig, default_dtype
    from dam.runtime.eval.bench import bench as run
    from dam.runtime.eval.record import write_result

    from ._pipeline import tqdm_progress

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = default_dtype(device)
        click.echo(f"dtype {dtype} (auto for {device}; --dtype float32 to change)")
    extra = {} if min_length is None else {"min_length": min_length}
    cfg = BenchConfig(repeats=repeats, warmup=warmup, decode_tokens=decode_tokens, backend=backend,
                      decode=decode, last_query=last_query, prefill_only=prefill_only, **extra)
    art = load_artifact(artifact)
    mdl, tok = load_model(model, device=device, dtype=dtype)
    inputs = {n: calibration_samples(data, tok, n, 1, start=64) for n in parse_lengths(lengths)}
    progress, close = tqdm_progress("bench")
    try:
        report = run(mdl, art, inputs, cfg, progress=progress)
    finally:
        close()
    click.echo(report.format_table())
    if out:
        write_result(out, report.to_json(), command="dam " + " ".join(sys.argv[1:]), dtype=dtype, device=device,
                     model=model, artifact=artifact, data=data)
        click.echo(f"wrote {out}")
