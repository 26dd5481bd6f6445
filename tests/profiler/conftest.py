"""Profiler fixtures: the real SmolLM2 (converted once per cache) and a tiny random llama dir."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2(dam_cache):
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32, CPU (one load per session)."""
    os.environ["DAM_CACHE"] = dam_cache
    from dam.profiler import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


def tiny_llama(heads=4, kv=2, layers=2, hidden=32, vocab=49152, dtype=torch.float64, seed=0,
               attn="eager"):
    """A tiny random llama (eval mode) for exactness tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=4096,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny random llama (GQA 4/2, float32) with SmolLM2's tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(dtype=torch.float32, attn="sdpa", seed=1234)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return str(d)
