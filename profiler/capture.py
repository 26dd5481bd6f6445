"""Exact attention capture: per layer and query head, reduce softmax(q·kᵀ·scale + causal).

The model's real forward runs with a custom attention implementation registered with
transformers' ``AttentionInterface`` under the name :data:`ATTN_NAME`. For each layer that
implementation computes the attention *output* itself from the same chunked probabilities it
reduces into statistics, so the forward stays exact and no ``[H, N, N]`` tensor is ever built:
queries are processed ``chunk`` rows at a time, each chunk holding ``[B, H, chunk, ≤N]``
probabilities (peak extra memory ≈ 4 × B × H × chunk × N elements of the compute dtype).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from dam.kernels.reference import softcap_scores

from .errors import ProfileError

#: the name the capture attention is registered under in transformers' AttentionInterface
ATTN_NAME = "dam_capture"
#: the mass shares ``topp_blocks`` counts blocks for
TOPP = (0.90, 0.95, 0.99)
#: default element budget of one chunk's probability tensor (2**24 fp32 values = 64 MiB)
DEFAULT_CHUNK_ELEMENTS = 1 << 24
#: default query rows per chunk: small chunks skip most of the causally masked upper triangle
#: (work ≈ N²/2 + N·rows/2) and keep the skew copy (rows × (N + 2·rows)) close to p's size
DEFAULT_CHUNK_ROWS = 256

_empty = torch.empty  # the output allocator (tests poison it with NaN)

_ACTIVE: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    "dam_profiler_capture", default=None
)


@dataclass
class ProfileStats:
    """Sums over samples of per-sample attention statistics (float64, CPU).

    L layers, H query heads, N sequence length, P capture length, B block size, nb = ⌈N/B⌉.

    Attributes:
        attn_mean: ``[L, H, P, P]`` Σ over samples of A[:P, :P].
        diag_mass: ``[L, H, N]`` Σ over samples of Σ_i A[i, i−d] / N.
        col_mass: ``[L, H, N]`` Σ over samples of Σ_i A[i, j] / N.
        block_mass: ``[L, H, nb, nb]`` Σ over samples of Σ_{i∈a, j∈b} A[i, j] / N.
        topp_blocks: ``[L, H, 3]`` Σ over samples of the mean over query blocks of the number of
            KV blocks (heaviest first) needed for 90 / 95 / 99 % of the query block's mass.
        block_err: ``[L, H, nb, nb]`` Σ over samples of Σ_{i∈a} ‖Σ_{j∈b} A[i, j] (o_i − v_j)‖ / N:
            the size of the change block b's keys make to the outputs of query block a (o_i the
            head's output): dropping b moves o_i by exactly that sum over 1 − (dropped mass), so
            this is the *value-aware* weight of a block (a DAM extension of the store schema).
        count: number of samples summed.
        block_size: B.
    """

    attn_mean: torch.Tensor
    diag_mass: torch.Tensor
    col_mass: torch.Tensor
    block_mass: torch.Tensor
    topp_blocks: torch.Tensor
    block_err: torch.Tensor
    count: int
    block_size: int

    ARRAYS = ("attn_mean", "diag_mass", "col_mass", "block_mass", "topp_blocks", "block_err")

    @classmethod
    def zeros(cls, layers: int, heads: int, length: int, capture_length: int, block_size: int,
              device: torch.device | str = "cpu") -> ProfileStats:
        """Empty sums for the given shape."""
        nb = math.ceil(length / block_size)
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)
        return cls(z(layers, heads, capture_length, capture_length), z(layers, heads, length),
                   z(layers, heads, length), z(layers, heads, nb, nb), z(layers, heads, len(TOPP)),
                   z(layers, heads, nb, nb), 0, block_size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(L, H, N, P)."""
        L, H, N = self.diag_mass.shape
        return L, H, N, self.attn_mean.shape[-1]

    def __add__(self, other: ProfileStats) -> ProfileStats:
        if self.shape != other.shape or self.block_size != other.block_size:
            raise ProfileError(f"cannot add profile stats of shape {self.shape}/B={self.block_size} "
                               f"and {other.shape}/B={other.block_size}")
        kw = {k: getattr(self, k) + getattr(other, k).to(getattr(self, k).device) for k in self.ARRAYS}
        return ProfileStats(**kw, count=self.count + other.count, block_size=self.block_size)

    def arrays(self) -> dict[str, torch.Tensor]:
        """The sum arrays by store name."""
        return {k: getattr(self, k) for k in self.ARRAYS}

    def means(self) -> dict[str, torch.Tensor]:
        """Sums / count (raises when empty)."""
        if self.count <= 0:
            raise ProfileError("no samples captured yet; nothing to average")
        return {k: v / self.count for k, v in self.arrays().items()}


def topp_block_counts(rows: torch.Tensor, shares=TOPP) -> torch.Tensor:
    """Blocks needed per row for each mass share.

    Args:
        rows: ``[..., nb]`` non-negative block masses of query blocks (any scale).
    Returns:
        ``[..., len(shares)]`` float64: the smallest k such that the k heaviest blocks hold at
        least ``share`` of the row's total (a relative slack of 1e-9 absorbs rounding).
    """
    r = rows.double()
    tot = r.sum(-1, keepdim=True)
    csum = torch.sort(r, dim=-1, descending=True).values.cumsum(-1)
    out = [((csum < (s - 1e-9) * tot).sum(-1) + 1).clamp(max=r.shape[-1]) for s in shares]
    return torch.stack(out, -1).double()


def _check_kwargs(module, dropout, kw) -> None:
    if dropout and getattr(module, "training", False):
        raise ProfileError("capture needs the model in eval mode (attention dropout is active); call model.eval()")
    if kw.get("s_aux") is not None:
        raise ProfileError("learned attention sinks (s_aux) are not supported by the profiler")


def _dam_capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """transformers attention function: query ``[B, H, N, D]``, key/value ``[B, Hkv, N, D]``
    (post-RoPE, GQA not repeated) -> (output ``[B, N, H, Dv]``, None)."""
    rec = _ACTIVE.get()
    if rec is None:
        raise ProfileError(f"the {ATTN_NAME!r} attention ran outside dam.profiler.capture; "
                           "restore the model's attention implementation")
    _check_kwargs(module, dropout, kw)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    window = kw.get("sliding_window")
    cap = kw.get("softcap")
    return rec.attend(getattr(module, "layer_idx", None), query, key, value, float(scaling),
                      None if window is None else int(window), None if cap is None else float(cap)), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _dam_capture_attention)


@dataclass
class _Recorder:
    layers: int
    heads: int
    length: int
    capture_length: int
    block_size: int
    chunk: int | None
    device: torch.device
    stats: ProfileStats = field(init=False)
    seen: set = field(default_factory=set)

    def __post_init__(self):
        self.stats = ProfileStats.zeros(self.layers, self.heads, self.length, self.capture_length,
                                        self.block_size, self.device)

    def chunk_rows(self, batch: int) -> int:
        bs = self.block_size
        if self.chunk is not None:
            rows = self.chunk
        else:
            rows = min(DEFAULT_CHUNK_ROWS, DEFAULT_CHUNK_ELEMENTS // max(1, batch * self.heads * self.length))
        rows = max(bs, rows // bs * bs)  # a whole number of blocks, so blocks never straddle
        return rows

    def attend(self, layer, q, k, v, scaling, window=None, softcap=None):
        """Exact attention of ``layer``, its statistics accumulated on the way. A sliding-window
        layer (keys ``i - j < window``) is not profiled: the compiler gives it its native window,
        so it runs its exact band here and its arrays stay zero. ``softcap``: the model's
        attention-logit soft-capping (``softcap * tanh(s / softcap)`` of the scaled scores)."""
        B, H, N, D = q.shape
        Hkv = k.shape[1]
        if layer is None or not 0 <= layer < self.layers:
            raise ProfileError(f"attention module has no valid layer_idx ({layer!r}); this model is not supported")
        if H != self.heads or N != self.length or k.shape[2] != N:
            raise ProfileError(f"layer {layer}: attention got query {tuple(q.shape)} key {tuple(k.shape)}, "
                               f"expected {self.heads} heads and {self.length} positions (no KV cache, no padding)")
        if H % Hkv:
            raise ProfileError(f"{H} query heads are not a multiple of {Hkv} kv heads")
        G = H // Hkv
        P, bs = self.capture_length, self.block_size
        cdt = torch.promote_types(q.dtype, torch.float32)
        if window is not None:
            self.seen.add(layer)
            return _band_attention(q.to(cdt), k.to(cdt), v.to(cdt), scaling, window, self.chunk_rows(B), softcap) \
                .transpose(1, 2).to(q.dtype)
        kg = k.to(cdt).unsqueeze(2)  # [B, Hkv, 1, N, D]
        vg = v.to(cdt).unsqueeze(2)
        out = _empty(B, Hkv, G, N, v.shape[-1], dtype=cdt, device=q.device)
        nb = math.ceil(N / bs)
        f64 = dict(dtype=torch.float64)
        col = torch.zeros(B, H, N, **f64, device=q.device)
        diag = torch.zeros(B, H, N, **f64, device=q.device)
        blk = torch.zeros(B, H, nb, nb, **f64, device=q.device)
        err = torch.zeros(B, H, nb, nb, **f64, device=q.device)
        am = self.stats.attn_mean[layer]
        C = self.chunk_rows(B)
        qg = (q.to(cdt) * scaling).reshape(B, Hkv, G, N, D)
        upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu_(1)
        for i0 in range(0, N, C):
            i1 = min(N, i0 + C)
            c, K = i1 - i0, i1  # keys beyond i1 are causally masked for every row of the chunk
            s = softcap_scores(torch.matmul(qg[..., i0:i1, :], kg[..., :K, :].transpose(-1, -2)), softcap)  # [B,Hkv,G,c,K]
            s[..., i0:].masked_fill_(upper[:c, :c], float("-inf"))
            p = torch.softmax(s, dim=-1)
            del s
            o = torch.matmul(p, vg[..., :K, :])  # [B, Hkv, G, c, Dv]
            out[..., i0:i1, :] = o
            ca, kb, a0 = math.ceil(c / bs), math.ceil(K / bs), i0 // bs
            err[:, :, a0:a0 + ca, :kb] += _value_error(p, o, vg[..., :K, :], bs)
            del o
            p = p.reshape(B, H, c, K)  # contiguous; h = kv_head * G + g
            _mass_sums(p, i0, bs, col, diag, blk)
            if i0 < P:
                r1 = min(i1, P)
                am[:, i0:r1, :min(K, P)] += p[:, :, : r1 - i0, :P].sum(0).double()
        st = self.stats
        st.col_mass[layer] += col.sum(0) / N
        st.diag_mass[layer] += diag.sum(0) / N
        st.block_mass[layer] += blk.sum(0) / N
        st.block_err[layer] += err.sum(0) / N
        st.topp_blocks[layer] += topp_block_counts(blk).mean(-2).sum(0)
        self.seen.add(layer)
        return out.reshape(B, H, N, -1).transpose(1, 2).to(q.dtype)


def _value_error(p: torch.Tensor, o: torch.Tensor, v: torch.Tensor, bs: int) -> torch.Tensor:
    """Value-aware block weight ``|| sum_{j in b} p_ij (o_i - v_j) ||`` summed per (query block,
    key block), float64 ``[B, H, ca, kb]``, from one chunk's probabilities ``p [B, Hkv, G, c, K]``
    (the chunk starts on a block boundary), outputs ``o [B, Hkv, G, c, Dv]`` and values
    ``v [B, Hkv, 1, K, Dv]``."""
    B, Hkv, G, c, K = p.shape
    ca, kb = math.ceil(c / bs), math.ceil(K / bs)
    tail = kb * bs - K  # keys padding the last key block (zero probability, zero value)
    pk = torch.nn.functional.pad(p, (0, tail)).reshape(B, Hkv, G, c, kb, bs)
    vk = torch.nn.functional.pad(v, (0, 0, 0, tail)).reshape(B, Hkv, 1, kb, bs, -1)
    part = torch.einsum("zhgikj,zhxkjd->zhgikd", pk, vk)
    e = (pk.sum(-1).unsqueeze(-1) * o.unsqueeze(-2) - part).norm(dim=-1)  # [B,Hkv,G,c,kb]
    del pk, part
    e = e.reshape(B, Hkv * G, c, kb)
    if ca * bs != c:
        e = torch.nn.functional.pad(e, (0, 0, 0, ca * bs - c))
    return e.reshape(B, Hkv * G, ca, bs, kb).sum(3).double()


def _mass_sums(p: torch.Tensor, i0: int, bs: int, col: torch.Tensor, diag: torch.Tensor,
               blk: torch.Tensor) -> None:
    """Add one chunk's probabilities ``p [B, H, c, K]`` (rows ``i0 .. i0 + c - 1``, ``i0`` on a block
    boundary) to the column, diagonal and block sums (float64, rows not yet divided by N)."""
    B, H, c, K = p.shape
    ca, kb, a0 = math.ceil(c / bs), math.ceil(K / bs), i0 // bs
    # rows summed per query block -> cols, blocks
    pr = p if ca * bs == c else torch.nn.functional.pad(p, (0, 0, 0, ca * bs - c))
    rb = pr.reshape(B, H, ca, bs, K).sum(3)  # [B, H, ca, K]
    del pr
    col[..., :K] += rb.sum(2).double()
    if kb * bs != K:
        rb = torch.nn.functional.pad(rb, (0, kb * bs - K))
    blk[:, :, a0:a0 + ca, :kb] += rb.reshape(B, H, ca, kb, bs).sum(-1).double()
    # offsets d = i - j <= i0: every row has one, at flat index (i0 - d) + r (K + 1)
    v = p.as_strided((B, H, i0 + 1, c), (H * c * K, c * K, 1, K + 1), p.storage_offset())
    diag[..., : i0 + 1] += v.sum(-1).flip(-1).double()
    # offsets i0 < d < i0 + c live in the chunk's first c keys: sub-diagonal t = d - i0
    # of the [c, c] corner; reading it with stride c + 1 from a zero-tailed copy
    if c > 1:
        buf = torch.zeros(B, H, 2 * c * c, dtype=p.dtype, device=p.device)
        buf[..., : c * c] = p[..., :c].reshape(B, H, c * c)
        w = buf.as_strided((B, H, c, c), (2 * c * c * H, 2 * c * c, c, c + 1))
        diag[..., i0 + 1 : i0 + c] += w.sum(-1)[..., 1:].double()


def _band_attention(q, k, v, scaling, window, rows, softcap=None):
    """Exact causal sliding-window attention ``[B, H, N, Dv]``, chunks of ``rows`` queries each
    against the keys their window reaches (GQA: key/value heads un-repeated)."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    qg = (q * scaling).reshape(B, k.shape[1], G, N, D)
    out = q.new_empty(B, k.shape[1], G, N, v.shape[-1])
    for i0 in range(0, N, rows):
        i1 = min(N, i0 + rows)
        lo = max(0, i0 - window + 1)
        s = softcap_scores(torch.matmul(qg[..., i0:i1, :], k[:, :, None, lo:i1].transpose(-1, -2)), softcap)
        i = torch.arange(i0, i1, device=q.device)[:, None]
        j = torch.arange(lo, i1, device=q.device)[None, :]
        s.masked_fill_((j > i) | (i - j >= window), float("-inf"))
        out[..., i0:i1, :] = torch.matmul(torch.softmax(s, -1), v[:, :, None, lo:i1])
    return out.reshape(B, H, N, -1)


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


@contextlib.contextmanager
def attention_capture(model, *, length: int, capture_length: int, block_size: int,
                      batch: int = 1, chunk: int | None = None) -> Iterator[_Recorder]:
    """Switch ``model`` (this instance only) to the capture attention for the ``with`` body.

    Forward passes inside the block must use unpadded ``input_ids [batch, length]`` and no KV
    cache; their outputs are exact. The yielded recorder's ``.stats`` (:class:`ProfileStats`,
    ``count`` not yet set) accumulate every layer's statistics. The previous attention
    implementation is restored on exit, also on errors.
    """
    cfg = _text_config(model)
    if not 1 <= capture_length <= length:
        raise ProfileError(f"capture length {capture_length} must be between 1 and the sequence length {length}")
    if block_size < 1:
        raise ProfileError(f"block size must be positive, got {block_size}")
    if chunk is not None and chunk < 1:
        raise ProfileError(f"chunk must be positive, got {chunk}")
    if not hasattr(model, "set_attn_implementation"):
        raise ProfileError(f"{type(model).__name__} cannot switch its attention implementation; "
                           "use a transformers model that supports AttentionInterface")
    _register()
    device = next(model.parameters()).device
    rec = _Recorder(int(cfg.num_hidden_layers), int(cfg.num_attention_heads), int(length),
                    int(capture_length), int(block_size), chunk, device)
    prev = model.config._attn_implementation
    token = _ACTIVE.set(rec)
    try:
        model.set_attn_implementation(ATTN_NAME)
        if model.config._attn_implementation != ATTN_NAME:
            raise ProfileError(f"{type(model).__name__} does not support custom attention implementations "
                               "(transformers AttentionInterface); it cannot be profiled")
        yield rec
    finally:
        _ACTIVE.reset(token)
        if prev is not None:
            model.set_attn_implementation(prev)


def capture(model, input_ids: torch.Tensor, *, capture_length: int, block_size: int,
            chunk: int | None = None) -> ProfileStats:
    """Run ``model`` on ``input_ids`` and return the exact attention statistics.

    Args:
        model: a transformers causal LM (full and sliding-window causal attention layers, GQA/MQA).
        input_ids: LongTensor ``[B, N]`` of unpadded samples (all of length N).
        capture_length: P, the number of leading tokens whose full attention map is kept.
        block_size: B of ``block_mass`` / ``topp_blocks``.
        chunk: query rows per chunk (rounded to whole blocks); ``None`` picks one that keeps a
            chunk's probabilities near 64 MiB.

    Returns:
        :class:`ProfileStats` on CPU, ``count = B``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ProfileError("input_ids must be a LongTensor [batch, length]")
    Bt, N = input_ids.shape
    if Bt < 1 or N < 1:
        raise ProfileError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    runner = model.get_decoder() if hasattr(model, "get_decoder") else None
    if runner is None or runner is model or not hasattr(runner, "forward"):
        runner = model  # the LM head does not change attention; skip it when we can
    device = next(model.parameters()).device
    with attention_capture(model, length=N, capture_length=capture_length, block_size=block_size,
                           batch=Bt, chunk=chunk) as rec, torch.no_grad():
        runner(input_ids=input_ids.to(device), use_cache=False)
    missing = sorted(set(range(rec.layers)) - rec.seen)
    if missing:
        raise ProfileError(f"layers {missing} never called the capture attention; this model's attention "
                           "does not go through transformers' AttentionInterface")
    st = rec.stats
    return ProfileStats(**{k: v.cpu() for k, v in st.arrays().items()}, count=Bt, block_size=block_size)
