"""Helpers shared by the CLI commands: one-line errors, length parsing."""

from __future__ import annotations

import functools
import re

import click


def _stage_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = []
    for mod, name in (
        ("dam.profiler", "ProfileError"),
        ("dam.compiler", "ArtifactError"),
        ("dam.kernels", "LayoutError"),
        ("dam.runtime", "DamRuntimeError"),
    ):
        try:
            errs.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def one_line_errors(fn):
    """Turn the stages' own exceptions into one red line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _stage_errors() as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None

    return wrapper


def parse_length(text: str) -> int:
    """'2048', '2k', '8K', '1m' -> int tokens (k = 1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise click.BadParameter(f"not a length: {text!r} (use e.g. 2048 or 2k)")
    n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if n <= 0:
        raise click.BadParameter(f"length must be positive: {text!r}")
    return n


def parse_lengths(text: str) -> list[int]:
    return [parse_length(t) for t in str(text).split(",") if t.strip()]


def run_facts() -> dict:
    """What a recorded result needs besides its figures: the command, the commit, the versions
    and the machine."""
    import platform
    import subprocess
    import sys

    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"command": "dam " + " ".join(sys.argv[1:]), "commit": commit, "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": cpu, "threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
