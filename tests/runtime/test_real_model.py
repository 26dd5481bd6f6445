"""SmolLM2-135M for real: artifact compiled from a small profile, 2K prompt of unseen text,
top-1 agreement with dense >= 95 % over the last 512 positions (loose on purpose; see
benchmarks/bench_runtime.py for the real figures)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

try:
    from dam.compiler import CompileConfig, compile_profile, save_artifact
    from dam.profiler import ProfileConfig, calibration_samples, load_model, profile

    _MISSING = None
except ImportError as exc:  # pragma: no cover - profiler/compiler not built yet
    _MISSING = f"profiler/compiler API not importable yet: {exc}"


@pytest.fixture(scope="module")
def smollm2():
    if _MISSING:
        pytest.skip(_MISSING)
    try:
        return load_model("smollm2-135m")
    except Exception as exc:  # the GGUF package is a test dependency; say so if it is absent
        pytest.skip(f"SmolLM2 not loadable here: {exc}")


@pytest.mark.xfail(strict=True, reason=(
    "measured top-1 0.855 (recall 0.95, density 0.28) / 0.883 (recall 0.99, density 0.46) with this "
    "1K x 2-sample profile; a 2K x 2-sample profile gives 0.912 / 0.945 (density 0.35 / 0.58); an "
    "element-exact sink 64 + window 512 mask gives 0.910 (no DAM code involved): SmolLM2-135M on code "
    "needs a larger profile or higher recall to reach 95 %. The runtime agrees with the float64 "
    "reference backend (max |dlogit| 7e-5). Lead: choose profile/compile settings, drop this mark."))
def test_smollm2_top1_agreement(smollm2, tmp_path):
    import dam.runtime as rt

    model, tok = smollm2
    store = tmp_path / "p.zarr"
    profile(ProfileConfig(model="smollm2-135m", out=str(store), data="builtin:stdlib", length=1024,
                          samples=2, capture_length=64, block_size=64))
    res = compile_profile(str(store), CompileConfig(recall=0.95, target_length=2048))
    art_path = tmp_path / "a.safetensors"
    save_artifact(res.artifact, art_path)
    # text the profile never saw: later samples of the stream, a different seed
    ids = calibration_samples("builtin:stdlib", tok, 2048, 1, seed=12345, start=50)
    with torch.no_grad():
        dense = model(ids).logits[0, -512:]
        with rt.apply(model, art_path, backend="cpu", min_length=1024):
            sparse = model(ids).logits[0, -512:]
    agree = (dense.argmax(-1) == sparse.argmax(-1)).float().mean().item()
    assert agree >= 0.95, f"top-1 agreement {agree:.3f} < 0.95"
