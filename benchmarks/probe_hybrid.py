"""Probe (not a shipped feature): DAM's layouts plus a run-time estimate from the last queries.

Per layer (layers where DAM is not already dense), DAM's planned layout is united with the
MInference-style vertical + slash blocks that the last 64 queries' exact attention ranks highest,
up to ``extra`` of the causal blocks. The hybrid is compared with DAM alone and with the
MInference-style baseline alone at the hybrid's measured density, on one held-out text window.

    python benchmarks/probe_hybrid.py 8192 0.15 64 benchmarks/results/hybrid_probe_8k_w64.json
"""

from __future__ import annotations

import json
import math
import platform
import sys

import torch

KEYS = ("density", "top1", "kl", "dppl", "top1_q4", "kl_q4")


def main() -> None:
    from dam.compiler import load_artifact
    from dam.kernels import BlockLayout
    from dam.profiler import calibration_samples, load_model
    from dam.runtime import apply
    from dam.runtime.baselines import MInferenceHook, _scale, minference_mask
    from dam.runtime.evaluate import compare_logits

    n, extra, start, out_path = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_grad_enabled(False)
    model, tok = load_model("smollm2-135m")
    x = calibration_samples("builtin:stdlib", tok, n, 1, seed=0, start=start)[0]
    dense = model(x[None]).logits[0]
    art = load_artifact("artifacts/smollm2-135m.dam.safetensors")
    B = art.block_size
    nb = -(-n // B)
    causal = nb * (nb + 1) / 2

    def layout_mask(layout: BlockLayout) -> torch.Tensor:
        idx, cnt = layout.kv_indices[0].long(), layout.kv_counts[0].long()
        H, nqb, mb = idx.shape
        m = torch.zeros(H, nqb, nb + 1, dtype=torch.bool)
        valid = torch.arange(mb)[None, None, :] < cnt[..., None]
        m.scatter_(-1, torch.where(valid, idx, nb), True)
        return m[..., :nb]

    def run(mode: str, density: float | None = None) -> tuple[float, ...]:
        dens = []
        with apply(model, art, backend="cpu", min_length=1) as h:
            def hook(layer, q, k, layout):
                if mode == "minference":
                    layout = MInferenceHook(h, density)(layer, q, k, layout)
                elif mode == "hybrid":
                    m = layout_mask(layout)
                    if float(m.sum()) / (m.shape[0] * causal) < 0.999:
                        m = m | minference_mask(q, k, _scale(h._modules[layer], q.shape[-1]), B, min(1.0, extra), 64)
                    layout = BlockLayout.from_block_mask(m[None], B, B)
                dens.append(float(layout.kv_counts[0].sum()) / (layout.kv_counts.shape[1] * causal))
                return layout

            h.layout_hook = hook
            logits = model(x[None]).logits[0]
        q4 = 3 * n // 4
        top1, kl, nll, dnll = compare_logits(dense, logits, x)
        top1_q4, kl_q4, _, _ = compare_logits(dense[q4:], logits[q4:], x[q4:])
        return sum(dens) / len(dens), top1, kl, math.exp(nll - dnll) - 1.0, top1_q4, kl_q4

    res = {"dam": run("dam")}
    res["hybrid"] = run("hybrid")
    res["minference_at_hybrid_density"] = run("minference", res["hybrid"][0])
    for name, r in res.items():
        print(f"{name:30s} " + " ".join(f"{k} {v:.4f}" for k, v in zip(KEYS, r, strict=True)), flush=True)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump({"args": {"length": n, "extra_density": extra, "start": start}, "device": "cpu",
                   "torch": torch.__version__, "platform": platform.platform(),
                   **{name: dict(zip(KEYS, r, strict=True)) for name, r in res.items()}}, fh, indent=1)
    print("wrote", out_path)


if __name__ == "__main__":
    main()
