"""The default recipe at a served length, on held-out text, against the dtype's own noise floor.

What a new user gets: ``dam profile MODEL --length N`` (every other flag default) and ``dam
compile STORE`` (defaults, plus ``--recall R`` for each extra value of ``--recalls``), then DAM's
fidelity against dense on text the profile never saw (``--eval-data`` from item ``--eval-start``
on), in ``--dtype``. Beside it the floor: dense in ``--dtype`` against dense in float32 on the
same text (top-1 and KL), i.e. how much of a top-1 gap the dtype alone opens.

    OMP_WAIT_POLICY=passive python benchmarks/bench_recipe.py --model smollm2-135m --length 2k \\
        --eval-data builtin:prose --eval-start 2 --samples 2 --recalls 0.9,0.95,0.97 \\
        --out benchmarks/results/recipe_smollm2_2k_prose_bf16_epyc.json

Rows are written as they are measured (an interrupted run keeps what it finished); the profile in
``--work`` is reused when it exists.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def _fidelity(model, art, samples, backend: str) -> dict:
    from dam.runtime.eval.evaluate import EvalConfig, evaluate

    rep = evaluate(model, {"dam": art}, samples, EvalConfig(methods=("dam",), tasks=("fidelity", "recall"),
                                                            backend=backend))
    row = next(r for r in rep.rows() if r["method"] == "dam")
    return {k: row.get(k) for k in ("density", "recall", "top1", "kl", "dppl", "top1_q4", "kl_q4")}


def _floor(name: str, dtype: str, samples, model) -> dict:
    """Dense ``model`` (in ``dtype``) against dense float32 on the same samples."""
    from dam.profiler import load_model
    from dam.runtime.eval.evaluate import compare_logits
    from dam.runtime.eval.logits import forward_logits

    ref, _ = load_model(name, dtype="float32")
    top1, kl = [], []
    for s in samples:
        ids = s.input_ids[None]
        with torch.no_grad():
            a, b = forward_logits(ref, ids), forward_logits(model, ids)
        t, k, _, _ = compare_logits(a, b, s.input_ids)
        top1.append(t)
        kl.append(k)
    del ref
    return {"top1": sum(top1) / len(top1), "kl": sum(kl) / len(kl)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", default="2k", help="Served (= profiled = evaluated) length.")
    ap.add_argument("--eval-data", default="builtin:prose")
    ap.add_argument("--eval-start", type=int, default=2)
    ap.add_argument("--samples", type=int, default=2, help="Held-out windows.")
    ap.add_argument("--recalls", default="0.9", help="Compile recall targets; the first should be the default.")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--work", default=None, help="Folder for the profile and artifacts (default: a temp dir).")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from dam.compiler import CompileConfig, compile_profile
    from dam.compiler.ir import DEFAULT_RECALL
    from dam.profiler import ProfileConfig, calibration_samples, load_model
    from dam.profiler import profile as run_profile
    from dam.profiler.data import parse_length
    from dam.runtime.eval.evaluate import EvalSample
    from dam.runtime.eval.record import write_result

    n = parse_length(args.length)
    work = args.work or tempfile.mkdtemp(prefix="dam-recipe-")
    store = os.path.join(work, f"profile_{n}.zarr")
    data: dict = {"model": args.model, "length": n, "eval_data": args.eval_data, "eval_start": args.eval_start,
                  "samples": args.samples, "default_recall": DEFAULT_RECALL, "rows": [], "steps_s": {}}

    def record() -> None:
        write_result(args.out, data, dtype=args.dtype, device="cpu")

    t0 = time.perf_counter()
    if not os.path.exists(store):
        run_profile(ProfileConfig(model=args.model, out=store, length=n))  # every other setting default
    data["steps_s"]["profile"] = round(time.perf_counter() - t0, 1)
    model, tok = load_model(args.model, dtype=args.dtype)
    ids = calibration_samples(args.eval_data, tok, n, args.samples, start=args.eval_start)
    samples = [EvalSample("text", ids[i]) for i in range(args.samples)]
    for r in (float(x) for x in args.recalls.split(",")):
        t0 = time.perf_counter()
        cfg = CompileConfig() if r == DEFAULT_RECALL else CompileConfig(recall=r)
        art = compile_profile(store, cfg).artifact
        fid = _fidelity(model, art, samples, args.backend)
        data["rows"].append({"compile_recall": r, "default": r == DEFAULT_RECALL, **fid,
                             "seconds": round(time.perf_counter() - t0, 1)})
        print(f"recall {r}: " + ", ".join(f"{k} {v:.4f}" for k, v in fid.items() if v is not None), flush=True)
        record()
    if args.dtype != "float32":
        data["floor"] = {"what": f"dense {args.dtype} vs dense float32", **_floor(args.model, args.dtype, samples,
                                                                                   model)}
        print(f"floor ({data['floor']['what']}): top1 {data['floor']['top1']:.4f}, kl {data['floor']['kl']:.5f}")
    record()


if __name__ == "__main__":
    main()
