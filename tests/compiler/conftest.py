"""Shared synthetic stores for the compiler tests (built once per session: they take ~1 s)."""

from __future__ import annotations

import pytest

from . import synth

N, B, P = 1024, 64, 256
KNOWN = ["sink_window", "slash300", "vertical517", "moving", "diffuse"]


@pytest.fixture(scope="session")
def known_store(tmp_path_factory):
    """One layer of five heads whose optimal programs are known (see synth)."""
    path = tmp_path_factory.mktemp("prof") / "known.zarr"
    gens = [[synth.sink_window(4, 100), synth.slash(300), synth.vertical(517),
             synth.moving_blocks(B), synth.diffuse()]]
    return synth.make_store(path, gens, n=N, B=B, P=P, samples=4, seed=1)


@pytest.fixture(scope="session")
def gqa_store(tmp_path_factory):
    """Two layers x 6 heads, 2 KV heads (groups of 3), mixed patterns, for sharing/clustering."""
    path = tmp_path_factory.mktemp("prof") / "gqa.zarr"
    g = [
        [synth.sink_window(4, 100), synth.sink_window(8, 150), synth.slash(300),
         synth.vertical(517), synth.sink_window(4, 60), synth.slash(130)],
        [synth.slash(200), synth.sink_window(4, 100), synth.vertical(300),
         synth.diffuse(), synth.sink_window(16, 80), synth.vertical(700)],
    ]
    return synth.make_store(path, g, n=N, B=B, P=P, samples=2, kv_heads=2, seed=2)
