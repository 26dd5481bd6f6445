"""Shared helpers for the runtime tests: tiny models, artifacts, a float64 masked-dense reference."""

from __future__ import annotations

import math

import numpy as np
import torch

from dam.compiler import Artifact, MaskProgram

# fp32 tolerance: the reference path is float64 rounded to fp32; kernels accumulate in fp32
FP32_TOL = dict(rtol=200 * torch.finfo(torch.float32).eps, atol=200 * torch.finfo(torch.float32).eps)

STATIC_PROGRAMS = (
    MaskProgram(sink=4, window=20),
    MaskProgram(dense=True),
    MaskProgram(sink=1, window=8, slashes=(40, 77)),
    MaskProgram(verticals=(3, 50), window=4),
)
MIXED_PROGRAMS = STATIC_PROGRAMS + (MaskProgram(sink=2, window=16, dynamic_fraction=0.25),)


def tiny_config(family: str = "llama", *, heads: int = 4, kv_heads: int = 2, layers: int = 2):
    import transformers as tf

    common = dict(
        vocab_size=128, hidden_size=heads * 16, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        head_dim=16,
    )
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=False)
    if family == "qwen3":
        return tf.Qwen3Config(**common, use_sliding_window=False)
    raise ValueError(family)


def tiny_model(family: str = "llama", **kw):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    # larger weights than the default init so attention is peaked and masks matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model


def make_artifact(config, programs=STATIC_PROGRAMS, block_size: int = 16, seed: int = 0) -> Artifact:
    L, H = config.num_hidden_layers, config.num_attention_heads
    rng = np.random.default_rng(seed)
    hp = rng.integers(0, len(programs), size=(L, H)).astype(np.int32)
    hp.flat[: len(programs)] = np.arange(len(programs))[: hp.size]  # every program used
    return Artifact(
        programs=tuple(programs), head_program=hp, block_size=block_size,
        metadata={"model": {"num_hidden_layers": L, "num_attention_heads": H,
                            "num_key_value_heads": config.num_key_value_heads,
                            "head_dim": config.head_dim, "name_or_path": "tiny"}},
    )


def reference_attention(q, k, v, programs, block_size, scale=None):
    """float64 masked-dense attention from MaskProgram.block_mask (static programs only).

    q ``[B, Hq, N, D]`` (the last N of Nk), k/v ``[B, Hkv, Nk, D]`` -> ``[B, Hq, N, D]`` float64.
    """
    B, Hq, N, D = q.shape
    Nk = k.shape[2]
    g = Hq // k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    i = torch.arange(Nk - N, Nk)[:, None]
    j = torch.arange(Nk)[None, :]
    masks = []
    for p in programs:
        bm = torch.from_numpy(p.block_mask(N, Nk, block_size))
        el = bm.repeat_interleave(block_size, 0)[:N].repeat_interleave(block_size, 1)[:, :Nk]
        masks.append(el & (j <= i))
    mask = torch.stack(masks)[None]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ vv
