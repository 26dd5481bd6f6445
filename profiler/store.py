"""The zarr v3 profile store (schema ``dam.profile/1``, see docs/architecture.md).

Writes are whole-store snapshots made crash-consistent by a directory swap: the new snapshot is
written completely into a sibling ``.NAME.tmp-PID`` directory, then ``NAME`` is renamed to
``.NAME.old``, the snapshot renamed to ``NAME``, and ``.NAME.old`` deleted. A process killed at
any instant leaves either the previous or the new snapshot complete; :func:`read_store` (and the
next write) repairs the only torn state possible — ``NAME`` missing with ``.NAME.old`` present —
by renaming ``.NAME.old`` back, and removes snapshots left by dead writers.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .capture import ProfileStats
from .errors import ProfileError

log = logging.getLogger(__name__)

SCHEMA = "dam.profile/1"
#: fingerprint fields whose difference makes a store belong to another model
_MODEL_KEYS = ("model_type", "name_or_path", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_size", "vocab_size", "rope")


def tool_version() -> str:
    """The installed ``dam-attention`` version."""
    try:
        return importlib.metadata.version("dam-attention")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _siblings(path: Path) -> tuple[Path, Path]:
    return path.parent / f".{path.name}.old", path.parent / f".{path.name}.tmp-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def recover(path: str | os.PathLike) -> None:
    """Repair a store whose writer was killed between the two renames; drop dead snapshots."""
    path = Path(path)
    old, _ = _siblings(path)
    if not path.exists() and old.is_dir():
        log.warning("recovering %s from its previous snapshot (a writer was interrupted)", path)
        os.rename(old, path)
    elif path.exists() and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


def exists(path: str | os.PathLike) -> bool:
    """Whether a store (or a recoverable one) is at ``path``."""
    path = Path(path)
    return path.exists() or _siblings(path)[0].exists()


def write_store(path: str | os.PathLike, stats: ProfileStats, attrs: dict[str, Any]) -> None:
    """Write ``stats`` (sums + count) and root ``attrs`` as a complete snapshot at ``path``.

    ``attrs`` must hold ``model``, ``calibration``, ``dtype``; ``schema``, ``block_size`` and
    ``tool_version`` are set here. The switch to the new snapshot is atomic (see module doc).
    """
    import zarr

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    old, tmp = _siblings(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    full = dict(attrs)
    full.update(schema=SCHEMA, block_size=int(stats.block_size), tool_version=tool_version())
    try:
        g = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
        g.attrs.update(full)
        for name, t in stats.arrays().items():
            a = t.detach().cpu().numpy().astype(np.float64, copy=False)
            chunks = (1, *a.shape[1:]) if a.ndim >= 3 else a.shape
            arr = g.create_array(name, shape=a.shape, dtype="float64", chunks=chunks)
            arr[...] = a
        c = g.create_array("count", shape=(), dtype="int64")
        c[...] = np.int64(stats.count)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if not _is_dam_store(path):
            shutil.rmtree(tmp, ignore_errors=True)
            raise ProfileError(f"{path} exists and is not a DAM profile store; refusing to replace it")
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, names in os.walk(root):
        for n in names:
            fd = os.open(os.path.join(dirpath, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _is_dam_store(path: Path) -> bool:
    try:
        read_attrs(path)
    except ProfileError:
        return False
    return True


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The root attributes of a DAM profile store (validated schema)."""
    import zarr

    path = Path(path)
    recover(path)
    if not path.exists():
        raise ProfileError(f"no profile store at {path}; run `dam profile ... --out {path}` first")
    try:
        g = zarr.open_group(store=str(path), mode="r")
        attrs = dict(g.attrs)
    except Exception as exc:
        raise ProfileError(f"{path} is not a zarr v3 group ({type(exc).__name__}: {exc}); "
                           "give the path of a store written by `dam profile`") from None
    if attrs.get("schema") != SCHEMA:
        raise ProfileError(f"{path} is not a DAM profile store (schema {attrs.get('schema')!r}, "
                           f"expected {SCHEMA!r}); give a store written by `dam profile`")
    return attrs


def read_store(path: str | os.PathLike) -> tuple[dict[str, Any], ProfileStats]:
    """Read a store: ``(root attrs, ProfileStats of float64 sums)``."""
    import zarr

    attrs = read_attrs(path)
    g = zarr.open_group(store=str(path), mode="r")
    try:
        arrs = {k: torch.from_numpy(np.asarray(g[k][...], dtype=np.float64)) for k in ProfileStats.ARRAYS}
        count = int(np.asarray(g["count"][...]))
    except KeyError as exc:
        if "block_err" not in g:
            raise ProfileError(f"profile store {path} predates the block_err statistic (an older dam); "
                               "it can be compiled but not resumed: profile into a new --out") from None
        raise ProfileError(f"profile store {path} is damaged: array {exc} is missing; re-run `dam profile`") from None
    L, H, N = arrs["diag_mass"].shape
    st = ProfileStats(**arrs, count=count, block_size=int(attrs["block_size"]))
    P = st.attn_mean.shape[-1]
    expect = ProfileStats.zeros(L, H, N, P, st.block_size, device="meta")
    bad = [k for k in ProfileStats.ARRAYS if arrs[k].shape != getattr(expect, k).shape]
    if bad:
        raise ProfileError(f"profile store {path} is damaged: arrays {bad} have inconsistent shapes")
    return attrs, st


def resume_mismatches(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a store's attrs and a new run's (model, length, capture length,
    block size), as readable phrases; empty when resuming is allowed."""
    diffs: list[str] = []
    om, nm = old.get("model", {}), new.get("model", {})
    for k in _MODEL_KEYS:
        if om.get(k) != nm.get(k):
            diffs.append(f"model {k}: store {om.get(k)!r} vs now {nm.get(k)!r}")
    oc, nc = old.get("calibration", {}), new.get("calibration", {})
    for k, label in (("length", "length"), ("capture_length", "capture length")):
        if oc.get(k) != nc.get(k):
            diffs.append(f"{label}: store {oc.get(k)} vs now {nc.get(k)}")
    if old.get("block_size") != new.get("block_size"):
        diffs.append(f"block size: store {old.get('block_size')} vs now {new.get('block_size')}")
    return diffs


def store_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
