"""Baseline sparse-attention methods at a matched block density, for evaluation.

* :func:`streaming_artifact`: StreamingLLM-style (one sink block + a local window), an artifact
  whose window is the one whose block density at ``length`` is closest to ``density``.
* :class:`OracleHook`: runtime mode (``DamHandle.layout_hook``); per input and head, the fewest
  KV blocks, heaviest first by the *true* attention mass (streamed from q, k), whose mass reaches
  ``target_recall`` (the floor for any block-sparse method; not a usable method).
* :class:`MInferenceHook`: runtime mode; MInference-style vertical-and-slash: the attention of
  the last ``last_q`` queries over all keys is pooled into per-key-block (vertical) and
  per-block-offset (slash) scores, and the best score-per-block candidates are kept until the
  head's block density reaches ``density``.

Each hook returns a layout ``[1, H, nQB, ...]`` with the diagonal blocks always kept (no empty
row). Imports only torch and dam (runtime rules).
"""

from __future__ import annotations

import numpy as np
import torch

from dam.compiler import Artifact, MaskProgram
from dam.compiler.ir import LAST_QUERY_QUERIES
from dam.kernels import BlockLayout

from ..errors import DamRuntimeError
from .recall import block_mass


def causal_block_mask(nq: int, nk: int, B: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool ``[nQB, nKB]``: key block c holds a key <= the last query of query block a."""
    nqb, nkb = -(-nq // B), -(-nk // B)
    last = (nk - nq) + torch.clamp((torch.arange(nqb, device=device) + 1) * B, max=nq) - 1
    return torch.arange(nkb, device=device)[None, :] * B <= last[:, None]


def diagonal_block_mask(nq: int, nk: int, B: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool ``[nQB, nKB]``: key block holds a key ``j == i`` for a query ``i`` of the query block."""
    nqb, nkb = -(-nq // B), -(-nk // B)
    a = torch.arange(nqb, device=device)
    i0 = (nk - nq) + a * B
    i1 = (nk - nq) + torch.clamp((a + 1) * B, max=nq) - 1
    b = torch.arange(nkb, device=device)
    j0, j1 = b * B, torch.clamp((b + 1) * B, max=nk) - 1
    return (i0[:, None] <= j1[None, :]) & (j0[None, :] <= i1[:, None])


def mean_artifact_density(artifact: Artifact, length: int, block_size: int | None = None) -> float:
    """Mean over (layer, head) of the programs' block density at prefill ``length`` (dynamic
    budget included), the density the runtime plans for."""
    B = block_size or artifact.block_size
    cache: dict[int, float] = {}
    vals = []
    for k in artifact.head_program.ravel():
        k = int(k)
        if k not in cache:
            cache[k] = artifact.programs[k].density(length, length, B)
        vals.append(cache[k])
    return float(np.mean(vals))


def streaming_artifact(like: Artifact, length: int, density: float, block_size: int | None = None) -> Artifact:
    """A StreamingLLM-style artifact for ``like``'s model: every head ``sink=B, window=w·B``,
    ``w`` chosen so the block density at ``length`` is the one closest to ``density``."""
    if not 0.0 < density <= 1.0:
        raise DamRuntimeError(f"density must lie in (0, 1], got {density}")
    B = block_size or like.block_size
    nb = -(-length // B)
    best: tuple[float, MaskProgram] | None = None
    for w in range(0, nb + 1):
        p = MaskProgram(sink=B, window=w * B)
        d = p.density(length, length, B)
        if best is None or abs(d - density) < abs(best[0] - density):
            best = (d, p)
        if d >= density:
            break
    assert best is not None
    meta = {"model": dict(like.metadata.get("model", {})), "method": "streaming",
            "streaming": {"length": length, "target_density": density, "density": best[0],
                          "sink": best[1].sink, "window": best[1].window}}
    return Artifact(programs=(best[1],), head_program=np.zeros_like(like.head_program), block_size=B,
                    metadata=meta)


class OracleHook:
    """``layout_hook`` giving, per input and head, the fewest heaviest blocks reaching ``target_recall``.

    The recall of a head is ``sum(kept mass) / Nq`` (each query row sums to 1); the diagonal
    blocks are always kept and count toward it. Needs batch 1 and prefill (``q_len == kv_len``
    is not required; queries are the last ``q_len``).
    """

    def __init__(self, handle, target_recall: float, max_elements: int = 1 << 24) -> None:
        if not 0.0 < target_recall <= 1.0:
            raise DamRuntimeError(f"target_recall must lie in (0, 1], got {target_recall}")
        self.handle = handle
        self.target_recall = float(target_recall)
        self.max_elements = max_elements

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, layout: BlockLayout) -> BlockLayout:
        if q.shape[0] != 1:
            raise DamRuntimeError("the oracle baseline runs batch 1")
        B = layout.block_m
        nq, nk = q.shape[2], k.shape[2]
        scale = self.handle.scaling(layer)
        mass = block_mass(q, k, scale, B, self.max_elements, softcap=self.handle.softcap(layer))[0]  # [H, nqb, nkb]
        return BlockLayout.from_block_mask(oracle_mask(mass, nq, nk, B, self.target_recall)[None].to(q.device), B, B)


def oracle_mask(mass: torch.Tensor, nq: int, nk: int, B: int, target_recall: float) -> torch.Tensor:
    """bool ``[H, nQB, nKB]``: diagonal blocks plus the heaviest causal blocks of ``mass``
    (float64 ``[H, nQB, nKB]``) until each head holds ``target_recall * nq`` of mass."""
    H, nqb, nkb = mass.shape
    causal = causal_block_mask(nq, nk, B)
    diag = diagonal_block_mask(nq, nk, B)
    need = target_recall * nq - (mass * diag).sum((-1, -2))  # [H]
    cand = torch.where(causal & ~diag, mass, torch.full_like(mass, -1.0)).reshape(H, -1)
    vals, order = cand.sort(-1, descending=True)
    cum = vals.clamp(min=0).cumsum(-1)
    # number of extra blocks: first index where cum >= need (relative slack for rounding)
    take = (cum < (need[:, None] - 1e-12 * nq)).sum(-1) + 1
    take = torch.where(need <= 0, torch.zeros_like(take), take)
    take = torch.minimum(take, (vals >= 0).sum(-1))
    keep = torch.arange(vals.shape[-1])[None, :] < take[:, None]
    flat = torch.zeros_like(cand, dtype=torch.bool)
    flat.scatter_(-1, order, keep)
    return flat.reshape(H, nqb, nkb) | diag[None]


def _base_mask(nq: int, nk: int, B: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool ``[nQB, nKB]``: the blocks every vertical-slash baseline keeps (diagonal + first key block)."""
    causal = causal_block_mask(nq, nk, B, device)
    return diagonal_block_mask(nq, nk, B, device) | (causal & (torch.arange(causal.shape[1], device=device) == 0))


class MInferenceHook:
    """``layout_hook``: MInference-style vertical + slash blocks estimated from the last queries.

    Per head: exact softmax of the last ``last_q`` queries over all causal keys, summed over
    those queries, pooled into key-block scores (verticals) and block-offset scores (slashes:
    element offset ``i - j`` pooled to ``(i - j) // B``). Candidates are ranked by score per
    causal block they add; the shortest prefix whose block mask reaches ``density`` (of the
    causal blocks) is kept, with the diagonal and the first key block always in.
    """

    def __init__(self, handle, density: float, last_q: int = LAST_QUERY_QUERIES) -> None:
        if not 0.0 < density <= 1.0:
            raise DamRuntimeError(f"density must lie in (0, 1], got {density}")
        if last_q < 1:
            raise DamRuntimeError(f"last_q must be positive, got {last_q}")
        self.handle = handle
        self.density = float(density)
        self.last_q = int(last_q)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, layout: BlockLayout) -> BlockLayout:
        if q.shape[0] != 1:
            raise DamRuntimeError("the MInference-style baseline runs batch 1")
        B = layout.block_m
        scale = self.handle.scaling(layer)
        mask = minference_mask(q, k, scale, B, self.density, self.last_q)
        return BlockLayout.from_block_mask(mask[None].to(q.device), B, B)


def minference_mask(q: torch.Tensor, k: torch.Tensor, scale: float, B: int, density: float,
                    last_q: int = LAST_QUERY_QUERIES) -> torch.Tensor:
    """bool ``[H, nQB, nKB]`` (see :class:`MInferenceHook`); q ``[1, Hq, Nq, D]``, k ``[1, Hkv, Nk, D]``."""
    _, Hq, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    n = min(last_q, nq)
    qpos = torch.arange(nk - n, nk, device=q.device)
    s = torch.matmul((q[0, :, -n:].float() * scale).reshape(Hkv, G, n, D),
                     k[0].float()[:, None].transpose(-1, -2)).reshape(Hq, n, nk)
    j = torch.arange(nk, device=q.device)
    s = s.masked_fill(j[None, None, :] > qpos[None, :, None], float("-inf"))
    p = torch.softmax(s, -1).double().cpu()  # [H, n, nk]
    nqb, nkb = -(-nq // B), -(-nk // B)
    vert = p.sum(1)  # [H, nk]
    vert = torch.nn.functional.pad(vert, (0, nkb * B - nk)).reshape(Hq, nkb, B).sum(-1)  # [H, nkb]
    off = (qpos.cpu()[:, None] - j.cpu()[None, :]).clamp(min=0)  # [n, nk]
    boff = (off // B).expand(Hq, n, nk).reshape(Hq, -1)
    slash = torch.zeros(Hq, nkb, dtype=torch.float64).scatter_add_(1, boff, p.reshape(Hq, -1))
    causal = causal_block_mask(nq, nk, B)
    qb_first = (nk - nq) // B + torch.arange(nqb)  # key block of each query block's first query
    blk_off = (qb_first[:, None] - torch.arange(nkb)[None, :])  # [nqb, nkb] block offset a - b
    base = _base_mask(nq, nk, B)
    total = int(causal.sum())
    # candidates: verticals c (column c of causal), slashes d (block offset d of causal)
    vcost = causal.sum(0).double()  # [nkb]
    scost = torch.stack([(causal & (blk_off == d)).sum() for d in range(nkb)]).double()
    out = torch.empty(Hq, nqb, nkb, dtype=torch.bool)
    for h in range(Hq):
        score = torch.cat([vert[h] / vcost.clamp(min=1), slash[h] / scost.clamp(min=1)])
        score = torch.where(torch.cat([vcost, scost]) > 0, score, torch.full_like(score, -1.0))
        order = score.argsort(descending=True).tolist()

        def build(m: int, order=order) -> torch.Tensor:
            sel = order[:m]
            cols = torch.zeros(nkb, dtype=torch.bool)
            offs = torch.zeros(nkb, dtype=torch.bool)
            for c in sel:
                if c < nkb:
                    cols[c] = True
                else:
                    offs[c - nkb] = True
            offmask = offs[blk_off.clamp(min=0, max=nkb - 1)] & (blk_off >= 0)
            return base | (causal & (cols[None, :] | offmask))

        lo, hi = 0, len(order)
        while lo < hi:  # smallest prefix reaching the density
            mid = (lo + hi) // 2
            if int(build(mid).sum()) >= density * total:
                hi = mid
            else:
                lo = mid + 1
        out[h] = build(lo)
    return out


class ElementVSHook:
    """``layout_hook``: the diagonal and first key block plus DAM's element-level last-query
    estimate (:func:`dam.runtime.estimate.last_query_mask`) alone, no static program, with the
    budget that brings each head to ``density`` of the causal blocks. It isolates what the
    estimator contributes: DAM's programs + estimate against this at equal density measures what
    the programs add. Batch 1, queries = the last ``Nq`` of ``Nk`` positions.
    """

    def __init__(self, handle, density: float, last_q: int = LAST_QUERY_QUERIES) -> None:
        if not 0.0 < density <= 1.0:
            raise DamRuntimeError(f"density must lie in (0, 1], got {density}")
        self.handle = handle
        self.density = float(density)
        self.last_q = int(last_q)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, layout: BlockLayout) -> BlockLayout:
        from ..estimate import last_query_scores, select_blocks

        if q.shape[0] != 1:
            raise DamRuntimeError("the element vertical-slash baseline runs batch 1")
        B = layout.block_m
        nq, nk, H = q.shape[2], k.shape[2], q.shape[1]
        causal = causal_block_mask(nq, nk, B, q.device)
        cur = _base_mask(nq, nk, B, q.device)[None, None].expand(1, H, -1, -1)
        heads = torch.arange(H, device=q.device)
        vert, slash = last_query_scores(q, k, heads, self.last_q, self.handle.scaling(layer))
        total = float(causal.sum()) * H

        def run(frac: float) -> torch.Tensor:
            return cur | select_blocks(vert, slash, cur, frac, nq, B)

        # the budget is an upper bound (the ranked prefix stops at the first element that does not
        # fit): bisect the fraction to the smallest one whose mean density reaches the target
        lo, hi = 0.0, 1.0
        best = run(hi)
        for _ in range(10):
            mid = (lo + hi) / 2
            m = run(mid)
            if float(m.sum()) / total >= self.density:
                hi, best = mid, m
            else:
                lo = mid
        return BlockLayout.from_block_mask(best, B, B)


__all__ = ["ElementVSHook", "MInferenceHook", "OracleHook", "causal_block_mask", "diagonal_block_mask",
           "mean_artifact_density", "minference_mask", "oracle_mask", "streaming_artifact"]
