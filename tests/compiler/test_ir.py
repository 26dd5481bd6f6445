"""MaskProgram's masks against brute-force definitions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dam.compiler import ArtifactError, MaskProgram


def brute_element_mask(p: MaskProgram, q_len: int, kv_len: int) -> np.ndarray:
    out = np.zeros((q_len, kv_len), dtype=bool)
    for r in range(q_len):
        i = kv_len - q_len + r
        for j in range(i + 1):
            out[r, j] = (
                p.dense
                or j < p.sink
                or i - j < p.window
                or (i - j) in p.slashes
                or j in p.verticals
            )
    return out


def brute_block_mask(p: MaskProgram, q_len: int, kv_len: int, B: int) -> np.ndarray:
    em = brute_element_mask(p, q_len, kv_len)
    nq, nk = -(-q_len // B), -(-kv_len // B)
    out = np.zeros((nq, nk), dtype=bool)
    for r in range(q_len):
        i = kv_len - q_len + r
        out[r // B, i // B] = True  # the diagonal block
        for j in range(kv_len):
            if em[r, j]:
                out[r // B, j // B] = True
    return out


programs = st.builds(
    MaskProgram,
    sink=st.integers(0, 12),
    window=st.integers(0, 20),
    slashes=st.lists(st.integers(0, 80), max_size=4).map(tuple),
    verticals=st.lists(st.integers(0, 80), max_size=4).map(tuple),
    dynamic_fraction=st.floats(0, 1),
    dense=st.sampled_from([False] * 5 + [True]),
)


@settings(max_examples=300, deadline=None)
@given(p=programs, kv_len=st.integers(1, 70), data=st.data())
def test_element_mask_matches_definition(p, kv_len, data):
    q_len = data.draw(st.integers(1, kv_len))
    assert np.array_equal(p.element_mask(q_len, kv_len), brute_element_mask(p, q_len, kv_len))


@settings(max_examples=300, deadline=None)
@given(p=programs, kv_len=st.integers(1, 70), B=st.sampled_from([1, 2, 4, 8, 16]), data=st.data())
def test_block_mask_matches_pooled_element_mask(p, kv_len, B, data):
    q_len = data.draw(st.integers(1, kv_len))
    assert np.array_equal(p.block_mask(q_len, kv_len, B), brute_block_mask(p, q_len, kv_len, B))


def test_block_mask_odd_lengths():
    p = MaskProgram(sink=4, window=100, slashes=(300,), verticals=(517,))
    for q_len, kv_len in [(97, 97), (1000, 1000), (1025, 1025), (1, 1025), (97, 1000)]:
        assert np.array_equal(p.block_mask(q_len, kv_len, 64), brute_block_mask(p, q_len, kv_len, 64))


def test_density_dense_is_one_and_sparse_below():
    assert MaskProgram(dense=True).density(1024, 1024, 64) == 1.0
    d = MaskProgram(sink=64, window=64).density(4096, 4096, 64)
    assert 0 < d < 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sink": -1},
        {"window": 1.5},
        {"slashes": (-3,)},
        {"verticals": ("a",)},
        {"dynamic_fraction": 1.5},
        {"dynamic_fraction": float("nan")},
        {"dense": "yes"},
    ],
)
def test_invalid_programs_refused(kwargs):
    with pytest.raises(ArtifactError):
        MaskProgram(**kwargs)


def test_programs_normalise_and_hash():
    a = MaskProgram(slashes=(5, 3, 5), verticals=(9, 1))
    b = MaskProgram(slashes=(3, 5), verticals=(1, 9))
    assert a == b and hash(a) == hash(b) and a.slashes == (3, 5)
