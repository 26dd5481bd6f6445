"""``dam inspect``: the summary tables of an artifact, held-out figures, and a mask plot."""

from __future__ import annotations

import click

from .common import one_line_errors, parse_length


@click.command("inspect")
@click.argument("artifact", type=click.Path())
@click.option("--profile", "store", default=None, type=click.Path(),
              help="A profile store to evaluate the artifact on (e.g. held-out data).")
@click.option("--length", default=None, help="Length N of the plotted block masks (default: the store's).")
@click.option("--plot", default=None, type=click.Path(), help="Write a PNG: per head, mask beside map.")
@click.option("--layers", default=None, help="Comma-separated layers to plot (default: all).")
@one_line_errors
def inspect_cmd(artifact, store, length, plot, layers):
    """Show what ARTIFACT (.safetensors) keeps; with --profile, its recall on that store."""
    from dam.compiler import format_summary, load_artifact
    from dam.compiler.evaluate import evaluate_artifact, format_evaluation

    art = load_artifact(artifact)
    click.echo(format_summary(art))
    prof = None
    if store:
        from dam.compiler import read_profile

        prof = read_profile(store)
        click.echo("")
        click.echo(format_evaluation(evaluate_artifact(art, prof)))
    if plot:
        from dam.compiler.plot import plot_artifact

        n = parse_length(length) if length else None
        try:
            sel = [int(v) for v in layers.split(",") if v.strip()] if layers else None
        except ValueError:
            raise click.BadParameter(f"--layers takes comma-separated ints, got {layers!r}") from None
        plot_artifact(art, plot, profile=prof, length=n, layers=sel)
        click.echo(f"wrote {plot}")
