"""Every GPU check of DAM in one run (issue 12): run it through ``benchmarks/gpu_check.sh``.

Sections, each case in its own ``try`` and each section's JSON rewritten under ``--out`` the
moment a case finishes (a timeout or crash loses nothing recorded before it); a short table
last (also ``summary.txt``):

* ``env``: GPU, driver, torch, triton, transformers;
* ``tests``: the ``requires_cuda`` tests (pytest, where installed);
* ``kernels``: bf16 prefill, B=1, Hq/Hkv 32/8, D 128 and 64, N 16K/64K/128K, densities
  5/10/25/50/100 %, blocks 128 and 64: DAM vs SDPA flash, cuDNN SDPA (where present) and
  compiled FlexAttention on the same BlockMask; DAM on a dense layout checked against SDPA;
  TFLOP/s on the active blocks; the autotuned config;
* ``decode``: 32K and 128K caches, batch 1 and 8, 10 % blocks: DAM vs dense SDPA, eager and
  replayed from a CUDA graph (a capture that fails is recorded as such);
* ``planning``: the shipped artifact's programs tiled to 32 heads, per-call plan time against
  dense attention of that layer at 32K and 128K;
* ``e2e``: a random-weight Llama-3-8B-shaped model with 4 layers (no download) and an artifact
  for it made with the compiler's API (sinks, windows, slashes, dynamic budgets, a last-query
  estimate, as the shipped one), prefill at 32K and 64K, DAM vs dense SDPA.

``--smoke``: tiny sizes on the CPU under ``TRITON_INTERPRET=1`` (every section; what needs a
GPU is reported as skipped), so that CI keeps the script from rotting. ``--budget S`` stops
starting new cases after S seconds (default 420: the whole check fits 8 minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


class Check:
    """Results per section, each written to ``OUT/<section>.json`` as soon as it changes."""

    def __init__(self, out: Path, budget: float, smoke: bool) -> None:
        self.out, self.smoke, self.t0, self.budget = out, smoke, time.monotonic(), budget
        self.sections: dict[str, list[dict]] = {}
        self.meta: dict | None = None
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def record(self, section: str, row: dict) -> None:
        self.sections.setdefault(section, []).append(row)
        from dam.runtime.eval.record import provenance, write_result

        if self.meta is None:
            self.meta = provenance("benchmarks/gpu_check.sh " + " ".join(sys.argv[1:]), dtype="bfloat16",
                                   smoke=self.smoke)
        write_result(self.out / f"{section}.json", {"rows": self.sections[section]},
                     meta=dict(self.meta, section=section))
        print(f"[{section}] " + json.dumps(row, default=str), flush=True)

    def case(self, section: str, name: str, fn, *, needs_gpu: bool = False) -> None:
        """Run one case: its row, or ``error``/``skipped`` with the reason."""
        if needs_gpu and not torch.cuda.is_available():
            self.record(section, {"case": name, "status": "skipped", "why": "needs a CUDA GPU"})
            return
        if self.left() <= 0:
            self.record(section, {"case": name, "status": "skipped", "why": "time budget spent"})
            return
        t = time.monotonic()
        try:
            row = fn()
            row = {"case": name, "status": "ok", **row}
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
            row = {"case": name, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                   "trace": traceback.format_exc(limit=6)[-1500:]}
        row["seconds"] = round(time.monotonic() - t, 2)
        self.record(section, row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- timing ----------------------------------------------------------------------------------
def bench(fn, smoke: bool) -> float:
    """Median seconds of ``fn``: ``triton.testing.do_bench`` on a GPU, a few wall-clock runs else."""
    if torch.cuda.is_available() and not smoke:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- sections ----------------------------------------------------------------------------------
def env_section(ck: Check) -> None:
    def facts():
        import transformers
        import triton

        row = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
               "transformers": transformers.__version__, "cuda": torch.version.cuda,
               "machine": platform.machine(), "interpret": os.environ.get("TRITON_INTERPRET", "")}
        try:
            row["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, check=False).stdout.strip() or "unknown"
        except OSError:
            row["commit"] = "unknown"
        if torch.cuda.is_available():
            row["gpu"] = torch.cuda.get_device_name(0)
            row["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            try:
                row["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                               capture_output=True, text=True, check=False).stdout.strip()
            except OSError:
                row["driver"] = "unknown (no nvidia-smi)"
        return row

    ck.case("env", "environment", facts)


def tests_section(ck: Check) -> None:
    def run():
        try:
            import pytest  # noqa: F401
        except ImportError:
            return {"status_detail": "skipped: pytest is not installed here"}
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                       if "requires_cuda" in p.read_text())
        timeout = max(30, int(min(180, ck.left() / 2)))
        try:
            res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "requires_cuda", "-p", "no:cacheprovider",
                                  *files], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"status_detail": f"timed out after {timeout} s"}
        tail = (res.stdout + res.stderr).strip().splitlines()
        return {"returncode": res.returncode, "files": files, "summary": tail[-1] if tail else "",
                "failures": [ln for ln in tail if ln.startswith(("FAILED", "ERROR"))][:20]}

    ck.case("tests", "requires_cuda", run)


def kernel_cases(smoke: bool) -> list[tuple[int, int, int, float]]:
    """(D, block, N, density), the most telling first (D 128, blocks of 128, 128K, 10 %)."""
    if smoke:
        return [(32, 16, 128, dd) for dd in (0.25, 1.0)] + [(16, 32, 128, 0.5)]
    dens = (0.10, 0.05, 0.25, 0.50, 1.00)
    return [(d, blk, n, dd) for d in (128, 64) for blk in (128, 64) for n in (131072, 65536, 16384) for dd in dens]


def kernels_section(ck: Check) -> None:
    from dam.kernels import BlockLayout, block_sparse_attention
    from dam.kernels.synthetic import element_density, flex_block_mask, realistic_mask

    dev, smoke = _device(), ck.smoke
    hq, hkv = (4, 2) if smoke else (32, 8)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    flex = None
    sdpa_cache: dict[tuple, dict] = {}

    def baselines(d, n, q, k, v):
        key = (d, n)
        if key not in sdpa_cache:
            row = {}
            if dev.type == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                for name, be in (("sdpa_flash_s", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn_s", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(be):
                            row[name] = bench(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True,
                                                      enable_gqa=True), smoke)
                    except Exception as exc:  # noqa: BLE001 - a backend absent here
                        row[name] = None
                        row[name.replace("_s", "_error")] = f"{type(exc).__name__}: {str(exc)[:200]}"
            else:
                row["sdpa_flash_s"] = bench(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True,
                                                    enable_gqa=True), smoke)
            sdpa_cache[key] = row
        return sdpa_cache[key]

    for d, blk, n, dd in kernel_cases(smoke):
        def one(d=d, blk=blk, n=n, dd=dd):
            nonlocal flex
            from torch.nn.attention.flex_attention import flex_attention

            if flex is None:
                flex = flex_attention if smoke or dev.type != "cuda" else torch.compile(flex_attention, dynamic=False)
            q = torch.randn(1, hq, n, d, device=dev, dtype=dt)
            k = torch.randn(1, hkv, n, d, device=dev, dtype=dt)
            v = torch.randn(1, hkv, n, d, device=dev, dtype=dt)
            mask = realistic_mask(hq, n // blk, dd, gen)
            layout = BlockLayout.from_block_mask(mask, blk, blk).to(dev)
            row = {"D": d, "block": blk, "N": n, "density_target": dd, "density": round(element_density(mask, blk), 4)}
            t_first = time.perf_counter()
            out = block_sparse_attention(q, k, v, layout)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t_first
            row["dam_s"] = bench(partial(block_sparse_attention, q, k, v, layout), smoke)
            try:
                from dam.kernels import triton_kernels

                best = getattr(triton_kernels._block_sparse_fwd_kernel, "best_config", None)
                row["config"] = str(best) if best is not None else None
            except Exception:  # noqa: BLE001 - not a Triton run
                row["config"] = None
            row.update(baselines(d, n, q, k, v))
            try:
                bm = flex_block_mask(mask.to(dev), blk, dev)
                row["flex_s"] = bench(partial(flex, q, k, v, block_mask=bm, enable_gqa=True), smoke)
            except Exception as exc:  # noqa: BLE001
                row["flex_s"], row["flex_error"] = None, f"{type(exc).__name__}: {str(exc)[:200]}"
            if dd >= 1.0:  # a dense layout: the same function as causal SDPA
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
                err = float((out.float() - ref).abs().max())
                tol = 8 * (2.0 ** -8 if dt == torch.bfloat16 else 2.0 ** -20) * float(v.float().abs().max())
                row.update(max_abs_err_vs_sdpa=err, tolerance=tol, matches_sdpa=err <= tol)
            kept = int(layout.kv_counts.sum())
            row["tflops_active"] = 4 * kept * blk * blk * d / row["dam_s"] / 1e12
            if row.get("sdpa_flash_s"):
                row["speedup_vs_sdpa_flash"] = row["sdpa_flash_s"] / row["dam_s"]
            if row.get("flex_s"):
                row["speedup_vs_flex"] = row["flex_s"] / row["dam_s"]
            return row

        ck.case("kernels", f"D{d}-B{blk}-N{n}-{int(dd * 100)}%", one)


def decode_section(ck: Check) -> None:
    from dam.kernels import BlockLayout, block_sparse_decode
    from dam.kernels.synthetic import realistic_mask

    dev, smoke = _device(), ck.smoke
    hq, hkv, d, blk = (4, 2, 32, 16) if smoke else (32, 8, 128, 64)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(1)
    caches = (256,) if smoke else (32768, 131072)
    for s in caches:
        for bt in (1, 8):
            def one(s=s, bt=bt):
                q = torch.randn(bt, hq, 1, d, device=dev, dtype=dt)
                kc = torch.randn(bt, hkv, s, d, device=dev, dtype=dt)
                vc = torch.randn(bt, hkv, s, d, device=dev, dtype=dt)
                m = realistic_mask(hq, s // blk, 0.10, gen)[:, :, -1:, :].expand(bt, -1, -1, -1).contiguous()
                lay = BlockLayout.from_block_mask(m, blk, blk).to(dev)
                lens = torch.full((bt,), s, device=dev, dtype=torch.int32)
                dam = partial(block_sparse_decode, q, kc, vc, lay, cache_seqlens=lens)
                dense = partial(F.scaled_dot_product_attention, q, kc, vc, enable_gqa=True)
                row = {"cache": s, "batch": bt, "density": 0.10, "dam_s": bench(dam, smoke), "dense_s": bench(dense, smoke)}
                row["speedup"] = row["dense_s"] / row["dam_s"]
                if dev.type == "cuda":
                    try:
                        out = torch.empty_like(q)
                        block_sparse_decode(q, kc, vc, lay, cache_seqlens=lens, out=out, validate=False)
                        torch.cuda.synchronize()
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            block_sparse_decode(q, kc, vc, lay, cache_seqlens=lens, out=out, validate=False)
                        g.replay()
                        torch.cuda.synchronize()
                        eager = block_sparse_decode(q, kc, vc, lay, cache_seqlens=lens)
                        row["graph_equal_eager"] = bool(torch.equal(out, eager))
                        row["dam_graph_s"] = bench(g.replay, smoke)
                        row["speedup_graph"] = row["dense_s"] / row["dam_graph_s"]
                    except Exception as exc:  # noqa: BLE001 - not capturable yet: recorded
                        row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                else:
                    row["graph"] = "skipped: needs a CUDA GPU"
                return row

            ck.case("decode", f"cache{s}-batch{bt}", one)


def _shipped_programs(heads: int):
    """The shipped artifact's programs of its middle layer, tiled to ``heads`` heads."""
    from dam.compiler import load_artifact

    art = load_artifact(ROOT / "artifacts" / "smollm2-135m.dam.safetensors")
    progs = art.layer_programs(art.num_layers // 2)
    return [progs[h % len(progs)] for h in range(heads)], art


def planning_section(ck: Check) -> None:
    from dam.runtime import Planner

    dev, smoke = _device(), ck.smoke
    hq, hkv, d = (4, 2, 32) if smoke else (32, 8, 128)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    for n in ((512,) if smoke else (32768, 131072)):
        def one(n=n):
            progs, art = _shipped_programs(hq)
            lq, nl = art.runtime_defaults()
            q = torch.randn(1, hq, n, d, device=dev, dtype=dt)
            k = torch.randn(1, hkv, n, d, device=dev, dtype=dt)
            v = torch.randn(1, hkv, n, d, device=dev, dtype=dt)
            p = Planner(progs, art.block_size, dev, last_query=lq, last_query_queries=nl)
            t = time.perf_counter()
            p.plan(n, n, q, k)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t
            plan = bench(partial(p.plan, n, n, q, k), smoke)
            dense = bench(partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True), smoke)
            return {"N": n, "heads": hq, "block": art.block_size, "last_query": lq, "plan_first_s": first,
                    "plan_s": plan, "dense_attention_s": dense, "plan_share": plan / dense}

        ck.case("planning", f"N{n}", one)


def _llama(smoke: bool):
    import transformers as tf

    if smoke:
        cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=4096)
    else:  # Llama-3-8B's shapes, 4 layers, a small vocabulary (the head is not what is measured)
        cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=131072, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg), cfg


def _artifact_for(cfg, block: int):
    """An artifact for ``cfg`` made with the compiler's API: a program mix like the shipped
    one's (sinks, windows, slashes, small dynamic budgets) and its last-query estimate."""
    import numpy as np

    from dam.compiler import Artifact, MaskProgram

    progs = (MaskProgram(sink=64, window=512), MaskProgram(sink=64, window=256, slashes=(640, 1280)),
             MaskProgram(sink=64, window=1024, dynamic_fraction=0.02),
             MaskProgram(sink=128, window=2048, slashes=(4096,), dynamic_fraction=0.05))
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    hp = (np.arange(L * H).reshape(L, H) % len(progs)).astype(np.int32)
    meta = {"model": {"num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": cfg.num_key_value_heads,
                      "head_dim": cfg.head_dim, "name_or_path": "random llama-3-8b-shaped, 4 layers"},
            "runtime": {"last_query": 0.15, "last_query_queries": 64}}
    return Artifact(programs=progs, head_program=hp, block_size=block, metadata=meta)


def e2e_section(ck: Check) -> None:
    import dam.runtime as rt

    dev, smoke = _device(), ck.smoke
    state: dict = {}
    for n in ((256,) if smoke else (32768, 65536)):
        def one(n=n):
            if "model" not in state:
                model, cfg = _llama(smoke)
                dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
                state["model"], state["cfg"] = model.to(dev, dt).eval(), cfg
            model, cfg = state["model"], state["cfg"]
            art = _artifact_for(cfg, 16 if smoke else 128)
            ids = torch.randint(0, cfg.vocab_size, (1, n), device=dev)
            fwd = partial(_prefill, model, ids)
            with torch.no_grad():
                dense = bench(fwd, smoke)
                with rt.apply(model, art, min_length=64 if smoke else 1024) as handle:
                    dam = bench(fwd, smoke)
                    active = handle.active
            return {"N": n, "dense_s": dense, "dam_s": dam, "speedup": dense / dam, "dam_active": active,
                    "backend": "triton" if dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "cpu"}

        ck.case("e2e", f"N{n}", one)


def _prefill(model, ids):
    model(ids, use_cache=False, logits_to_keep=1)


# --- summary -----------------------------------------------------------------------------------
def summary(ck: Check) -> str:
    lines = [f"DAM GPU check ({'smoke, CPU' if ck.smoke else 'GPU'}), {time.monotonic() - ck.t0:.0f} s"]
    for section, rows in ck.sections.items():
        ok = sum(r["status"] == "ok" for r in rows)
        lines.append(f"\n{section}: {ok}/{len(rows)} ok")
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"  {r['case']:<24} {r['status']}: {r.get('why') or r.get('error', '')}"[:160])
                continue
            figs = [f"{k}={_fmt(r[k])}" for k in ("speedup_vs_sdpa_flash", "speedup_vs_flex", "tflops_active",
                                                   "matches_sdpa", "speedup", "speedup_graph", "plan_share",
                                                   "summary", "gpu", "torch", "triton") if r.get(k) is not None]
            lines.append(f"  {r['case']:<24} " + " ".join(figs))
    return "\n".join(lines)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if math.isfinite(x) else str(x)
    return str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which no new case starts")
    ap.add_argument("--sections", default="env,tests,kernels,decode,planning,e2e")
    args = ap.parse_args()
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke runs under TRITON_INTERPRET=1 (benchmarks/gpu_check.sh --smoke sets it)")
    ck = Check(args.out, args.budget, args.smoke)
    funcs = {"env": env_section, "tests": tests_section, "kernels": kernels_section, "decode": decode_section,
             "planning": planning_section, "e2e": e2e_section}
    for name in args.sections.split(","):
        try:
            funcs[name.strip()](ck)
        except Exception as exc:  # noqa: BLE001 - a section that cannot even start
            ck.record(name, {"case": "section", "status": "error", "error": f"{type(exc).__name__}: {exc}"})
    text = summary(ck)
    (args.out / "summary.txt").write_text(text + "\n")
    print("\n" + text)
    bad = [r for rows in ck.sections.values() for r in rows if r["status"] == "error"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
