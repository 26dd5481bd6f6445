"""Fidelity and prefill speed of a DAM artifact vs dense attention (issue 5's benchmark).

On prompts of text the profile never saw (later samples of a data stream, another seed):
top-1 agreement, mean KL(dense || dam), perplexity delta, block density, and prefill time vs
dense for the whole model and for one layer's attention alone.

    python benchmarks/bench_runtime.py --model smollm2-135m --artifact artifacts/smollm2-135m.safetensors \\
        --length 8k --prompts 2 --backend cpu --out benchmarks/results/runtime_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F


def _len(s: str) -> int:
    s = s.strip().lower()
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--data", default="builtin:stdlib")
    ap.add_argument("--length", default="8k")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--start", type=int, default=300, help="first sample of the stream (unseen text)")
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--attention-only", action="store_true", help="skip the whole-model runs")
    ap.add_argument("--layers", type=int, default=None, help="attention alone: first N layers only")
    args = ap.parse_args()

    import dam.runtime as rt
    from dam.compiler import load_artifact
    from dam.kernels import block_sparse_attention
    from dam.profiler import calibration_samples, load_model
    from dam.runtime.evaluate import compare_logits

    n = _len(args.length)
    model, tok = load_model(args.model, device=args.device)
    art = load_artifact(args.artifact)
    per: list[dict] = []
    result: dict = dict(args=vars(args), prompts=per, device=args.device, torch=torch.__version__)

    def dump() -> None:  # after every stage, so a long run that is cut off keeps its figures
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)

    n_prompts = 0 if args.attention_only else args.prompts
    ids_all = calibration_samples(args.data, tok, n, n_prompts, seed=args.seed, start=args.start) \
        if n_prompts else None
    for p in range(n_prompts):
        ids = ids_all[p:p + 1].to(args.device)
        with torch.no_grad():
            dense, t_dense = _timed(lambda: model(ids).logits[0].float())  # noqa: B023 (called at once)
            with rt.apply(model, art, backend=args.backend) as h:
                sparse, t_dam = _timed(lambda: model(ids).logits[0].float())  # noqa: B023 (called at once)
                planner_density = []
                for layer in range(art.num_layers):
                    lay = h.planner(layer, args.device).plan(n, n, *_qk(model, layer, n, args.device))
                    nkb = -(-n // lay.block_n)
                    planner_density.append(float(lay.kv_counts.double().sum() / (lay.batch * lay.heads * nkb * (nkb + 1) / 2)))
        top1, kl, nll_s, nll_d = compare_logits(dense, sparse, ids[0])
        row = dict(
            prompt=p,
            top1=top1,
            kl=kl,
            ppl_dense=math.exp(nll_d), ppl_dam=math.exp(nll_s),
            dppl_pct=100 * (math.exp(nll_s) / math.exp(nll_d) - 1),
            density=sum(planner_density) / len(planner_density),
            prefill_dense_s=t_dense, prefill_dam_s=t_dam, speedup_model=t_dense / t_dam,
        )
        per.append(row)
        print(json.dumps(row))
        dump()
    # attention alone: one layer's shapes, random q/k/v, the layer-0 layout, dense SDPA vs kernel
    cfg = model.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dt = next(model.parameters()).dtype
    q = torch.randn(1, H, n, D, device=args.device, dtype=dt)
    k = torch.randn(1, Hkv, n, D, device=args.device, dtype=dt)
    v = torch.randn(1, Hkv, n, D, device=args.device, dtype=dt)
    with rt.apply(model, art, backend=args.backend) as h:
        attn = {}
        n_layers = min(args.layers or art.num_layers, art.num_layers)
        for layer in range(n_layers):
            lay = h.planner(layer, args.device).plan(n, n, q, k)
            _, t_s = _timed(lambda: block_sparse_attention(q, k, v, lay, backend=args.backend))  # noqa: B023 (called at once)
            nkb = -(-n // lay.block_n)
            dens = float(lay.kv_counts.double().sum() / (lay.batch * lay.heads * nkb * (nkb + 1) / 2))
            attn.setdefault("sparse_s", 0.0)
            attn["sparse_s"] += t_s
            attn.setdefault("density_sum", 0.0)
            attn["density_sum"] += dens
    _, t_d = _timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    attn_row = dict(dense_s_per_layer=t_d, sparse_s_per_layer=attn["sparse_s"] / n_layers,
                    density=attn["density_sum"] / n_layers, layers=n_layers)
    attn_row["speedup"] = attn_row["dense_s_per_layer"] / attn_row["sparse_s_per_layer"]
    attn_row["ideal"] = 1 / attn_row["density"]
    attn_row["share_of_ideal"] = attn_row["speedup"] / attn_row["ideal"]
    print(json.dumps(attn_row))
    result["attention"] = attn_row
    keys = ("top1", "kl", "dppl_pct", "density", "speedup_model")
    if per:
        result["summary"] = {key: sum(r[key] for r in per) / len(per) for key in keys}
        print(json.dumps(dict(summary=result["summary"])))
    dump()


def _qk(model, layer, n, device):
    """Random q/k of the layer's shapes (the dynamic part's pooled scores need some)."""
    cfg = model.config
    dt = next(model.parameters()).dtype
    return (torch.randn(1, cfg.num_attention_heads, n, cfg.head_dim, device=device, dtype=dt),
            torch.randn(1, cfg.num_key_value_heads, n, cfg.head_dim, device=device, dtype=dt))


if __name__ == "__main__":
    main()
