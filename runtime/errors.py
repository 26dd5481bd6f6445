"""The runtime stage's exception type."""

from __future__ import annotations


class DamRuntimeError(RuntimeError):
    """The runtime cannot do what was asked; the message says what is wrong and what to do.

    Artifact/model mismatches raise the compiler's ``ArtifactError`` instead.
    """
