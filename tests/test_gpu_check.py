"""``benchmarks/gpu_check.sh --smoke``: every section runs on the CPU at tiny sizes (what needs a
GPU reported as skipped), from the source tree alone (the script's own import shim), and each
section's JSON is written; so the script a lent GPU runs cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("env", "tests", "kernels", "decode", "planning", "e2e")


@pytest.mark.slow
def test_smoke_runs_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    for name in SECTIONS:
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["meta"]["smoke"] is True and data["rows"], name
        assert all(r["status"] in ("ok", "skipped") for r in data["rows"]), data["rows"]
    kernels = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert any(r.get("matches_sdpa") is True for r in kernels)  # the dense-layout check ran and held
    decode = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert all("needs a CUDA GPU" in r["graph"] for r in decode)  # the GPU-only part: skipped, said so
    assert "DAM GPU check" in (tmp_path / "summary.txt").read_text()


def test_a_failing_case_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    ck = gpu_check.Check(tmp_path, budget=60, smoke=True)
    ck.case("s", "bad", lambda: 1 / 0)
    ck.case("s", "good", lambda: {"x": 1})
    ck.case("s", "gpu", lambda: {"x": 2}, needs_gpu=True)
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["error", "ok", "ok" if gpu_check.torch.cuda.is_available() else "skipped"]
    assert "ZeroDivisionError" in rows[0]["error"]
    spent = gpu_check.Check(tmp_path, budget=0, smoke=True)
    spent.case("t", "late", lambda: pytest.fail("started past the budget"))
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["why"] == "time budget spent"
