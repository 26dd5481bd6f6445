"""Where DAM stops paying inside vLLM: per layer, vLLM's CPU attention vs DAM's sparse call.

Usage (the vLLM environment, README, Serving)::

    OMP_WAIT_POLICY=passive .venv-vllm/bin/python benchmarks/bench_vllm_rule.py

The dense rule of :mod:`dam.runtime.integration` (``DENSE_ABOVE``) is a break-even against the
dense kernel the sparse call replaces. Under transformers that is DAM's dense path (SDPA,
``benchmarks/bench_dense_rule.py``); inside vLLM it is vLLM's own CPU attention kernel, which is
faster than SDPA, so the break-even is lower. This runs the engine in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with the OpenMP binding a served engine's worker gets
(``--bind``: vLLM's multiprocess executor keeps a core for its scheduler process and starts the
worker with ``OMP_NUM_THREADS``/``OMP_PLACES`` of the rest), sends
held-out prompts through the DAM backend and, in every layer of every prefill, times on the same
inputs vLLM's kernel and DAM's sparse call with the dense rule off (planning at a cached length
and the kernel, the backend's own views and copy back). Fits ``sparse / vLLM`` against the
layer's density bound like ``bench_dense_rule.py`` and writes
``benchmarks/results/dense_rule_vllm_<model>_bfloat16.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench_vllm_rule")


def default_bind() -> str:
    """The cores a served engine's single worker binds (all but the last one, kept for vLLM's
    scheduler process; all of them on a 1-core machine)."""
    cores = sorted(os.sched_getaffinity(0))
    keep = cores[:-1] or cores
    return ",".join(str(c) for c in keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", type=Path, default=ROOT / "artifacts" / "smollm2-135m.dam.safetensors")
    ap.add_argument("--lengths", default="2k,4k,8100", help="prompt lengths (within the model's context)")
    ap.add_argument("--rounds", type=int, default=3, help="steps per length (one timing per layer each)")
    ap.add_argument("--batch", type=int, default=1, help="prompts of the length prefilled in one step")
    ap.add_argument("--bind", default=None, help="comma-separated cores the worker's threads run on "
                    "(default: a served worker's)")
    ap.add_argument("--data", default="builtin:stdlib", help="held-out text (not the calibration data)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bind = args.bind or default_bind()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # bound here, as the executor binds its worker
    os.environ.update(OMP_NUM_THREADS=str(len(bind.split(","))), OMP_PLACES="{" + bind + "}", OMP_PROC_BIND="true")
    os.environ.setdefault("DAM_CPU_FLEX", "sync")  # the compiled kernel builds before any timing

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    import dam.runtime.vllm_backend as vb
    from dam.compiler import load_artifact
    from dam.kernels import cpu_native
    from dam.profiler import load_model, parse_length
    from dam.profiler.data import calibration_samples
    from dam.profiler.models import converted_dir
    from dam.runtime import DamHandle, RuntimeConfig
    from dam.runtime.eval.bench import fit_break_even
    from dam.runtime.eval.record import write_result

    art = load_artifact(args.artifact)
    probe = DamHandle(None, art, RuntimeConfig(backend="cpu", min_length=1, dense_above=1.0))
    samples: dict[int, list] = {}  # layer -> [(bound, vllm_s, dam_s)] of the current length
    threads: set[int] = set()  # the worker's torch threads, as the calls saw them

    def forward(self, layer, query, key, value, kv_cache, md, output, *a, **kw):
        reqs = getattr(md, "dam_requests", ())
        if self._dam is None or not reqs or key is None:
            return CPUAttentionBackendImpl.forward(self, layer, query, key, value, kv_cache, md, output, *a, **kw)
        if self._layer is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer = extract_layer_index(layer.layer_name)
        t = time.perf_counter()
        CPUAttentionBackendImpl.forward(self, layer, query, key, value, kv_cache, md, output, *a, **kw)
        t_vllm = time.perf_counter() - t
        if not probe._all_dense[self._layer]:
            t = time.perf_counter()
            for q0, q1 in reqs:  # as the backend: each request's own rows
                q = query[q0:q1].transpose(0, 1).unsqueeze(0)
                k = key[q0:q1].transpose(0, 1).unsqueeze(0)
                v = value[q0:q1].transpose(0, 1).unsqueeze(0)
                out = probe.attend(self._layer, q, k, v, self.scale)
                output[q0:q1].copy_(out[0].transpose(0, 1))
            t_dam = time.perf_counter() - t
            n = reqs[0][1] - reqs[0][0]
            bound = probe.planner(self._layer, query.device).density_bound(n, n)
            samples.setdefault(self._layer, []).append((bound, t_vllm, t_dam))
        threads.add(torch.get_num_threads())
        return output

    vb.DamCPUAttentionImpl.forward = forward
    _, tok = load_model(args.model)
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    longest = max(lengths)
    engine = dict(dtype="bfloat16", enforce_eager=True, max_model_len=min(8192, longest + 64), seed=0,
                  enable_prefix_caching=False, enable_chunked_prefill=False,
                  max_num_batched_tokens=(longest + 64) * args.batch, max_num_seqs=args.batch,
                  gpu_memory_utilization=0.3)
    llm = LLM(model=str(converted_dir(args.model)), additional_config={"dam_artifact": str(args.artifact),
              "dam_min_length": 1}, **engine)
    sp = SamplingParams(temperature=0.0, max_tokens=1)
    results = []
    for n in lengths:
        def run(start: int, n: int = n) -> None:
            ids = calibration_samples(args.data, tok, n, args.batch, seed=123, start=start * args.batch)
            llm.generate([TokensPrompt(prompt_token_ids=r.tolist()) for r in ids], sp, use_tqdm=False)

        run(0)  # warm: the length's static plans, the compiled kernel
        samples.clear()
        for r in range(args.rounds):
            run(1 + r)
        rows = []
        for layer in sorted(samples):
            bound = samples[layer][0][0]
            t_vllm = statistics.median(s[1] for s in samples[layer])
            t_dam = statistics.median(s[2] for s in samples[layer])
            rows.append({"layer": layer, "bound": bound, "dense_s": t_vllm, "sparse_s": t_dam, "ratio": t_dam / t_vllm})
            log.info("N=%d layer %2d bound %.3f: vLLM %.1f ms DAM %.1f ms (%.2f)", n, layer, bound, t_vllm * 1e3,
                     t_dam * 1e3, t_dam / t_vllm)
        results.append(fit_break_even(n, rows))
    out = args.out or ROOT / "benchmarks" / "results" / f"dense_rule_vllm_{args.model}_bfloat16.json"
    import vllm

    write_result(out, {"results": results, "model": args.model, "artifact": str(args.artifact), "rounds": args.rounds,
                       "batch": args.batch,
                       "dense_kernel": "vllm cpu_attention_with_kv_cache", "cpu_kernel": {"native": cpu_native.state()}},
                 dtype="bfloat16", device="cpu", vllm=vllm.__version__, threads=max(threads, default=0),
                 bind=bind, engine=engine)
    log.info("-> %s", out)


if __name__ == "__main__":
    main()
