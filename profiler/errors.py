"""The profiler stage's one exception type."""

from __future__ import annotations


class ProfileError(Exception):
    """Anything that stops profiling: a bad model spec, bad data, a bad or mismatched store.

    Messages say what is wrong and what to do about it.
    """
