"""Recorded results: one format with provenance; the results folder and its index agree."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from dam.runtime.eval.record import SCHEMA, provenance, write_result

ROOT = Path(__file__).resolve().parents[3]


def test_write_result_carries_provenance_and_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_result(path, {"schema": "dam.eval/1", "rows": [1, 2], "data": "builtin:mix"}, command="dam x",
                 dtype="bfloat16", device="cpu", model="m")
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and doc["format"] == "dam.eval/1" and doc["rows"] == [1, 2]
    meta = doc["meta"]
    assert meta["command"] == "dam x" and meta["dtype"] == "bfloat16" and meta["model"] == "m"
    assert meta["device"].startswith("cpu: ") and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["date"])
    assert {"python", "torch", "transformers"} <= set(meta["versions"])
    assert re.fullmatch(r"([0-9a-f]{40}|unknown)(\+dirty)?", meta["commit"])
    assert not list(path.parent.glob("*.tmp"))
    write_result(path, {"rows": []}, meta={"command": "again"})
    assert json.loads(path.read_text())["meta"] == {"command": "again"}
    assert provenance(dtype="float32")["command"].startswith("python ")


def test_every_result_is_indexed_and_every_indexed_file_exists():
    results = ROOT / "benchmarks" / "results"
    index = (results / "INDEX.md").read_text()
    named = set(re.findall(r"`([\w./-]+\.(?:json|png|md|txt))`", index))
    files = {str(p.relative_to(results)) for p in results.rglob("*") if p.is_file() and p.name != "INDEX.md"}
    assert files - named == set(), "results not listed in INDEX.md"
    listed = {n for n in named if "/" not in n or n.startswith("gpu/")}
    missing = {n for n in listed if not (results / n).exists() and not n.startswith("gpu/")}
    assert missing == set(), "INDEX.md lists files that are not there"


def test_benchmarks_import_neither_the_cli_nor_a_sibling_script():
    bench = ROOT / "benchmarks"
    siblings = {p.stem for p in bench.glob("*.py")}
    for script in bench.glob("*.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith("dam.cli"), f"{script.name} imports {name}"
                assert name.split(".")[0] not in siblings, f"{script.name} imports the sibling {name}"
