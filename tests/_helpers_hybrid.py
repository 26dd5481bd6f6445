"""Tiny random Gemma-3 models (hybrid sliding/full layers, MQA, head_dim 256) for tests."""

from __future__ import annotations

import torch

TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def tiny_gemma3(*, window=16, heads=4, kv=1, head_dim=256, vocab=257, dtype=torch.float64, seed=0, attn="eager"):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=len(TYPES),
                           num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                           sliding_window=window, layer_types=list(TYPES), query_pre_attn_scalar=64,
                           max_position_embeddings=4096, attn_implementation=attn)
    model = Gemma3ForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # peaked attention, so the masks matter
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model


#: a cap small enough that tanh bends the (peaked) scores of the tiny models below
SOFTCAP = 3.0


def tiny_gemma2(*, window=16, heads=4, kv=2, head_dim=32, vocab=257, dtype=torch.float64, seed=0, attn="eager",
                softcap=SOFTCAP):
    """Gemma 2: alternating sliding/full layers and attention-logit soft-capping."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=len(TYPES),
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                       sliding_window=window, layer_types=list(TYPES), query_pre_attn_scalar=16,
                       attn_logit_softcapping=softcap, max_position_embeddings=4096, attn_implementation=attn)
    model = Gemma2ForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model
