"""The CPU path: block-sparse attention from gathered KV blocks and PyTorch's CPU flash kernel.

Prefill plan (host-side, vectorised over all (batch, head, query block) rows):

1. Each kept KV block of a row is *full* (every query row of the block sees every key: below
   the causal boundary and inside ``Nk``), *partial* (crosses the causal boundary or the ragged
   KV tail) or *hidden* (entirely above the boundary: dropped). Sorted indices put the full
   blocks first, then the partial ones, then the hidden ones.
2. Rows are grouped by a signature ``(n_full, n_partial, per partial block: offset of the
   query block to the key block, valid keys)``. All rows of a group have *the same* element
   mask ``[block_m, L]`` (all-visible for full blocks), so one small mask broadcast over the
   group serves them all, and groups without partial blocks need no mask at all.
3. Per group, in chunks of rows bounded in bytes (so the gathered tiles stay in cache), the
   query blocks and the kept K/V blocks are gathered with ``index_select`` into reused buffers
   (``[R, 1, L, D]``) and PyTorch's fused CPU flash kernel
   (``aten._scaled_dot_product_flash_attention_for_cpu``, which also returns the LSE) runs
   them as one batch; results are written back with ``index_copy_``.

Dense prefixes: with ``Nq == Nk`` (or non-causal), the leading query blocks of a head that keep
every visible block (a dense head, the first rows of a wide window) run as one fused flash call
over the head's contiguous Q/K/V prefix instead (no gathers, the kernel's big query tiles).

Decode gathers the kept blocks' tokens straight from the cache (no padded or converted copy of
the whole cache per step).

GQA: when every query head of a group has the same layout rows as the group's first head (the
usual case when the planner works per KV head), the ``g`` query heads are stacked into one
``[g * block_m, D]`` query tile per row, so each gathered K/V tile serves the whole group.
Otherwise the blocks the group's heads keep in common run stacked that way, the blocks they
keep apart run per head (query head ``h`` reads KV head ``h // g``), and the two results are
merged by LSE (when a cost model says the stacking pays). K/V are never repeated.

Dtypes: everything runs in the inputs' dtype (bf16/fp16 are never up-cast; the fused kernel
accumulates in fp32 and keeps fp32 softmax statistics); LSE comes back in float32.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from .layout import BlockLayout, LayoutError
from .reference import softcapped_attention

_CHUNK_BYTES = 6 << 20  # gathered K+V bytes per chunk (measured: 6 MB beats 1-2 MB and 16-24 MB)


def _flash():
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _fused(q, k, v, *, scale: float, softcap: float | None = None, attn_mask=None, is_causal: bool = False):
    """``(out [R, H, M, D] in q's dtype, lse float32 [R, H, M])`` of one batch of gathered tiles:
    the fused CPU flash kernel, or, with attention-logit soft-capping (Gemma 2), the same from
    explicit scores (:func:`dam.kernels.reference.softcapped_attention`): the fused kernel has no
    score hook; the tiles are the kept blocks, so the work stays sparse.
    ``attn_mask``: additive, broadcast to ``[R, H, M, L]``; ``is_causal``: top-left aligned."""
    if softcap is None:
        return _flash()(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return softcapped_attention(q, k, v, scale=scale, softcap=softcap, attn_mask=attn_mask, is_causal=is_causal)


def _pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, H, N, D] -> contiguous [B, H, n, D] (zero-padded when n > N), in x's dtype."""
    if x.shape[2] == n:
        return x.contiguous()
    out = x.new_zeros((x.shape[0], x.shape[1], n, x.shape[3]))
    out[:, :, : x.shape[2]] = x
    return out


def _expand_layout(layout: BlockLayout, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = layout.kv_indices.to("cpu", torch.int64)
    cnt = layout.kv_counts.to("cpu", torch.int64)
    idx = idx.expand(b, h, *idx.shape[2:])
    cnt = cnt.expand(b, h, cnt.shape[2])
    return idx, cnt


def _gqa_shared(layout: BlockLayout, hq: int, hkv: int) -> bool:
    """True when all query heads of each KV group share their layout rows (or there is one head)."""
    g = hq // hkv
    if g == 1:
        return False
    if layout.heads == 1:
        return True
    idx = layout.kv_indices.view(layout.batch, hkv, g, *layout.kv_indices.shape[2:])
    cnt = layout.kv_counts.view(layout.batch, hkv, g, layout.num_q_blocks)
    return bool((idx == idx[:, :, :1]).all()) and bool((cnt == cnt[:, :, :1]).all())


def attention_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    softcap: float | None = None,
) -> None:
    """Block-sparse prefill on CPU tensors, written into ``out`` and ``lse`` (None: not needed).

    Runs in the inputs' own dtype (bf16/fp16/fp32/fp64: the fused kernel accumulates and keeps its
    softmax statistics in fp32 inside). With GQA, the query heads of a KV head that keep the same
    blocks run stacked (one ``[g * block_m, D]`` query tile per KV block set, see
    :func:`_gqa_split`); what the heads keep apart runs per head; both are merged by LSE.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` (they and the layout are checked by the
            launcher).
        out: ``[B, Hq, Nq, D]`` in q's dtype; lse: float32 ``[B, Hq, Nq]`` (fully overwritten).
        softcap: attention-logit soft-capping (see :func:`_fused`), None: none.
    """
    hq, nq = q.shape[1], q.shape[2]
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    kw = dict(causal=causal, scale=scale, softcap=softcap)
    if _gqa_shared(layout, hq, hkv):
        _attend(q, k, v, _kv_head_rows(layout, g), True, out=out, lse=lse, **kw)
        return
    split = _gqa_split(layout, g, nq, nk, causal) if g > 1 else None
    if split is None:
        _attend(q, k, v, layout, False, out=out, lse=lse, **kw)
        return
    common, resid = split
    sdt = _stat_dtype(q.dtype)
    if resid is None:
        _attend(q, k, v, common, True, out=out, lse=lse, **kw)
        return
    lse_c = torch.empty(q.shape[:3], dtype=sdt)
    out_c = torch.empty_like(out)
    _attend(q, k, v, common, True, out=out_c, lse=lse_c, **kw)
    lse_r = torch.empty(q.shape[:3], dtype=sdt)
    _attend(q, k, v, resid, False, out=out, lse=lse_r, **kw)
    _merge_into(out, lse_r, out_c, lse_c, lse)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of softmax statistics (LSE): float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kv_head_rows(layout: BlockLayout, g: int) -> BlockLayout:
    """A GQA-shared layout (heads 1 or Hq) as one row set per KV head (heads 1 or Hkv)."""
    if layout.heads == 1:
        return layout
    return BlockLayout(layout.kv_indices[:, ::g].contiguous(), layout.kv_counts[:, ::g].contiguous(),
                       layout.block_m, layout.block_n)


#: relative throughput model of the fused CPU kernel for M query rows per problem: M / (M + _M_HALF)
_M_HALF = 230


def _gqa_split(layout: BlockLayout, g: int, nq: int, nk: int, causal: bool):
    """Split a GQA layout into what the ``g`` query heads of each KV head keep in common and the
    rest. The common part runs as a layout shared by the group (``g * block_m`` query rows per
    problem, each gathered K/V tile read once for the group: the fused kernel's throughput grows
    with the rows), the rest per head; the caller merges the two by LSE. Chosen by a cost model
    (blocks x (rows + _M_HALF), i.e. work / throughput(rows)) against running every head alone.

    Returns:
        ``None`` when it would not pay, else ``(common layout [Bl, Hkv, nQB, .], residual layout
        [Bl, Hq, nQB, .] or None when the heads keep nothing apart)``.
    """
    bm, bn = layout.block_m, layout.block_n
    nqb, nkb = layout.num_q_blocks, -(-nk // bn)
    m = layout.block_mask(nkb)  # [Bl, H, nqb, nkb]
    Bl, H = m.shape[0], m.shape[1]
    if causal:  # blocks no query of the block can see are not kept by anyone
        a = torch.arange(nqb)
        qe = nk - nq + torch.clamp((a + 1) * bm, max=nq) - 1  # last query of each block
        m = m & ((torch.arange(nkb) * bn).view(1, -1) <= qe.view(-1, 1))
    common = m.view(Bl, H // g, g, nqb, nkb).all(2)  # [Bl, Hkv, nqb, nkb]
    resid = m & ~common.repeat_interleave(g, 1)
    total, nc, nr = int(m.sum()), int(common.sum()), int(resid.sum())
    if nc == 0 or nc * (g * bm + _M_HALF) + nr * (bm + _M_HALF) >= total * (bm + _M_HALF):
        return None
    lay_c = BlockLayout.from_block_mask(common, bm, bn)
    lay_r = BlockLayout.from_block_mask(resid, bm, bn) if nr else None
    return lay_c, lay_r


def _merge_into(out: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                lse: torch.Tensor | None) -> None:
    """``out`` (holding part a) := the merge of parts a and b by their LSEs, in place: part b's
    share is ``sigmoid(lse_b - lse_a)`` (0 when b is empty, 1 when a is), one ``lerp`` pass in
    out's dtype (the weight rounded to it: an error of the order of out's own rounding)."""
    wb = torch.sigmoid(lse_b - lse_a).nan_to_num_(0.0)  # both empty: nan -> 0 (both outputs 0)
    out.lerp_(out_b, wb.unsqueeze(-1).to(out.dtype))
    if lse is not None:
        torch.logaddexp(lse_a, lse_b, out=lse)


def _attend(q, k, v, layout: BlockLayout, shared: bool, *, causal: bool, scale: float,
            out: torch.Tensor, lse: torch.Tensor | None, softcap: float | None = None) -> None:
    """The row-grouped prefill of one layout. ``shared``: the layout has one row set per KV head
    (heads 1 or Hkv) and its query tiles stack the KV head's ``g`` query heads."""
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    bm, bn = layout.block_m, layout.block_n
    nqb, nkb = -(-nq // bm), -(-nk // bn)
    cdt = q.dtype
    sdt = _stat_dtype(cdt)
    g = hq // hkv
    # "virtual heads": with a shared GQA layout, a row is (b, kv head, query block) and its
    # query tile stacks the g heads' query blocks ([g * bm, D]); otherwise a row is (b, h, a).
    vh = hkv if shared else hq
    gq = g if shared else 1
    idx, cnt = _expand_layout(layout, bsz, vh)  # [B, vh, nqb, mb], [B, vh, nqb]
    mb = idx.shape[-1]

    n_keep, sig, pmax, qe = _row_signatures(idx, cnt, nq, nk, bm, bn, causal)
    rows_total = bsz * vh * nqb

    rows_q = bm * gq
    # write straight into out/lse when their memory is the row layout we compute in
    direct = (
        gq == 1 and nq == nqb * bm and out.dtype == cdt and out.is_contiguous()
        and (lse is None or (lse.dtype == sdt and lse.is_contiguous()))
    )
    if direct:
        out_rows = out.view(rows_total, rows_q * d)
        lse_rows = None if lse is None else lse.view(rows_total, rows_q)
    else:
        res = torch.empty((bsz, vh, nqb, gq, bm, d), dtype=cdt)
        res_lse = torch.empty((bsz, vh, nqb, gq, bm), dtype=sdt)
        out_rows, lse_rows = res.view(rows_total, rows_q * d), res_lse.view(rows_total, rows_q)
    dense_pre, n_keep = _dense_prefix(n_keep, qe, nkb, bn, causal=causal, square=nq == nk)
    nonempty_mask = n_keep.reshape(-1) > 0
    empty_mask = n_keep.reshape(-1) == 0
    empty_rows = empty_mask.nonzero().squeeze(1)
    if empty_rows.numel():
        out_rows.index_fill_(0, empty_rows, 0.0)
        if lse_rows is not None:
            lse_rows.index_fill_(0, empty_rows, float("-inf"))
    nonempty = nonempty_mask.nonzero().squeeze(1)
    if nonempty.numel():
        # query tiles: [B, vh, nqb, gq, bm, D] -> flat rows of gq*bm*D
        qp = _pad_rows(q, nqb * bm).view(bsz, vh, gq, nqb, bm, d).transpose(2, 3)
        qrows = qp.reshape(rows_total, rows_q * d)
        kp = _pad_rows(k, nkb * bn).view(bsz * hkv * nkb, bn * d)
        vp = _pad_rows(v, nkb * bn).view(bsz * hkv * nkb, bn * d)
        # KV block base per row: (b * hkv + h_kv) * nkb
        hk = torch.arange(vh) // (1 if shared else g)
        base = ((torch.arange(bsz).view(-1, 1) * hkv + hk.view(1, -1)) * nkb).view(bsz, vh, 1)
        gidx = (idx.clamp_min(0) + base.unsqueeze(-1)).reshape(rows_total, mb)
        _run_groups(
            sig[nonempty], nonempty, gidx, qrows, kp, vp, out_rows, lse_rows,
            bm=bm, bn=bn, gq=gq, d=d, scale=scale, causal=causal, pmax=pmax, cdt=cdt, softcap=softcap,
        )
    if not direct:
        out.copy_(res.transpose(2, 3).reshape(bsz, hq, nqb * bm, d)[:, :, :nq])
        if lse is not None:
            lse.copy_(res_lse.transpose(2, 3).reshape(bsz, hq, nqb * bm)[:, :, :nq])
    if dense_pre is not None:
        _dense_prefixes(q, k, v, dense_pre, gq, hq // hkv, bm, causal=causal, scale=scale,
                        out=out, lse=lse, softcap=softcap)


def _row_signatures(idx, cnt, nq: int, nk: int, bm: int, bn: int, causal: bool):
    """Per row (b, head, query block) of a layout: the kept (visible) block count and the group
    signature ``(n_full, n_partial, per partial slot (offset of the query block to the key block,
    valid keys); -1 padding)``. -> ``(n_keep [B, vh, nqb], sig [rows, 2 + 2 * pmax], pmax,
    qe [1, 1, nqb, 1] last query position of each block)``."""
    mb, nqb = idx.shape[-1], idx.shape[2]
    off = nk - nq
    active = torch.arange(mb) < cnt.unsqueeze(-1)
    kstart = idx * bn
    kvalid = (nk - kstart).clamp(max=bn)  # keys present in the block
    a = torch.arange(nqb)
    qs = (off + a * bm).view(1, 1, nqb, 1)  # absolute position of the block's first query row
    qe = (off + torch.clamp((a + 1) * bm, max=nq) - 1).view(1, 1, nqb, 1)
    if causal:
        hidden = kstart > qe
        full = (kstart + bn - 1 <= qs) & (kvalid == bn)
    else:
        hidden = torch.zeros_like(active)
        full = kvalid == bn
    keep = active & ~hidden
    n_keep = keep.sum(-1)  # kept blocks are a prefix (sorted indices, hidden ones are last)
    n_full = (keep & full).sum(-1)
    n_part = n_keep - n_full
    pmax = int(n_part.max()) if n_part.numel() else 0
    rows_total = n_keep.numel()
    sig_cols = [n_full.reshape(-1, 1), n_part.reshape(-1, 1)]
    if pmax:  # partial slots start at n_full
        pos = n_full.unsqueeze(-1) + torch.arange(pmax)
        posc = pos.clamp(max=mb - 1)
        okp = torch.arange(pmax) < n_part.unsqueeze(-1)
        delta = qs - torch.gather(kstart, -1, posc)  # [B, vh, nqb, pmax]
        kv_p = torch.gather(kvalid, -1, posc)
        delta = torch.where(okp, delta, torch.full_like(delta, -(1 << 40)))
        kv_p = torch.where(okp, kv_p, torch.full_like(kv_p, -1))
        sig_cols += [delta.reshape(rows_total, pmax), kv_p.reshape(rows_total, pmax)]
    return n_keep, torch.cat(sig_cols, dim=1), pmax, qe


def _dense_prefix(n_keep, qe, nkb: int, bn: int, *, causal: bool, square: bool):
    """The leading query blocks of a head that keep every visible block (a whole dense head, or the
    first rows of a wide window) run as one fused flash call per head, no gathers, with the
    kernel's big query tiles (causal only when Nq == Nk, ``square``: ATen's causal mask is top-left
    aligned). -> ``(dense_pre [B, vh] prefix lengths in query blocks, or None; n_keep with the
    prefix rows set to -1: neither empty nor sparse)``."""
    if causal and not square:
        return None, n_keep
    nqb = n_keep.shape[-1]
    vis = torch.clamp(qe.view(1, 1, nqb) // bn + 1, max=nkb) if causal else nkb
    pre = (n_keep == vis).to(torch.int64).cumprod(-1)  # [B, vh, nqb]: 1 on the dense prefix
    if not bool(pre[..., 0].any()):
        return None, n_keep
    return pre.sum(-1), n_keep.masked_fill(pre.bool(), -1)


def _dense_prefixes(q, k, v, dense_pre, gq, g, bm, *, causal, scale, out, lse, softcap=None) -> None:
    """Rows ``[0, dense_pre[b, vh] * bm)`` of the query heads of virtual head ``vh`` keep every
    visible key: one fused flash call per (batch entry, prefix length) over those heads."""
    nq, nk = q.shape[2], k.shape[2]
    for b in range(q.shape[0]):
        for p in torch.unique(dense_pre[b]).tolist():
            if p == 0:
                continue
            vhs = (dense_pre[b] == p).nonzero().squeeze(1)
            hs = (vhs.view(-1, 1) * gq + torch.arange(gq)).reshape(-1)  # query heads
            kh = hs // g
            rows = min(p * bm, nq)
            keys = min(rows, nk) if causal else nk  # causal implies Nq == Nk here
            qb = q[b, :, :rows].index_select(0, hs).unsqueeze(0)
            kb = k[b, :, :keys].index_select(0, kh).unsqueeze(0)
            vb = v[b, :, :keys].index_select(0, kh).unsqueeze(0)
            o, lz = _fused(qb, kb, vb, is_causal=causal, scale=scale, softcap=softcap)
            out[b, :, :rows].index_copy_(0, hs, o[0])
            if lse is not None:
                lse[b, :, :rows].index_copy_(0, hs, lz[0].to(lse.dtype))


def _group_mask(row_sig: list[int], bm: int, bn: int, gq: int, causal: bool, pmax: int,
                cdt: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Element mask for one signature: (additive mask [gq*bm, L] or None, empty query rows or None)."""
    nf, np_ = row_sig[0], row_sig[1]
    if np_ == 0:
        return None, None
    deltas = row_sig[2 : 2 + pmax][:np_]
    kvs = row_sig[2 + pmax : 2 + 2 * pmax][:np_]
    r = torch.arange(bm).view(bm, 1)
    c = torch.arange(bn).view(1, bn)
    vis = [torch.ones(bm, nf * bn, dtype=torch.bool)]
    for dl, kv in zip(deltas, kvs, strict=True):
        m = c < kv
        if causal:
            m = m & (c - r <= dl)
        vis.append(m.expand(bm, bn))
    vis_t = torch.cat(vis, dim=1)  # [bm, L]
    empty = ~vis_t.any(dim=1)
    add = torch.zeros(vis_t.shape, dtype=cdt).masked_fill_(~vis_t, float("-inf"))
    if empty.any():
        add = add.masked_fill(empty.view(bm, 1), 0.0)  # avoid all -inf rows; zeroed afterwards
        empty = empty.repeat(gq)
    else:
        empty = None
    return add.repeat(gq, 1), empty


def _unique_rows(sig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Group the rows of an int64 ``[R, C]`` signature table: (unique rows, inverse, the row
    order that sorts rows by group (stable), rows per group). Each column is ranked and the ranks
    are packed into one int64 key (``torch.unique(dim=0)`` compares rows one by one: measured
    3-4 ms per call at 4K-8K); falls back to it when the packed key would overflow."""
    key = torch.zeros(sig.shape[0], dtype=torch.int64)
    span = 1
    for c in range(sig.shape[1]):
        vals, rank = torch.unique(sig[:, c], return_inverse=True)
        span *= vals.numel()
        if span >= 1 << 62:
            uniq, inv = torch.unique(sig, dim=0, return_inverse=True)
            break
        key = key * vals.numel() + rank
    else:
        _, inv = torch.unique(key, return_inverse=True)
        uniq = None
    order = torch.argsort(inv, stable=True)
    counts_t = torch.bincount(inv)
    if uniq is None:
        starts = torch.cumsum(counts_t, 0) - counts_t
        uniq = sig[order[starts]]
    return uniq, inv, order, counts_t.tolist()


def _run_groups(sig, rows, gidx, qrows, kp, vp, out_rows, lse_rows, *, bm, bn, gq, d, scale,
                causal, pmax, cdt, softcap=None) -> None:
    """Run every signature group: per chunk of rows, gather Q/K/V into reused buffers, one fused
    flash call, scatter the rows' results into ``out_rows``/``lse_rows`` (may be None)."""
    uniq, inv, order, counts = _unique_rows(sig)
    rows_sorted = rows[order]
    gidx_sorted = gidx.index_select(0, rows_sorted)
    itemsize = torch.finfo(cdt).bits // 8
    max_nblk = int((uniq[:, 0] + uniq[:, 1]).max())
    buf_blocks = max(max_nblk, _CHUNK_BYTES // (2 * d * bn * itemsize))
    tasks = []  # (first sorted row, rows, blocks per row, group mask, empty query rows)
    start = 0
    for gi, n in enumerate(counts):
        row_sig = uniq[gi].tolist()
        nblk = row_sig[0] + row_sig[1]
        mask, empty = _group_mask(row_sig, bm, bn, gq, causal, pmax, cdt)
        chunk = max(1, min(n, buf_blocks // nblk))
        for c0 in range(start, start + n, chunk):
            tasks.append((c0, min(chunk, start + n - c0), nblk, mask, empty))
        start += n
    ctx = _PrefillCtx(rows_sorted=rows_sorted, gidx_sorted=gidx_sorted, qrows=qrows, kp=kp, vp=vp,
                      out_rows=out_rows, lse_rows=lse_rows, bn=bn, rows_q=gq * bm, d=d, scale=scale,
                      buf_blocks=buf_blocks, max_rows=min(rows.numel(), buf_blocks), softcap=softcap)
    _run_tasks(tasks, ctx, _prefill_task)


_SCRATCH = threading.local()
_SCRATCH_KEEP = 64 << 20  # bytes a thread keeps between calls, per buffer


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer of ``shape`` (contents undefined), kept per thread between calls: fresh
    allocations this big are returned to the OS when freed and page-fault on every call. Buffers
    over ``_SCRATCH_KEEP`` are not kept. Never part of a kernel's output."""
    n = math.prod(shape)
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    buf = pool.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        if n * buf.element_size() <= _SCRATCH_KEEP:
            pool[name] = buf
    return buf[:n].view(shape)


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """:func:`_scratch` on CPU devices (names are shared by every caller in a thread: each
    caller's own prefix), a fresh ``torch.empty`` elsewhere (CUDA's caching allocator already
    reuses memory)."""
    if torch.device(device).type == "cpu":
        return _scratch(name, shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class _PrefillCtx:
    """What every prefill task of one call reads: rows sorted by signature and their KV block
    indices, the gathered sources (Q rows, K/V block rows), the outputs, and the tile sizes."""

    rows_sorted: torch.Tensor
    gidx_sorted: torch.Tensor
    qrows: torch.Tensor
    kp: torch.Tensor
    vp: torch.Tensor
    out_rows: torch.Tensor
    lse_rows: torch.Tensor | None
    bn: int
    rows_q: int
    d: int
    scale: float
    buf_blocks: int
    max_rows: int
    softcap: float | None = None


@dataclass(frozen=True)
class _DecodeCtx:
    """What every decode task of one call reads: the rows (largest kept count first), each row's
    kept-block starts, cache base row and length, the cache (and its token-row views), the
    queries, the outputs, and the sizes."""

    rows: torch.Tensor
    n_keep: torch.Tensor
    base: torch.Tensor
    kpos: torch.Tensor
    rlen: torch.Tensor
    kt: torch.Tensor | None
    vt: torch.Tensor | None
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    smax: int
    qr: torch.Tensor
    res: torch.Tensor
    res_lse: torch.Tensor
    bn: int
    d: int
    gq: int
    cdt: torch.dtype
    scale: float
    softcap: float | None = None


def _run_tasks(tasks: list, ctx, fn) -> None:
    """Run ``fn(task, ctx, buffers)`` over the tasks in the caller's thread, with one set of reused
    buffers; each ATen op uses the caller's intra-op threads (the thread count is the caller's to
    set, never changed here)."""
    bufs: dict = {}
    for t in tasks:
        fn(t, ctx, bufs)


def _prefill_task(task, ctx: _PrefillCtx, bufs) -> None:
    c0, R, nblk, mask, empty = task
    kp, vp, qrows, d, bn, rows_q = ctx.kp, ctx.vp, ctx.qrows, ctx.d, ctx.bn, ctx.rows_q
    if not bufs:  # reused buffers (fresh big allocations page-fault every time)
        bufs["k"] = _scratch("k", (ctx.buf_blocks, bn * d), kp.dtype)
        bufs["v"] = _scratch("v", (ctx.buf_blocks, bn * d), vp.dtype)
        bufs["q"] = _scratch("q", (ctx.max_rows, qrows.shape[1]), qrows.dtype)
    L = nblk * bn
    rr = ctx.rows_sorted[c0 : c0 + R]
    bidx = ctx.gidx_sorted[c0 : c0 + R, :nblk].reshape(-1)
    kg = torch.index_select(kp, 0, bidx, out=bufs["k"][: R * nblk])
    vg = torch.index_select(vp, 0, bidx, out=bufs["v"][: R * nblk])
    qg = torch.index_select(qrows, 0, rr, out=bufs["q"][:R])
    am = None if mask is None else mask.view(1, 1, rows_q, L).expand(R, 1, rows_q, L)
    o, lz = _fused(qg.view(R, 1, rows_q, d), kg.view(R, 1, L, d), vg.view(R, 1, L, d),
                   attn_mask=am, scale=ctx.scale, softcap=ctx.softcap)
    o = o.view(R, rows_q, d)
    lz = lz.view(R, rows_q)
    if empty is not None:
        o = o.masked_fill(empty.view(1, -1, 1), 0.0)
        lz = lz.masked_fill(empty.view(1, -1), float("-inf"))
    ctx.out_rows.index_copy_(0, rr, o.reshape(R, rows_q * d))  # disjoint rows per task
    if ctx.lse_rows is not None:
        ctx.lse_rows.index_copy_(0, rr, lz.to(ctx.lse_rows.dtype))


def decode_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: BlockLayout,
    *,
    cache_seqlens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    softcap: float | None = None,
) -> None:
    """Block-sparse decode on CPU tensors, written into ``out`` and ``lse``.

    Rows (sequence, head) are padded to the chunk's largest kept-block count and run through
    the fused CPU flash kernel with an additive key mask ``[R, 1, 1, L]`` (padding slots and
    keys at or past ``cache_seqlens[b]``). With a GQA-shared layout the ``g`` query heads of a
    KV head form one ``[g, D]`` query tile, so each gathered K/V block serves the group.

    Args:
        q: ``[B, Hq, 1, D]``; k_cache, v_cache: ``[B, Hkv, S_max, D]``; cache_seqlens: int ``[B]``.
        out: ``[B, Hq, 1, D]`` in q's dtype; lse: float32 ``[B, Hq, 1]`` (fully overwritten).
    """
    bsz, hq, _, d = q.shape
    hkv, smax = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    bn = layout.block_n
    cdt = q.dtype
    lens = cache_seqlens.to("cpu", torch.int64)
    if not torch.all((lens >= 0) & (lens <= smax)):
        raise LayoutError(f"cache_seqlens must lie in [0, S_max={smax}], got {lens.tolist()}")
    shared = _gqa_shared(layout, hq, hkv)
    vh, gq = (hkv, g) if shared else (hq, 1)
    if shared and layout.heads != 1:
        layout = BlockLayout(layout.kv_indices[:, ::g].contiguous(),
                             layout.kv_counts[:, ::g].contiguous(), layout.block_m, bn)
    idx, cnt = _expand_layout(layout, bsz, vh)
    idx, cnt = idx[:, :, 0], cnt[:, :, 0]  # [B, vh, mb], [B, vh]
    mb = idx.shape[-1]
    kstart = idx * bn
    keep = (torch.arange(mb) < cnt.unsqueeze(-1)) & (kstart < lens.view(bsz, 1, 1))
    rows_total = bsz * vh
    n_keep = keep.sum(-1).reshape(rows_total)  # kept blocks are a prefix of the sorted slots
    res = torch.zeros((rows_total, gq, d), dtype=cdt)
    res_lse = torch.full((rows_total, gq), float("-inf"), dtype=_stat_dtype(cdt))
    rows = (n_keep > 0).nonzero().squeeze(1)
    if rows.numel():
        qr = q.reshape(rows_total, gq, d)
        hk = torch.arange(vh) // (1 if shared else g)
        # first cache row of each (b, kv head) in the token-row view [B * Hkv * S_max, D]
        base = ((torch.arange(bsz).view(-1, 1) * hkv + hk.view(1, -1)) * smax).reshape(rows_total)
        kpos = kstart.clamp_min(0).reshape(rows_total, mb)
        rlen = lens.view(bsz, 1).expand(bsz, vh).reshape(rows_total)
        # rows by kept count, largest first (chunk sizing), so chunks pad little
        rows = rows[torch.argsort(n_keep[rows], descending=True, stable=True)]
        itemsize = torch.finfo(cdt).bits // 8
        nk_sorted = n_keep[rows].tolist()
        tasks, c0 = [], 0
        while c0 < rows.numel():
            nmax = nk_sorted[c0]
            chunk = max(1, _CHUNK_BYTES // (2 * nmax * bn * d * itemsize))
            n = min(chunk, rows.numel() - c0)
            tasks.append((c0, n, nmax))
            c0 += n
        ctx = _DecodeCtx(rows=rows, n_keep=n_keep, base=base, kpos=kpos, rlen=rlen,
                         kt=_token_rows(k_cache), vt=_token_rows(v_cache), k_cache=k_cache, v_cache=v_cache,
                         smax=smax, qr=qr, res=res, res_lse=res_lse, bn=bn, d=d, gq=gq, cdt=cdt, scale=scale,
                         softcap=softcap)
        _run_tasks(tasks, ctx, _decode_task)
    # row r = (b, vh); its gq query heads are consecutive heads vh * gq + i
    out.copy_(res.view(bsz, hq, 1, d))
    lse.copy_(res_lse.view(bsz, hq, 1))


def _token_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x [B, H, S, D] as a view [B * H * S, D] (one row per token), or None when its strides
    do not allow one (then the decode gathers with advanced indexing)."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def _decode_task(task, ctx: _DecodeCtx, bufs) -> None:
    """Gather the kept blocks' tokens of R rows straight from the cache (no padded or converted
    copy of the whole cache: decode touches only what it keeps), one fused flash call."""
    c0, R, nmax = task
    bn, d, gq, cdt, smax = ctx.bn, ctx.d, ctx.gq, ctx.cdt, ctx.smax
    L = nmax * bn
    rr = ctx.rows[c0 : c0 + R]
    kstart = ctx.kpos.index_select(0, rr)[:, :nmax]  # [R, nmax] first key of each kept block
    base = ctx.base.index_select(0, rr)
    slot_ok = (torch.arange(nmax) < ctx.n_keep.index_select(0, rr).unsqueeze(1)).repeat_interleave(bn, 1)
    rlen = ctx.rlen.index_select(0, rr).unsqueeze(1)
    kv = []
    if ctx.kt is not None and ctx.vt is not None and smax >= bn:
        # whole blocks, each one contiguous run of bn * d elements of the token rows: an
        # overlapping view with one row per starting token gathers them as long rows. A block
        # that runs past S_max starts bn keys before S_max instead; the keys before its own start
        # (the previous block's) are masked, so nothing is counted twice.
        first = kstart.clamp(max=smax - bn)
        keys = (first.unsqueeze(-1) + torch.arange(bn)).view(R, L)
        ok = (keys >= kstart.repeat_interleave(bn, 1)) & (keys < rlen) & slot_ok
        start = (first + base.unsqueeze(1)).view(-1)
        for name, flat in (("k", ctx.kt), ("v", ctx.vt)):
            runs = flat.as_strided((flat.shape[0] - bn + 1, bn * d), (d, 1))
            buf = _scratch(name, (start.numel(), bn * d), flat.dtype)
            kv.append(torch.index_select(runs, 0, start, out=buf).view(R, 1, L, d))
    else:  # token by token (a cache shorter than a block, or strides no token-row view covers)
        keys = (kstart.unsqueeze(-1) + torch.arange(bn)).view(R, L)
        ok = (keys < rlen) & slot_ok
        tok = keys.clamp(max=smax - 1)  # keys past S_max are masked (cache_seqlens <= S_max)
        for name, flat in (("k", ctx.kt), ("v", ctx.vt)):
            if flat is not None:
                x = flat.index_select(0, (tok + base.unsqueeze(1)).view(-1))
            else:
                src = ctx.k_cache if name == "k" else ctx.v_cache
                bh = base // smax
                x = src[(bh // src.shape[1]).unsqueeze(1), (bh % src.shape[1]).unsqueeze(1), tok]
            kv.append(x.view(R, 1, L, d))
    am = torch.zeros((R, 1, 1, L), dtype=cdt).masked_fill_(~ok.view(R, 1, 1, L), float("-inf"))
    qg = ctx.qr.index_select(0, rr).view(R, 1, gq, d)
    o, lz = _fused(qg, kv[0], kv[1], attn_mask=am, scale=ctx.scale, softcap=ctx.softcap)
    ctx.res.index_copy_(0, rr, o.view(R, gq, d))
    ctx.res_lse.index_copy_(0, rr, lz.view(R, gq))
