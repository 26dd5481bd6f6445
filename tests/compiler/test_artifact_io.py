"""save_artifact / load_artifact: round trips, determinism, validation, and a fuzzed loader."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dam.compiler import (
    SCHEMA,
    Artifact,
    ArtifactError,
    CompileConfig,
    MaskProgram,
    compile_profile,
    load_artifact,
    save_artifact,
)
from dam.compiler.artifact_io import (
    _checksum,
    _safetensors_bytes,
    artifact_bytes,
    artifact_from_bytes,
    artifact_tensors,
    canonical_json,
)

from .synth import model_fingerprint


def _artifact(L=3, H=4, kv=2, seed=0) -> Artifact:
    rng = np.random.default_rng(seed)
    progs = (
        MaskProgram(sink=64, window=128),
        MaskProgram(sink=4, window=100, slashes=(300, 17), verticals=(517,)),
        MaskProgram(window=64, dynamic_fraction=0.1),
        MaskProgram(dense=True),
    )
    hp = rng.integers(0, len(progs), (L, H)).astype(np.int32)
    meta = {"model": model_fingerprint(L, H, kv), "calibration": {"sources": ["x"], "length": 1024},
            "compile": {"method": "recall", "recall": 0.95}, "tool_version": "0.1.0"}
    return Artifact(progs, hp, 64, rng.random((L, H)), rng.random((L, H)), meta,
                    recall_capture=rng.random((L, H)))


def _same(a: Artifact, b: Artifact) -> None:
    assert a.programs == b.programs
    np.testing.assert_array_equal(a.head_program, b.head_program)
    assert a.block_size == b.block_size
    for name in ("recall", "density", "recall_capture"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert b.metadata["schema"] == SCHEMA
    assert {k: v for k, v in b.metadata.items() if k not in ("schema", "block_size")} == a.metadata


def test_round_trip(tmp_path):
    art = _artifact()
    path = tmp_path / "a.safetensors"
    save_artifact(art, path)
    back = load_artifact(path)
    _same(art, back)
    assert back.program_for(1, 2) == art.program_for(1, 2)
    assert back.layer_programs(0) == art.layer_programs(0)
    # re-saving what was loaded gives the same bytes
    save_artifact(back, tmp_path / "b.safetensors")
    assert (tmp_path / "b.safetensors").read_bytes() == path.read_bytes()


def test_file_is_plain_safetensors(tmp_path):
    from safetensors import safe_open

    art = _artifact()
    save_artifact(art, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="numpy") as fh:
        assert fh.metadata()["schema"] == SCHEMA
        assert set(fh.keys()) == set(artifact_tensors(art))
        np.testing.assert_array_equal(fh.get_tensor("head_program"), art.head_program)


def test_optional_figures_may_be_absent():
    art = _artifact()
    bare = Artifact(art.programs, art.head_program, 64, metadata=art.metadata)
    back = artifact_from_bytes(artifact_bytes(bare))
    assert back.recall is None and back.density is None and back.programs == art.programs


def test_deterministic_compile(gqa_store, tmp_path):
    cfg = CompileConfig(target_length=4096, clusters="auto", share_kv_groups=True)
    a = artifact_bytes(compile_profile(gqa_store, cfg).artifact)
    b = artifact_bytes(compile_profile(gqa_store, cfg).artifact)
    assert a == b


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ArtifactError, match="cannot read"):
        load_artifact(tmp_path / "nope.safetensors")
    with pytest.raises(ArtifactError):
        load_artifact(tmp_path)


# ---- semantically wrong files with a *valid* checksum: validation must catch each one ----
def _raw(tensors: dict, meta: dict, schema: str = SCHEMA) -> bytes:
    mj = canonical_json(meta)
    return _safetensors_bytes(tensors, {"schema": schema, "dam": mj, "checksum": _checksum(tensors, mj)})


def _parts():
    art = _artifact()
    meta = dict(art.metadata, schema=SCHEMA, block_size=64)
    return artifact_tensors(art), meta


def _case(name):
    t, m = _parts()
    L, H = t["head_program"].shape
    if name == "missing":
        del t["program.window"]
    elif name == "unknown":
        t["extra"] = np.zeros(3, np.int32)
    elif name == "dtype":
        t["head_program"] = t["head_program"].astype(np.float32)
    elif name == "shape":
        t["recall"] = np.zeros((L, H + 1), np.float32)
    elif name == "index":
        t["head_program"][0, 0] = 9
    elif name == "negindex":
        t["head_program"][0, 0] = -1
    elif name == "padding":
        t["program.slashes"][1] = [-1, 300]
    elif name == "unsorted":
        t["program.slashes"][1] = [300, 17]
    elif name == "sink":
        t["program.sink"][0] = -5
    elif name == "dyn":
        t["program.dynamic_fraction"][2] = 1.5
    elif name == "dynnan":
        t["program.dynamic_fraction"][2] = np.nan
    elif name == "dense":
        t["program.dense"][0] = 2
    elif name == "recall":
        t["recall"][0, 0] = 1.5
    elif name == "recallnan":
        t["density"][0, 0] = np.nan
    elif name == "rows":
        t["program.sink"] = t["program.sink"][:2]
    elif name == "metaschema":
        m["schema"] = "dam.artifact/0"
    elif name == "layers":
        m["model"] = dict(m["model"], num_hidden_layers=L + 1)
    elif name == "kv":
        m["model"] = dict(m["model"], num_key_value_heads=3)
    elif name == "nomodel":
        del m["model"]
    elif name == "headdim":
        m["model"] = dict(m["model"], head_dim="64")
    elif name == "blocksize":
        m["block_size"] = 48
    elif name == "compile":
        m["compile"] = [1, 2]
    return t, m


CASES = ["missing", "unknown", "dtype", "shape", "index", "negindex", "padding", "unsorted", "sink",
         "dyn", "dynnan", "dense", "recall", "recallnan", "rows", "metaschema", "layers", "kv",
         "nomodel", "headdim", "blocksize", "compile"]


def test_valid_raw_file_loads():
    t, m = _parts()
    artifact_from_bytes(_raw(t, m))


@pytest.mark.parametrize("name", CASES)
def test_invalid_content_refused(name):
    t, m = _case(name)
    with pytest.raises(ArtifactError):
        artifact_from_bytes(_raw(t, m))


def test_wrong_header_schema_refused():
    t, m = _parts()
    with pytest.raises(ArtifactError, match="schema"):
        artifact_from_bytes(_raw(t, m, schema="dam.artifact/2"))


def test_checksum_mismatch_refused():
    t, m = _parts()
    mj = canonical_json(m)
    data = _safetensors_bytes(t, {"schema": SCHEMA, "dam": mj, "checksum": "0" * 64})
    with pytest.raises(ArtifactError, match="checksum"):
        artifact_from_bytes(data)


def test_pickle_or_garbage_refused():
    import pickle

    for data in (b"", b"\x00" * 7, pickle.dumps({"a": 1}), b"PK\x03\x04" + b"\x00" * 100,
                 struct.pack("<Q", 2**60) + b"{}"):
        with pytest.raises(ArtifactError):
            artifact_from_bytes(data)


# ---- fuzz: damaged bytes never crash, hang or load silently ----
GOOD = artifact_bytes(_artifact())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pos=st.integers(0, len(GOOD) - 1), val=st.integers(0, 255))
def test_fuzz_flipped_byte(pos, val):
    if GOOD[pos] == val:
        return
    data = bytearray(GOOD)
    data[pos] = val
    with pytest.raises(ArtifactError):
        artifact_from_bytes(bytes(data))


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(GOOD) - 1))
def test_fuzz_truncated(cut):
    with pytest.raises(ArtifactError):
        artifact_from_bytes(GOOD[:cut])


@settings(max_examples=100, deadline=None)
@given(extra=st.binary(min_size=1, max_size=64))
def test_fuzz_appended_bytes(extra):
    with pytest.raises(ArtifactError):
        artifact_from_bytes(GOOD + extra)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    with pytest.raises(ArtifactError):
        artifact_from_bytes(data)


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(["head_program", "program.sink", "program.slashes", "recall"]),
       dtype=st.sampled_from([np.int64, np.float32, np.float64, np.uint8, np.int32]),
       extra_dim=st.booleans())
def test_fuzz_wrong_dtype_or_shape(key, dtype, extra_dim):
    t, m = _parts()
    arr = t[key]
    new = arr.astype(dtype)
    if extra_dim:
        new = new[..., None]
    if new.dtype == arr.dtype and new.shape == arr.shape:
        return
    t[key] = new
    with pytest.raises(ArtifactError):
        artifact_from_bytes(_raw(t, m))


def test_header_is_json_with_metadata():
    n = struct.unpack("<Q", GOOD[:8])[0]
    header = json.loads(GOOD[8:8 + n])
    assert list(header)[0] == "__metadata__"
    assert json.loads(header["__metadata__"]["dam"])["schema"] == SCHEMA


def test_check_compatible_names_mismatches():
    art = _artifact(L=3, H=4, kv=2)
    ok = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         hidden_size=256, head_dim=64)
    art.check_compatible(ok)
    bad = SimpleNamespace(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1,
                          hidden_size=256, head_dim=64)
    with pytest.raises(ArtifactError, match="num_hidden_layers.*num_key_value_heads"):
        art.check_compatible(bad)


def test_select_heads_is_a_tensor_parallel_rank_slice(tmp_path):
    art = _artifact(L=3, H=4)
    halves = [art.select_heads(0, 2), art.select_heads(2, 4)]
    for part, cols in zip(halves, (slice(0, 2), slice(2, 4)), strict=True):
        assert part.num_heads == 2 and part.num_layers == 3 and part.programs == art.programs
        np.testing.assert_array_equal(part.head_program, art.head_program[:, cols])
        for name in ("recall", "density"):
            full = getattr(art, name)
            if full is not None:
                np.testing.assert_array_equal(getattr(part, name), full[:, cols])
        assert [part.layer_programs(i) for i in range(3)] == [art.layer_programs(i)[cols] for i in range(3)]
    assert art.select_heads(0, 4) is art
    for bad in ((2, 2), (-1, 2), (0, 5), (3, 1)):
        with pytest.raises(ArtifactError, match="not a range"):
            art.select_heads(*bad)
