"""Probe (not a shipped feature): DAM's layouts plus a run-time estimate from the last queries.

Per layer (layers where DAM is not already dense), DAM's planned layout is united with the
MInference-style vertical + slash blocks that the last 64 queries' exact attention ranks highest,
up to ``extra`` of the causal blocks. The hybrid is compared with DAM alone and with the
MInference-style baseline alone at the hybrid's measured density, on one held-out text window.

    python benchmarks/probe_hybrid.py 8192 0.15 64 benchmarks/results/hybrid_probe_8k_w64.json
"""

from __future__ import annotations

import json
import platform
import sys

import torch

KEYS = ("density", "top1", "kl", "dppl", "top1_q4", "kl_q4")


def main() -> None:
    from bench_objective import run_method  # this directory's sibling script

    from dam.compiler import load_artifact
    from dam.kernels import BlockLayout
    from dam.profiler import calibration_samples, load_model
    from dam.runtime.baselines import MInferenceHook, _scale, minference_mask

    n, extra, start, out_path = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_grad_enabled(False)
    model, tok = load_model("smollm2-135m")
    x = calibration_samples("builtin:stdlib", tok, n, 1, seed=0, start=start)[0]
    dense = model(x[None]).logits[0]
    art = load_artifact("artifacts/smollm2-135m.dam.safetensors")
    B = art.block_size
    nb = -(-n // B)

    def layout_mask(layout: BlockLayout) -> torch.Tensor:
        idx, cnt = layout.kv_indices[0].long(), layout.kv_counts[0].long()
        H, nqb, mb = idx.shape
        m = torch.zeros(H, nqb, nb + 1, dtype=torch.bool)
        valid = torch.arange(mb)[None, None, :] < cnt[..., None]
        m.scatter_(-1, torch.where(valid, idx, nb), True)
        return m[..., :nb]

    def hybrid(h):
        causal = nb * (nb + 1) / 2

        def hook(layer, q, k, layout):
            m = layout_mask(layout)
            if float(m.sum()) / (m.shape[0] * causal) < 0.999:  # DAM's dense layers stay as they are
                m = m | minference_mask(q, k, _scale(h._modules[layer], q.shape[-1]), B, min(1.0, extra), 64)
            return BlockLayout.from_block_mask(m[None], B, B)

        return hook

    res = {"dam": run_method(model, art, x, dense)}
    res["hybrid"] = run_method(model, art, x, dense, hybrid)
    d = res["hybrid"]["density"]
    res["minference_at_hybrid_density"] = run_method(model, art, x, dense, lambda h: MInferenceHook(h, d))
    for name, r in res.items():
        print(f"{name:30s} " + " ".join(f"{k} {r[k]:.4f}" for k in KEYS), flush=True)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump({"args": {"length": n, "extra_density": extra, "start": start}, "device": "cpu",
                   "torch": torch.__version__, "platform": platform.platform(),
                   **{name: {k: r[k] for k in KEYS} for name, r in res.items()}}, fh, indent=1)
    print("wrote", out_path)


if __name__ == "__main__":
    main()
