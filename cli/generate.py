"""``dam generate``: stream greedy text from a model with a DAM artifact applied."""

from __future__ import annotations

import click

from .common import one_line_errors


@click.command("generate")
@click.argument("model")
@click.option("--artifact", "artifact", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Compiled mask artifact (.safetensors).")
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Read the prompt from this file.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--compare-dense", is_flag=True, help="Also run dense attention; print timings side by side.")
@click.option("--backend", type=click.Choice(["auto", "triton", "cpu"]), default="auto", show_default=True)
@click.option("--min-length", default=None, type=click.IntRange(min=1),
              help="Calls attending fewer keys use dense SDPA (default: the runtime's MIN_LENGTH).")
@click.option("--device", default="cpu", show_default=True)
@one_line_errors
def generate(model, artifact, prompt, prompt_file, max_new_tokens, compare_dense, backend, min_length,
             device):
    """Generate text from MODEL (HF id, local dir, or alias like smollm2-135m) with DAM attention."""
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-file")
    if prompt_file is not None:
        with open(prompt_file, encoding="utf-8") as fh:
            prompt = fh.read()
    from dam.profiler import load_model
    from dam.runtime.generate import GenerateConfig
    from dam.runtime.generate import generate as run

    extra = {} if min_length is None else {"min_length": min_length}
    cfg = GenerateConfig(prompt=prompt, max_new_tokens=max_new_tokens, compare_dense=compare_dense,
                         backend=backend, **extra)
    mdl, tok = load_model(model, device=device)
    echo = lambda s: click.echo(s, nl=False)
    if compare_dense:
        click.echo("--- dam ---")
    header = []

    def dense_echo(s: str) -> None:
        if not header:
            header.append(True)
            click.echo("\n--- dense ---")
        click.echo(s, nl=False)

    rep = run(mdl, tok, artifact, cfg, on_text=echo, on_dense_text=dense_echo if compare_dense else None)
    click.echo("")
    if compare_dense:
        d, s = rep.dam, rep.dense
        click.echo(f"prompt tokens: {rep.prompt_tokens}")
        click.echo(f"{'':18}{'dam':>12}{'dense':>12}")
        click.echo(f"{'prefill (s)':18}{d.prefill_s:12.4f}{s.prefill_s:12.4f}")
        click.echo(f"{'decode (ms/tok)':18}{1e3 * d.decode_s_per_token:12.2f}{1e3 * s.decode_s_per_token:12.2f}")
        if rep.agree:
            click.echo(f"outputs agree: yes ({len(d.tokens)} tokens)")
        else:
            click.echo(f"outputs agree: no (first difference at new token {rep.first_divergence})")
