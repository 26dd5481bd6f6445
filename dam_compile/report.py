"""Human-readable summary tables of an artifact (used by ``dam compile`` and ``dam inspect``)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .artifact import Artifact
from .ir import MaskProgram


def describe_program(p: MaskProgram, limit: int = 6) -> str:
    """A short one-line description, e.g. ``sink=64 window=128 slashes=[300] dyn=0.05``."""
    if p.dense:
        return "dense"

    def short(vals: tuple[int, ...]) -> str:
        head = ",".join(str(v) for v in vals[:limit])
        return f"[{head}{',…' if len(vals) > limit else ''}]"

    parts = [f"sink={p.sink}", f"window={p.window}"]
    if p.slashes:
        parts.append(f"slashes={short(p.slashes)}")
    if p.verticals:
        parts.append(f"verticals={short(p.verticals)}")
    if p.dynamic_fraction:
        parts.append(f"dyn={p.dynamic_fraction:g}")
    return " ".join(parts)


def format_summary(art: Artifact, max_programs: int = 12) -> str:
    """The summary tables: header, per-layer density/recall, most used programs."""
    meta = art.metadata
    fig = meta.get("figures", {}) or {}
    comp = meta.get("compile", {}) or {}
    model = meta.get("model", {}) or {}
    L, H = art.head_program.shape
    dense = np.array([[art.program_for(layer, h).dense for h in range(H)] for layer in range(L)])
    lines = [
        f"model {model.get('name_or_path', '?')}: {L} layers x {H} heads "
        f"({model.get('num_key_value_heads', '?')} KV heads), block size {art.block_size}",
        f"method {comp.get('method', '?')}, recall target {comp.get('recall', '?')}, "
        f"profiled length {fig.get('profile_length', '?')}, target length "
        f"{fig.get('target_length', '?')}",
        f"{len(art.programs)} programs, clusters {fig.get('num_clusters') or '-'}, "
        f"dense heads {int(dense.sum())}/{L * H}",
    ]
    costs = [("per-head", fig.get("mean_density_per_head")),
             ("kv-shared", fig.get("mean_density_kv_shared")),
             ("clustered", fig.get("mean_density_clustered"))]
    if fig.get("sliding_layers"):  # the stages above are the fitted (full-attention) layers'
        costs.append(("all layers, sliding-window bands included", fig.get("mean_density")))
    lines.append("mean density at target length: " + ", ".join(
        f"{k} {v:.4f}" for k, v in costs if v is not None))
    lq = (art.metadata.get("runtime") or {}).get("last_query", 0.0)
    if lq and fig.get("mean_density_with_last_query") is not None:
        lines.append(f"runtime last-query estimate: +{lq:.3g} of causal blocks per non-dense head "
                     f"(density at most {fig['mean_density_with_last_query']:.4f})")
    lines.append("")
    lines.append("layer  density  recall(min/mean)  recall@capture(min)  dense  programs")
    for layer in range(L):
        d = float(art.density[layer].mean()) if art.density is not None else float("nan")
        r = art.recall[layer] if art.recall is not None else np.full(H, np.nan)
        rc = art.recall_capture[layer] if art.recall_capture is not None else np.full(H, np.nan)
        lines.append(
            f"{layer:5d}  {d:7.4f}  {float(r.min()):6.4f}/{float(r.mean()):6.4f}     "
            f"{float(rc.min()):6.4f}               {int(dense[layer].sum()):5d}  "
            f"{len(set(art.head_program[layer].tolist())):8d}"
        )
    if art.density is not None:
        lines.append(f"{'all':>5s}  {float(art.density.mean()):7.4f}  "
                     f"{float(art.recall.min()):6.4f}/{float(art.recall.mean()):6.4f}")
    lines.append("")
    use = Counter(art.head_program.ravel().tolist())
    lines.append("program  heads  description")
    for k, n in sorted(use.items(), key=lambda kv: (-kv[1], kv[0]))[:max_programs]:
        lines.append(f"{k:7d}  {n:5d}  {describe_program(art.programs[k])}")
    if len(use) > max_programs:
        lines.append(f"... {len(use) - max_programs} more programs")
    return "\n".join(lines)
