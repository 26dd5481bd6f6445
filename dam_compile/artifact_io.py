"""``save_artifact`` / ``load_artifact``: the ``dam.artifact/1`` safetensors file.

Tensors (K programs, S = max slashes, V = max verticals, both at least 1; rows padded with -1):

==========================  =========  ==========  ===============================================
name                        dtype      shape       meaning
==========================  =========  ==========  ===============================================
``head_program``            int32      [L, H]      program index per (layer, query head)
``program.sink``            int32      [K]         MaskProgram.sink (tokens)
``program.window``          int32      [K]         MaskProgram.window (tokens)
``program.slashes``         int32      [K, S]      sorted distinct offsets, then -1
``program.verticals``       int32      [K, V]      sorted distinct key positions, then -1
``program.dynamic_fraction`` float64   [K]         in [0, 1]
``program.dense``           uint8      [K]         0 or 1
``recall`` (optional)       float32    [L, H]      recall on block_mass at the profiled length
``recall_capture`` (opt.)   float32    [L, H]      recall on attn_mean at the capture length
``density`` (optional)      float32    [L, H]      kept block fraction at the target length
==========================  =========  ==========  ===============================================

The safetensors header's ``__metadata__`` holds three strings: ``schema`` (``dam.artifact/1``),
``dam`` (the metadata dict as canonical JSON: sorted keys, no whitespace) and ``checksum`` (sha256
over every tensor's name, dtype, shape and bytes in name order, then the ``dam`` string). No pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

import numpy as np

from .artifact import SCHEMA, Artifact, runtime_defaults
from .ir import ArtifactError, MaskProgram, check_block_size

_PROGRAM_FIELDS = {
    "program.sink": (np.int32, 1),
    "program.window": (np.int32, 1),
    "program.slashes": (np.int32, 2),
    "program.verticals": (np.int32, 2),
    "program.dynamic_fraction": (np.float64, 1),
    "program.dense": (np.uint8, 1),
}
_FIGURES = ("recall", "recall_capture", "density")
_MAX_HEADER = 64 * 1024 * 1024
_FINGERPRINT_INTS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, finite floats only: byte-identical for equal content."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _checksum(tensors: dict[str, np.ndarray], meta_json: str) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{list(arr.shape)}|".encode())
        h.update(arr.tobytes())
    h.update(meta_json.encode())
    return h.hexdigest()


def _pad(rows: list[tuple[int, ...]]) -> np.ndarray:
    width = max([len(r) for r in rows] + [1])
    out = np.full((len(rows), width), -1, np.int32)
    for k, r in enumerate(rows):
        out[k, : len(r)] = r
    return out


def artifact_tensors(art: Artifact) -> dict[str, np.ndarray]:
    """The tensors ``save_artifact`` writes (see the module table)."""
    progs = art.programs
    for p in progs:
        too_big = [v for v in (p.sink, p.window, *p.slashes, *p.verticals) if v > np.iinfo(np.int32).max]
        if too_big:
            raise ArtifactError(f"program value {too_big[0]} does not fit int32")
    t = {
        "head_program": np.ascontiguousarray(art.head_program, dtype=np.int32),
        "program.sink": np.array([p.sink for p in progs], np.int32),
        "program.window": np.array([p.window for p in progs], np.int32),
        "program.slashes": _pad([p.slashes for p in progs]),
        "program.verticals": _pad([p.verticals for p in progs]),
        "program.dynamic_fraction": np.array([p.dynamic_fraction for p in progs], np.float64),
        "program.dense": np.array([int(p.dense) for p in progs], np.uint8),
    }
    for name in _FIGURES:
        val = getattr(art, name)
        if val is not None:
            t[name] = np.ascontiguousarray(val, dtype=np.float32)
    return t


def _full_metadata(art: Artifact) -> dict[str, Any]:
    meta = dict(art.metadata)
    meta["schema"] = SCHEMA
    meta["block_size"] = art.block_size
    return meta


def artifact_bytes(art: Artifact) -> bytes:
    """The exact bytes ``save_artifact`` writes (deterministic for equal artifacts)."""
    tensors = artifact_tensors(art)
    meta = _full_metadata(art)
    _check_metadata(meta, art.num_layers, art.num_heads)
    try:
        meta_json = canonical_json(meta)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"artifact metadata is not JSON-able: {exc}") from None
    header = {"schema": SCHEMA, "dam": meta_json, "checksum": _checksum(tensors, meta_json)}
    return _safetensors_bytes(tensors, header)


_ST_DTYPES = {np.dtype(np.int32): "I32", np.dtype(np.float64): "F64", np.dtype(np.uint8): "U8",
              np.dtype(np.int64): "I64",
              np.dtype(np.float32): "F32"}


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file written in a fixed order (the Rust writer's metadata order is a hash
    map's, so we write the format ourselves): ``__metadata__`` first, tensors by name, compact
    JSON padded with spaces to 8 bytes, little-endian data without gaps."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def save_artifact(art: Artifact, path: str | os.PathLike) -> None:
    """Write ``art`` to ``path`` (safetensors, schema dam.artifact/1), atomically."""
    data = artifact_bytes(art)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ArtifactError(f"cannot write artifact {path}: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------
def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and validate an artifact; every problem raises ArtifactError naming it."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact {path}: {exc.strerror or exc}") from None
    try:
        return artifact_from_bytes(data)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None


def artifact_from_bytes(data: bytes) -> Artifact:
    """Parse and validate the bytes of an artifact file (see ``load_artifact``)."""
    damaged = "the file is damaged or not a DAM artifact; recompile it with `dam compile`"
    if len(data) < 8:
        raise ArtifactError(f"file is {len(data)} bytes, too short for safetensors; {damaged}")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen < 2 or hlen > min(len(data) - 8, _MAX_HEADER):
        raise ArtifactError(f"header length {hlen} does not fit a {len(data)}-byte file; {damaged}")
    raw = data[8:8 + hlen]
    try:
        text = raw.decode("utf-8")
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise ArtifactError(f"safetensors header is not valid JSON; {damaged}") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise ArtifactError(f"safetensors header lacks __metadata__; {damaged}")
    if json.dumps(header, separators=(",", ":"), ensure_ascii=False) != text.rstrip(" "):
        raise ArtifactError(f"safetensors header is not in canonical form; {damaged}")
    smeta = header["__metadata__"]
    schema = smeta.get("schema")
    if schema != SCHEMA:
        raise ArtifactError(
            f"schema is {schema!r}, this loader reads {SCHEMA!r}; recompile with this version's "
            "`dam compile`"
        )
    meta_json, checksum = smeta.get("dam"), smeta.get("checksum")
    if not isinstance(meta_json, str) or not isinstance(checksum, str):
        raise ArtifactError(f"metadata lacks the 'dam' or 'checksum' entry; {damaged}")
    try:
        from safetensors.numpy import load

        tensors = load(data)
    except Exception as exc:  # the Rust loader raises SafetensorError and others
        raise ArtifactError(f"cannot parse the tensors ({type(exc).__name__}: {exc}); {damaged}") from None
    if _checksum(tensors, meta_json) != checksum:
        raise ArtifactError(f"checksum mismatch (tensors or metadata changed after writing); {damaged}")
    try:
        meta = json.loads(meta_json)
    except ValueError:
        raise ArtifactError(f"the 'dam' metadata is not JSON; {damaged}") from None
    if not isinstance(meta, dict):
        raise ArtifactError("the 'dam' metadata must be a JSON object")
    return _artifact_from_parts(tensors, meta)


def _artifact_from_parts(tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> Artifact:
    if meta.get("schema") != SCHEMA:
        raise ArtifactError(f"metadata schema is {meta.get('schema')!r}, expected {SCHEMA!r}")
    allowed = {"head_program", *_PROGRAM_FIELDS, *_FIGURES}
    unknown = sorted(set(tensors) - allowed)
    if unknown:
        raise ArtifactError(f"unexpected tensors {unknown}")
    missing = sorted({"head_program", *_PROGRAM_FIELDS} - set(tensors))
    if missing:
        raise ArtifactError(f"missing tensors {missing}")
    hp = tensors["head_program"]
    if hp.dtype != np.int32 or hp.ndim != 2 or hp.size == 0:
        raise ArtifactError(f"head_program must be int32 [L, H], got {hp.dtype} {list(hp.shape)}")
    L, H = hp.shape
    K = None
    for name, (dtype, ndim) in _PROGRAM_FIELDS.items():
        t = tensors[name]
        if t.dtype != dtype or t.ndim != ndim:
            raise ArtifactError(
                f"{name} must be {np.dtype(dtype).name} with {ndim} dims, got {t.dtype} {list(t.shape)}"
            )
        K = t.shape[0] if K is None else K
        if t.shape[0] != K or t.shape[0] == 0 or (ndim == 2 and t.shape[1] == 0):
            raise ArtifactError(f"{name} has shape {list(t.shape)}; all program tensors need K={K} rows")
    for name in _FIGURES:
        if name in tensors:
            t = tensors[name]
            if t.dtype != np.float32 or t.shape != (L, H):
                raise ArtifactError(f"{name} must be float32 [{L}, {H}], got {t.dtype} {list(t.shape)}")
            if not np.all(np.isfinite(t)) or t.min() < 0 or t.max() > 1 + 1e-6:
                raise ArtifactError(f"{name} values must be finite and lie in [0, 1]")
    if hp.min() < 0 or hp.max() >= K:
        raise ArtifactError(f"head_program indices must lie in [0, {K}), got [{hp.min()}, {hp.max()}]")
    sink, window = tensors["program.sink"], tensors["program.window"]
    if sink.min() < 0 or window.min() < 0:
        raise ArtifactError("program.sink and program.window must be non-negative")
    dyn, dense = tensors["program.dynamic_fraction"], tensors["program.dense"]
    if not np.all(np.isfinite(dyn)) or dyn.min() < 0 or dyn.max() > 1:
        raise ArtifactError("program.dynamic_fraction must be finite and lie in [0, 1]")
    if dense.max() > 1:
        raise ArtifactError("program.dense must hold 0 or 1")
    rows = {n: [_unpad(n, k, tensors[n][k]) for k in range(K)]
            for n in ("program.slashes", "program.verticals")}
    progs = tuple(
        MaskProgram(
            sink=int(sink[k]), window=int(window[k]), slashes=rows["program.slashes"][k],
            verticals=rows["program.verticals"][k], dynamic_fraction=float(dyn[k]),
            dense=bool(dense[k]),
        )
        for k in range(K)
    )
    _check_metadata(meta, L, H)
    return Artifact(
        programs=progs, head_program=hp, block_size=meta["block_size"],
        recall=tensors.get("recall"), density=tensors.get("density"), metadata=meta,
        recall_capture=tensors.get("recall_capture"),
    )


def _unpad(name: str, k: int, row: np.ndarray) -> tuple[int, ...]:
    valid = row >= 0
    n = int(valid.sum())
    if not valid[:n].all() or (row[n:] != -1).any():
        raise ArtifactError(f"{name}[{k}] must hold its values first, then -1 padding: {row.tolist()}")
    vals = row[:n]
    if n > 1 and not (np.diff(vals) > 0).all():
        raise ArtifactError(f"{name}[{k}] values must be strictly increasing: {vals.tolist()}")
    return tuple(int(v) for v in vals)


def _check_metadata(meta: dict[str, Any], L: int, H: int) -> None:
    check_block_size(meta.get("block_size"), "metadata block_size")
    model = meta.get("model")
    if not isinstance(model, dict):
        raise ArtifactError("metadata lacks the model fingerprint ('model'); recompile the artifact")
    for key in _FINGERPRINT_INTS:
        v = model.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ArtifactError(f"model fingerprint field {key} must be a positive int, got {v!r}")
    if model["num_hidden_layers"] != L or model["num_attention_heads"] != H:
        raise ArtifactError(
            f"head_program is [{L}, {H}] but the fingerprint says {model['num_hidden_layers']} "
            f"layers x {model['num_attention_heads']} heads"
        )
    if H % model["num_key_value_heads"]:
        raise ArtifactError(
            f"num_attention_heads {H} is not a multiple of num_key_value_heads "
            f"{model['num_key_value_heads']}"
        )
    for key in ("compile", "calibration", "runtime"):
        if key in meta and not isinstance(meta[key], dict):
            raise ArtifactError(f"metadata '{key}' must be an object")
    runtime_defaults(meta)


__all__ = ["artifact_bytes", "artifact_from_bytes", "artifact_tensors", "canonical_json",
           "load_artifact", "save_artifact"]
