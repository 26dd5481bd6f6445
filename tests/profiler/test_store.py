"""The zarr profile store: round trip, refusal of foreign stores, crash recovery."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dam.profiler import SCHEMA, ProfileError, ProfileStats, read_attrs, read_store, write_store
from dam.profiler.store import recover, resume_mismatches


def _stats(count=3, L=2, H=3, N=37, P=5, B=16):
    st = ProfileStats.zeros(L, H, N, P, B)
    for a in st.arrays().values():
        a.copy_(torch.rand_like(a))
    st.count = count
    return st


ATTRS = {"model": {"model_type": "llama", "name_or_path": "x"}, "dtype": "float32",
         "calibration": {"sources": ["builtin:mix"], "length": 37, "capture_length": 5, "seed": 0,
                         "batch_size": 1}}


def test_round_trip(tmp_path):
    import zarr

    st = _stats()
    path = tmp_path / "p.zarr"
    write_store(path, st, ATTRS)
    attrs, back = read_store(path)
    assert attrs["schema"] == SCHEMA and attrs["block_size"] == 16 and attrs["tool_version"]
    assert back.count == 3 and back.block_size == 16
    for k, v in st.arrays().items():
        assert torch.equal(getattr(back, k), v), k
    g = zarr.open_group(str(path), mode="r")  # what the compiler sees
    assert g["block_mass"].shape == (2, 3, 3, 3) and g["attn_mean"].dtype == np.float64
    assert int(g["count"][...]) == 3
    # overwrite with a new snapshot: no siblings left behind
    write_store(path, _stats(count=4), ATTRS)
    assert read_store(path)[1].count == 4
    assert sorted(os.listdir(tmp_path)) == ["p.zarr"]


def test_foreign_stores_are_refused(tmp_path):
    import zarr

    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    g.attrs["schema"] = "something/else"
    with pytest.raises(ProfileError, match="not a DAM profile store"):
        read_store(tmp_path / "other.zarr")
    with pytest.raises(ProfileError, match="not a DAM profile store"):
        write_store(tmp_path / "other.zarr", _stats(), ATTRS)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("hi")
    with pytest.raises(ProfileError, match="not a"):
        read_attrs(tmp_path / "plain")
    with pytest.raises(ProfileError, match="no profile store"):
        read_store(tmp_path / "missing.zarr")


def test_damaged_store_is_refused(tmp_path):
    import shutil

    path = tmp_path / "p.zarr"
    write_store(path, _stats(), ATTRS)
    shutil.rmtree(path / "col_mass")
    with pytest.raises(ProfileError, match="damaged"):
        read_store(path)


def test_recovery_from_every_kill_point(tmp_path):
    path = tmp_path / "p.zarr"
    old = tmp_path / ".p.zarr.old"
    # killed between "rename store -> .old" and "rename snapshot -> store"
    write_store(path, _stats(count=5), ATTRS)
    os.rename(path, old)
    dead = tmp_path / ".p.zarr.tmp-999999999"  # a snapshot of a writer that no longer runs
    write_store(tmp_path / "q.zarr", _stats(count=6), ATTRS)
    os.rename(tmp_path / "q.zarr", dead)
    assert read_store(path)[1].count == 5
    assert not old.exists() and not dead.exists()
    # killed after the switch but before .old was deleted
    write_store(tmp_path / "r.zarr", _stats(count=7), ATTRS)
    os.rename(tmp_path / "r.zarr", old)
    recover(path)
    assert not old.exists() and read_store(path)[1].count == 5


def test_resume_mismatches_name_what_differs():
    new = dict(ATTRS, block_size=16)
    assert resume_mismatches(new, new) == []
    other = {"model": {"model_type": "llama", "name_or_path": "y"}, "block_size": 32,
             "calibration": {"length": 38, "capture_length": 6}}
    msg = "; ".join(resume_mismatches(new, other))
    for word in ("name_or_path", "length: store 37 vs now 38", "capture length", "block size"):
        assert word in msg
