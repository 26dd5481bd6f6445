"""The DAM profiler: model loading, calibration data, attention capture, the zarr profile store.

Public API::

    load_model(spec, *, dtype=None, device="cpu") -> (model, tokenizer)
    model_fingerprint(config) -> dict
    calibration_samples(spec, tokenizer, length, count, *, seed=0, start=0) -> LongTensor [S, N]
    make_passkey_prompt / make_kv_retrieval_prompt(tokenizer, length, seed) -> (text, answer)
    capture(model, input_ids [B, N], *, capture_length, block_size) -> ProfileStats
    read_store(path) -> (attrs, ProfileStats); write_store(path, stats, attrs)
    profile(ProfileConfig, progress=None) -> ProfileSummary
"""

from .capture import ATTN_NAME, TOPP, ProfileStats, attention_capture, capture, topp_block_counts
from .data import (
    calibration_samples,
    iter_samples,
    make_kv_retrieval_ids,
    make_kv_retrieval_prompt,
    make_passkey_ids,
    make_passkey_prompt,
    parse_data_spec,
    parse_length,
)
from .errors import ProfileError
from .models import ALIASES, attention_layer_types, cache_root, load_model, model_fingerprint
from .run import ProfileConfig, ProfileSummary, profile
from .store import SCHEMA, read_attrs, read_store, write_store

__all__ = [
    "ALIASES", "ATTN_NAME", "SCHEMA", "TOPP", "ProfileConfig", "ProfileError", "ProfileStats",
    "ProfileSummary", "attention_capture", "attention_layer_types", "cache_root", "calibration_samples", "capture",
    "iter_samples", "load_model", "make_kv_retrieval_ids", "make_kv_retrieval_prompt",
    "make_passkey_ids", "make_passkey_prompt", "model_fingerprint", "parse_data_spec", "parse_length",
    "profile",
    "read_attrs", "read_store", "topp_block_counts", "write_store",
]
