"""``dam compile``: fit mask programs from a profile store into a safetensors artifact."""

from __future__ import annotations

import click

from dam.compiler.ir import DEFAULT_LAST_QUERY, DEFAULT_RECALL

from .common import one_line_errors, parse_length


def _clusters(text: str | None):
    if text is None or str(text).lower() in ("", "none", "off"):
        return None
    if str(text).lower() == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        raise click.BadParameter(f"--clusters takes a positive int or 'auto', got {text!r}") from None
    if k < 1:
        raise click.BadParameter(f"--clusters must be positive, got {k}")
    return k


@click.command("compile")
@click.argument("store", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Output artifact (ART.safetensors).")
@click.option("--recall", default=DEFAULT_RECALL, show_default=True, type=float,
              help="Recall target of each head's program (of its value-aware block weight; see --objective).")
@click.option("--method", type=click.Choice(["recall", "dam-paper"]), default="recall", show_default=True,
              help="recall: cheapest program meeting --recall; dam-paper: the seed paper's pattern match.")
@click.option("--clusters", default=None, help="Share programs: K clusters, or 'auto' (default: none).")
@click.option("--target-length", default=None,
              help="Length whose kept blocks are minimised/reported (default: the profiled length).")
@click.option("--max-density", default=0.9, show_default=True, type=float,
              help="Heads needing more than this fraction of causal blocks become dense.")
@click.option("--share-kv-groups", is_flag=True, help="Heads sharing a KV head get one program.")
@click.option("--tau", default=0.1, show_default=True, type=float, help="dam-paper threshold τ.")
@click.option("--mu", default=0.5, show_default=True, type=float, help="dam-paper coverage μ.")
@click.option("--dynamic/--no-dynamic", default=True, show_default=True,
              help="Allow content-selected (dynamic) block budgets.")
@click.option("--objective", type=click.Choice(["auto", "mass", "error"]), default="auto", show_default=True,
              help="What programs must recall: attention mass, or the value-aware block weight "
                   "(how much each block moves the head's output); auto: error when the store has it.")
@click.option("--allocate", type=click.Choice(["head", "global"]), default="head", show_default=True,
              help="head: every head meets --recall; global: the mean over heads meets it at the least "
                   "mean density (cheap local heads go above it, diffuse heads below).")
@click.option("--min-head-recall", default=0.0, show_default=True, type=float,
              help="With --allocate global: no head below this estimated recall.")
@click.option("--last-query", default=None, type=click.FloatRange(0.0, 1.0),
              help="Runtime default stored in the artifact: blocks estimated per input from the last "
                   "queries' attention (verticals + slashes), added to each non-dense head, as a "
                   f"fraction of its causal blocks (default {DEFAULT_LAST_QUERY} with --method recall, "
                   "0 with dam-paper; 0: off; `dam eval/bench --last-query` override it).")
@click.option("--last-query-queries", default=64, show_default=True, type=click.IntRange(min=1),
              help="How many last queries that estimate uses.")
@click.option("--max-verticals", default=16, show_default=True, type=click.IntRange(min=0),
              help="Vertical columns per program (0: none; they sit at profiled positions).")
@click.option("--max-slashes", default=16, show_default=True, type=click.IntRange(min=0),
              help="Element-offset slashes per program.")
@click.option("--max-sink", default=None, type=click.IntRange(min=0),
              help="Largest sink in tokens (default: any).")
@click.option("--block-slashes/--no-block-slashes", default=True, show_default=True,
              help="Allow block-multiple slash offsets as candidates.")
@click.option("--seed", default=0, show_default=True, type=int, help="Clustering seed.")
@one_line_errors
def compile_cmd(store, out, recall, method, clusters, target_length, max_density, share_kv_groups,
                tau, mu, dynamic, objective, allocate, min_head_recall, last_query, last_query_queries,
                max_verticals, max_slashes, max_sink, block_slashes, seed):
    """Compile the profile STORE (.zarr) into a mask artifact (.safetensors)."""
    import time

    from tqdm import tqdm

    from dam.compiler import CompileConfig, compile_profile, format_summary, save_artifact

    config = CompileConfig(
        method=method, recall=recall, max_density=max_density, clusters=_clusters(clusters),
        target_length=parse_length(target_length) if target_length else None,
        share_kv_groups=share_kv_groups, tau=tau, mu=mu, dynamic=dynamic, seed=seed,
        objective=objective, allocate=allocate, min_head_recall=min_head_recall, max_verticals=max_verticals,
        max_slashes=max_slashes, max_sink=max_sink, block_slashes=block_slashes,
        last_query=last_query, last_query_queries=last_query_queries,
    )
    bar = tqdm(total=None, unit="head", desc="compile")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    t0 = time.perf_counter()
    try:
        result = compile_profile(store, config, progress=progress)
    finally:
        bar.close()
    save_artifact(result.artifact, out)
    click.echo(format_summary(result.artifact))
    click.echo(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
