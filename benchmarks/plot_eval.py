"""Merge the rows of several ``dam eval`` JSON outputs (e.g. one run per length) into one set of plots.

    python benchmarks/plot_eval.py benchmarks/results/eval_smollm2_1k2k.json \\
        benchmarks/results/eval_smollm2_8k.json --out benchmarks/results --prefix eval_smollm2_all
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="eval.json files written by dam eval")
    ap.add_argument("--out", required=True, help="directory for the PNGs")
    ap.add_argument("--prefix", default="eval_all")
    a = ap.parse_args()

    import os

    from dam.runtime.evaluate import plot_report

    os.makedirs(a.out, exist_ok=True)

    rows, seen = [], set()
    for path in a.inputs:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if data.get("schema") != "dam.eval/1":
            raise SystemExit(f"{path} is not a dam eval output (schema {data.get('schema')!r})")
        for r in data["rows"]:
            key = (r["length"], r["method"])
            if key in seen:
                raise SystemExit(f"{path}: length {r['length']} method {r['method']} appears in two inputs")
            seen.add(key)
            rows.append(r)
    for p in plot_report(rows, a.out, a.prefix):
        print("wrote", p)


if __name__ == "__main__":
    main()
