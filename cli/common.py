"""Helpers shared by the CLI commands: one-line errors, length parsing."""

from __future__ import annotations

import functools

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
    """'2048', '2k', '8K', '1m' -> int tokens (k = 1024); a bad value is a click usage error."""
    from dam.profiler.data import parse_length as parse

    try:
        return parse(text)
    except Exception as exc:  # ProfileError: the message says what is wrong
        raise click.BadParameter(str(exc)) from None


def parse_lengths(text: str) -> list[int]:
    return [parse_length(t) for t in str(text).split(",") if t.strip()]

