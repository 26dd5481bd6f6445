"""Synthetic ``dam.profile/1`` stores whose optimal programs are known (test helper).

Each head is a generator ``rng -> A [N, N]`` of causal row-stochastic attention for one sample;
the statistics are reduced exactly as docs/architecture.md ("The profile store") defines them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np

Gen = Callable[[np.random.Generator, int], np.ndarray]


def _rows(n: int) -> np.ndarray:
    return np.arange(n)


def _uniform(n: int) -> np.ndarray:
    tri = np.tril(np.ones((n, n)))
    return tri / tri.sum(1, keepdims=True)


def mix(parts: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """Weighted sum of row-stochastic maps (weights sum to 1)."""
    return sum(w * a for w, a in parts)


def sink_window(sink: int = 4, window: int = 100, eps: float = 0.02) -> Gen:
    def gen(rng, n):
        i = _rows(n)[:, None]
        j = _rows(n)[None, :]
        s = ((j < sink) & (j <= i)).astype(float)
        w = ((i - j < window) & (j <= i)).astype(float)
        s = s / s.sum(1, keepdims=True)
        w = w / w.sum(1, keepdims=True)
        return mix([(0.5, s), (0.5 - eps, w), (eps, _uniform(n))])
    return gen


def _point(n: int, target: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    i = _rows(n)
    j = target(i)
    a = np.zeros((n, n))
    a[i, j] = 1.0
    return a


def slash(offset: int = 300, eps: float = 0.03) -> Gen:
    def gen(rng, n):
        a = _point(n, lambda i: np.where(i >= offset, i - offset, i))
        return mix([(1 - eps, a), (eps, _uniform(n))])
    return gen


def vertical(col: int = 517, eps: float = 0.03) -> Gen:
    def gen(rng, n):
        a = _point(n, lambda i: np.where(i >= col, col, i))
        return mix([(1 - eps, a), (eps, _uniform(n))])
    return gen


def moving_blocks(block: int, eps: float = 0.03) -> Gen:
    """Each query block attends to one KV block chosen at random per sample (content-dependent)."""
    def gen(rng, n):
        a = np.zeros((n, n))
        nb = -(-n // block)
        for qb in range(nb):
            kb = int(rng.integers(0, qb + 1))
            rows = np.arange(qb * block, min((qb + 1) * block, n))
            for i in rows:
                lo, hi = kb * block, min((kb + 1) * block, i + 1)
                if hi <= lo:
                    a[i, i] = 1.0
                else:
                    a[i, lo:hi] = 1.0 / (hi - lo)
        return mix([(1 - eps, a), (eps, _uniform(n))])
    return gen


def diffuse() -> Gen:
    def gen(rng, n):
        return _uniform(n)
    return gen


def head_stats(a: np.ndarray, B: int, P: int) -> dict[str, np.ndarray]:
    """One sample's statistics per the store schema (not yet summed over samples)."""
    n = a.shape[0]
    nb = -(-n // B)
    i = _rows(n)[:, None]
    j = _rows(n)[None, :]
    d = np.where(j <= i, i - j, 0)
    diag = np.bincount(d.ravel(), weights=np.where(j <= i, a, 0).ravel(), minlength=n)[:n] / n
    col = a.sum(0) / n
    pad = np.zeros((nb * B, nb * B))
    pad[:n, :n] = a
    bm_rows = pad.reshape(nb, B, nb, B).sum((1, 3))
    blk = bm_rows / n
    topp = np.zeros(3)
    for k, p in enumerate((0.90, 0.95, 0.99)):
        need = []
        for qb in range(nb):
            row = -np.sort(-bm_rows[qb])
            c = np.cumsum(row)
            need.append(int(np.searchsorted(c, p * c[-1] - 1e-12) + 1))
        topp[k] = np.mean(need)
    return {"attn_mean": a[:P, :P], "diag_mass": diag, "col_mass": col, "block_mass": blk,
            "topp_blocks": topp}


def model_fingerprint(layers: int, heads: int, kv_heads: int, head_dim: int = 64) -> dict:
    fp = {
        "model_type": "synthetic", "name_or_path": "synthetic/test", "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "hidden_size": heads * head_dim, "vocab_size": 100, "max_position_embeddings": 4096,
        "rope": {"rope_theta": 10000.0},
    }
    fp["config_hash"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    return fp


def make_store(
    path, gens: list[list[Gen]], *, n: int = 1024, B: int = 64, P: int = 256, samples: int = 4,
    kv_heads: int | None = None, seed: int = 0,
) -> str:
    """Write a ``dam.profile/1`` zarr store with ``len(gens)`` layers of ``len(gens[0])`` heads."""
    import zarr

    L, H = len(gens), len(gens[0])
    rng = np.random.default_rng(seed)
    nb = -(-n // B)
    sums = {
        "attn_mean": np.zeros((L, H, P, P)), "diag_mass": np.zeros((L, H, n)),
        "col_mass": np.zeros((L, H, n)), "block_mass": np.zeros((L, H, nb, nb)),
        "topp_blocks": np.zeros((L, H, 3)),
    }
    for _ in range(samples):
        for layer in range(L):
            for h in range(H):
                st = head_stats(gens[layer][h](rng, n), B, P)
                for k, v in st.items():
                    sums[k][layer, h] += v
    root = zarr.open_group(str(path), mode="w")
    for k, v in sums.items():
        root.create_array(k, data=v)
    root.create_array("count", data=np.array(samples, dtype=np.int64))
    root.attrs.update({
        "schema": "dam.profile/1",
        "model": model_fingerprint(L, H, kv_heads or H),
        "calibration": {"sources": ["synthetic"], "length": n, "capture_length": P, "seed": seed,
                        "batch_size": 1},
        "block_size": B, "dtype": "float32", "tool_version": "0.1.0",
    })
    return str(path)
