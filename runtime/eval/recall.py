"""Measured recall of the layouts the runtime actually runs.

``measure_recall(model, handle, input_ids)`` runs one DAM forward with a ``layout_hook`` that, per
layer, computes the exact causal attention probabilities of the call's (post-RoPE) queries and keys
in query chunks (never ``[H, N, N]`` at once: at most ``max_elements`` scores per chunk; float32
softmax and per-block row sums, float64 beyond), pools them into ``B x B`` blocks and scores the layout it was given:

* ``recall [L, H]``: attention mass inside the kept blocks (block mask and causal), averaged over
  query rows, i.e. ``sum_{kept (a, b)} mass[a, b] / Nq`` where ``mass[a, b]`` is the summed
  probability of query block ``a``'s rows on key block ``b`` (each row sums to 1). This is the
  runtime's counterpart of the compiler's ``recall`` (block mass at the profiled length).
* ``static_recall [L, H]``: the same for the static part alone (the artifact's programs without
  the dynamic blocks), so the dynamic selector's contribution is visible.
* ``oracle_recall [L, H]``: static blocks plus, per query block, as many extra blocks as the
  layout really added, chosen heaviest first by the *true* mass: what a perfect dynamic selector
  with the same budget would reach (equals ``recall`` for static heads).
* ``density [L, H]``: kept causal blocks / causal blocks (query-block rows weighted equally
  by their causal block count, i.e. total kept / total causal).
* ``row_recall [L, H, nQB]``: per query block, the recall of its rows (for length trends).

``query_stride`` s > 1 measures the recalls on a systematic sample of the query blocks (the last
one and every s-th before it), s times cheaper; density stays exact.

The layout is returned unchanged (a hook set before is chained: it runs first and what it returns
is measured), so the forward is the DAM forward and its logits can be compared with dense ones.

Imports only torch and dam (runtime rules).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dam.kernels import BlockLayout
from dam.kernels.reference import softcap_scores

from ..errors import DamRuntimeError
from ..integration import DamHandle
from ..planner import static_block_mask
from .logits import forward_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LayerRecall:
    """One layer's figures (float64 tensors on the CPU; H = query heads)."""

    recall: torch.Tensor  # [H]
    static_recall: torch.Tensor  # [H]
    oracle_recall: torch.Tensor  # [H]
    density: torch.Tensor  # [H]
    static_density: torch.Tensor  # [H]
    row_recall: torch.Tensor  # [H, nQB]


@dataclass(frozen=True, eq=False)
class RecallReport:
    """Measured per-(layer, head) figures of one DAM forward over ``input_ids [1, N]``.

    recall, static_recall, oracle_recall, density, static_density: float64 ``[L, H]``
    (NaN for layers that ran dense SDPA because ``N < min_length``; ``measured [L]`` says which).
    row_recall: float64 ``[L, H, nQB]``. logits: the DAM forward's logits ``[N, V]`` (a tensor, or
    :class:`~dam.runtime.eval.logits.LazyLogits` for long sequences of large vocabularies) when
    asked for (``keep_logits``), else None.
    """

    recall: torch.Tensor
    static_recall: torch.Tensor
    oracle_recall: torch.Tensor
    density: torch.Tensor
    static_density: torch.Tensor
    row_recall: torch.Tensor
    measured: torch.Tensor
    length: int
    block_size: int
    logits: torch.Tensor | None = None

    def _mean(self, t: torch.Tensor) -> float:
        m = t[self.measured]
        return float(m.mean()) if m.numel() else float("nan")

    @property
    def mean_recall(self) -> float:
        return self._mean(self.recall)

    @property
    def mean_static_recall(self) -> float:
        return self._mean(self.static_recall)

    @property
    def mean_oracle_recall(self) -> float:
        return self._mean(self.oracle_recall)

    @property
    def mean_density(self) -> float:
        return self._mean(self.density)

    def summary(self) -> dict:
        """Plain-float means (JSON-ready)."""
        return {
            "length": self.length, "block_size": self.block_size,
            "mean_recall": self.mean_recall, "mean_static_recall": self.mean_static_recall,
            "mean_oracle_recall": self.mean_oracle_recall, "mean_density": self.mean_density,
            "mean_static_density": self._mean(self.static_density),
            "min_recall": float(self.recall[self.measured].min()) if self.measured.any() else float("nan"),
            "layers_measured": int(self.measured.sum()),
        }


def block_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int,
               max_elements: int = 1 << 24, query_stride: int = 1, softcap: float | None = None) -> torch.Tensor:
    """Exact causal attention mass pooled into blocks, float64 ``[Bt, Hq, nQB, nKB]``.

    ``q [Bt, Hq, Nq, D]`` are the last ``Nq`` of ``Nk`` positions, ``k [Bt, Hkv, Nk, D]`` (GQA by
    index, never repeated). Entry ``[b, h, a, c]`` is the summed softmax probability of query
    block ``a``'s rows on key block ``c`` (each query row sums to 1). With ``query_stride`` s > 1
    only every s-th query block is computed (the last block and every s-th before it; the other
    rows of the result are 0): a systematic sample of the query rows, s times cheaper. Computed per
    chunk of query blocks (at most ``max_elements`` scores per chunk), scores, softmax and each
    row's sum over one key block (B terms) in float32 (float64 for float64 inputs), the sums over
    rows and chunks in float64. ``softcap``: the model's attention-logit soft-capping, applied to
    the scaled scores as the model does.
    """
    Bt, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hq % Hkv or Nq > Nk:
        raise DamRuntimeError(f"need Hq % Hkv == 0 and Nq <= Nk, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if query_stride < 1:
        raise DamRuntimeError(f"query_stride must be >= 1, got {query_stride}")
    B = block_size
    G = Hq // Hkv
    nqb, nkb = -(-Nq // B), -(-Nk // B)
    off = Nk - Nq
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    per_chunk = max(1, (max_elements // max(1, Bt * Hq * Nk)) // B)  # query blocks per chunk
    picked = list(range(nqb - 1, -1, -query_stride))[::-1]
    out = torch.zeros((Bt, Hq, nqb, nkb), dtype=torch.float64)
    kf = k.to(cdt)
    for c0 in range(0, len(picked), per_chunk):
        blocks = torch.tensor(picked[c0:c0 + per_chunk])
        idx = (blocks[:, None] * B + torch.arange(B)[None, :]).reshape(-1)
        idx = idx[idx < Nq]  # the last block may be partial
        r = idx.numel()
        pos = (off + idx).to(q.device)  # each row's absolute position
        kb = -(-(int(pos[-1]) + 1) // B)  # keys past the chunk's last query are masked: stop at their block
        kcut = min(kb * B, Nk)
        rows = q[:, :, idx[0]:idx[-1] + 1] if query_stride == 1 else q.index_select(2, idx.to(q.device))
        qc = rows.to(cdt).reshape(Bt, Hkv, G, r, D)
        s = torch.matmul(qc * scale, kf[:, :, None, :kcut].transpose(-1, -2))  # [Bt,Hkv,G,r,kcut]
        s = softcap_scores(s, softcap)
        lo = int(pos[0])  # keys before the chunk's first query are visible to every row
        fut = torch.arange(lo, kcut, device=q.device)[None, :] > pos[:, None]
        s[..., lo:].masked_fill_(fut, float("-inf"))
        p = torch.softmax(s, dim=-1).reshape(Bt, Hq, r, kcut)
        if kcut < kb * B:
            p = torch.nn.functional.pad(p, (0, kb * B - kcut))
        pk = p.reshape(Bt, Hq, r, kb, B).sum(-1).double()  # per row and key block (B terms, each <= 1)
        if r % B:
            pk = torch.nn.functional.pad(pk, (0, 0, 0, -r % B))
        pb = pk.reshape(Bt, Hq, -1, B, kb).sum(3)  # [Bt, Hq, len(blocks), kb]
        out[:, :, blocks, :kb] += pb.cpu()
    return out


def _causal_blocks(nq: int, nk: int, B: int) -> torch.Tensor:
    """bool ``[nQB, nKB]``: key block c holds a key <= the last query of query block a."""
    nqb, nkb = -(-nq // B), -(-nk // B)
    last = (nk - nq) + torch.clamp((torch.arange(nqb) + 1) * B, max=nq) - 1
    return torch.arange(nkb)[None, :] * B <= last[:, None]


def layout_recall(mass: torch.Tensor, layout: BlockLayout, static: torch.Tensor, nq: int, nk: int) -> LayerRecall:
    """Score a layout against exact block mass (batch row 0).

    Args:
        mass: float64 ``[Bt, H, nQB, nKB]`` from :func:`block_mass`.
        layout: the layout run (batch 1 or Bt, heads 1 or H).
        static: bool ``[1 or Bt, H, nQB, nKB]``, the static part of the layout.
    """
    B = layout.block_m
    m = mass[0]  # [H, nqb, nkb]
    H, nqb, nkb = m.shape
    kept = layout.block_mask(nkb)
    kept = kept[0].expand(H, nqb, nkb).cpu()
    causal = _causal_blocks(nq, nk, B)
    kept = kept & causal
    st = static[0].expand(H, nqb, nkb).cpu() & causal
    rowm = m.sum(-1)  # [H, nqb]: rows per block (each row sums to 1); 0 where not sampled
    block_rows = torch.clamp(nq - torch.arange(nqb) * B, max=B).double()  # rows per query block
    rows = (block_rows * (rowm > 0)).sum(-1)  # rows measured: nq, or a query_stride sample of them
    cap = (m * kept).sum(-1)
    row_recall = torch.where(rowm > 0, cap / rowm.clamp(min=1e-300), float("nan"))
    recall = cap.sum(-1) / rows
    static_recall = (m * st).sum(-1).sum(-1) / rows
    # oracle: static + the same number of extra blocks, heaviest first by true mass
    extra = (kept & ~st).sum(-1)  # [H, nqb]
    rem = torch.where(causal & ~st, m, torch.zeros((), dtype=m.dtype)).sort(-1, descending=True).values
    cum = torch.cat([torch.zeros((H, nqb, 1), dtype=m.dtype), rem.cumsum(-1)], -1)
    oracle_gain = cum.gather(-1, extra.unsqueeze(-1)).squeeze(-1)
    oracle_recall = ((m * st).sum(-1) + oracle_gain).sum(-1) / rows
    ncausal = causal.sum()
    return LayerRecall(
        recall=recall, static_recall=static_recall, oracle_recall=oracle_recall,
        density=kept.sum((-1, -2)).double() / ncausal, static_density=st.sum((-1, -2)).double() / ncausal,
        row_recall=row_recall,
    )


def measure_recall(
    model: torch.nn.Module,
    handle: DamHandle,
    input_ids: torch.Tensor,
    *,
    keep_logits: bool = False,
    max_elements: int = 1 << 24,
    query_stride: int = 1,
) -> RecallReport:
    """Run the DAM forward over ``input_ids [1, N]`` and measure every layer's layout.

    ``handle`` must be active on ``model``. Layers that ran dense SDPA (``N < min_length``) are
    reported as not measured (NaN). See the module docstring for the figures; with
    ``query_stride`` s > 1 the recalls are measured on every s-th query block (the last one and
    every s-th before it; ``row_recall`` is NaN on the others), density on all of them.
    """
    if not handle.active:
        raise DamRuntimeError("measure_recall needs an active DamHandle (apply(model, artifact) first)")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise DamRuntimeError(f"measure_recall takes input_ids [1, N], got {tuple(input_ids.shape)}")
    L, H = handle.artifact.num_layers, handle.artifact.num_heads
    B = handle.block_size
    N = int(input_ids.shape[1])
    results: dict[int, LayerRecall] = {}
    prev = handle.layout_hook

    def hook(layer: int, q: torch.Tensor, k: torch.Tensor, layout: BlockLayout) -> BlockLayout:
        if prev is not None:
            layout = prev(layer, q, k, layout)
        nq, nk = q.shape[2], k.shape[2]
        if nq != nk:  # chunked prefill / decode: not what this measures
            raise DamRuntimeError("measure_recall measures one-shot prefill (q_len == kv_len)")
        scale = handle.scaling(layer)
        with torch.no_grad():
            mass = block_mass(q, k, scale, B, max_elements, query_stride, handle.softcap(layer))
            planner = handle.planner(layer, q.device)
            ql = torch.tensor([nq], device=q.device)
            kl = torch.tensor([nk], device=q.device)
            static = static_block_mask(planner.table, ql, kl, -(-nq // B), -(-nk // B), B)
            results[layer] = layout_recall(mass, layout, static, nq, nk)
        return layout

    handle.layout_hook = hook
    try:
        if keep_logits:
            logits = forward_logits(model, input_ids)
        else:
            with torch.no_grad():
                model(input_ids)
    finally:
        handle.layout_hook = prev
    nqb = -(-N // B)
    nan = torch.full((L, H), float("nan"), dtype=torch.float64)
    fig = {name: nan.clone() for name in ("recall", "static_recall", "oracle_recall", "density", "static_density")}
    rows = torch.full((L, H, nqb), float("nan"), dtype=torch.float64)
    measured = torch.zeros(L, dtype=torch.bool)
    for layer, r in results.items():
        for name in fig:
            fig[name][layer] = getattr(r, name)
        rows[layer] = r.row_recall
        measured[layer] = True
    rep = RecallReport(**fig, row_recall=rows, measured=measured, length=N, block_size=B,
                       logits=logits if keep_logits else None)
    log.info("measured recall over %d layers at N=%d: mean %.4f (static %.4f, oracle %.4f), density %.4f",
             int(measured.sum()), N, rep.mean_recall, rep.mean_static_recall, rep.mean_oracle_recall,
             rep.mean_density)
    return rep


def top1_agreement(dense_logits: torch.Tensor, sparse_logits: torch.Tensor, last: int | None = None) -> float:
    """Fraction of positions (the last ``last``, or all) where the argmax tokens agree.
    Logits ``[..., N, V]``."""
    d, s = dense_logits, sparse_logits
    if last is not None:
        d, s = d[..., -last:, :], s[..., -last:, :]
    return float((d.argmax(-1) == s.argmax(-1)).double().mean())


__all__ = ["LayerRecall", "RecallReport", "block_mass", "layout_recall", "measure_recall", "top1_agreement"]
