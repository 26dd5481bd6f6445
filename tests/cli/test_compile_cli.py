"""``dam compile`` and ``dam inspect`` end to end on a synthetic profile store."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from dam.cli.main import main
from dam.compiler import load_artifact

from ..compiler import synth


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "p.zarr"
    gens = [[synth.sink_window(4, 100), synth.slash(300), synth.vertical(517), synth.diffuse()],
            [synth.sink_window(8, 60), synth.slash(130), synth.sink_window(4, 200), synth.vertical(300)]]
    return synth.make_store(path, gens, n=1024, B=64, P=128, samples=2, kv_heads=2)


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.mark.slow
def test_compile_then_inspect(store, tmp_path):
    out = tmp_path / "a.safetensors"
    r = _run(["compile", store, "--out", str(out), "--target-length", "4k", "--clusters", "auto",
              "--share-kv-groups", "--max-density", "0.6"])
    assert r.exit_code == 0, r.output
    assert "layer  density" in r.output and "dense heads" in r.output and "clustered" in r.output
    art = load_artifact(out)
    assert art.metadata["compile"]["target_length"] == 4096
    assert art.metadata["compile"]["share_kv_groups"] is True
    png = tmp_path / "m.png"
    r = _run(["inspect", str(out), "--profile", store, "--plot", str(png), "--layers", "0,1"])
    assert r.exit_code == 0, r.output
    assert "on the profile (length 1024" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dam_paper_method(store, tmp_path):
    out = tmp_path / "p.safetensors"
    r = _run(["compile", store, "--out", str(out), "--method", "dam-paper", "--tau", "0.1", "--mu", "0.6"])
    assert r.exit_code == 0, r.output
    meta = load_artifact(out).metadata["compile"]
    assert (meta["method"], meta["tau"], meta["mu"]) == ("dam-paper", 0.1, 0.6)


def test_same_flags_same_bytes(store, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for out in (a, b):
        assert _run(["compile", store, "--out", str(out), "--clusters", "2"]).exit_code == 0
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("args, msg", [
    (["compile", "/nonexistent/x.zarr", "--out", "o.safetensors"], "ProfileReadError"),
    (["compile", "STORE", "--out", "o.safetensors", "--recall", "1.5"], "recall target"),
    (["compile", "STORE", "--out", "o.safetensors", "--clusters", "zero"], "--clusters"),
    (["inspect", "BAD"], "ArtifactError"),
])
def test_errors_are_one_line(store, tmp_path, args, msg):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not an artifact at all")
    args = [store if a == "STORE" else str(bad) if a == "BAD" else a for a in args]
    args = [str(tmp_path / a) if a == "o.safetensors" else a for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    assert msg in r.output
    assert "Traceback" not in r.output


def test_last_query_default_is_written_and_reported(store, tmp_path):
    out = tmp_path / "lq.safetensors"
    r = _run(["compile", store, "--out", str(out), "--target-length", "2k", "--last-query", "0.1",
              "--last-query-queries", "32"])
    assert r.exit_code == 0, r.output
    assert "runtime last-query estimate: +0.1" in r.output
    art = load_artifact(out)
    assert art.metadata["runtime"] == {"last_query": 0.1, "last_query_queries": 32}
    fig = art.metadata["figures"]
    # the bound: every non-dense head +0.1 (capped at 1), dense heads unchanged
    nd = np.array([[not art.programs[int(k)].dense for k in row] for row in art.head_program])
    want = float(np.minimum(1.0, art.density + 0.1 * nd).mean())
    assert fig["mean_density_with_last_query"] == pytest.approx(want, abs=1e-6)
    assert fig["mean_density_with_last_query"] > fig["mean_density"]
    bad = CliRunner().invoke(main, ["compile", store, "--out", str(out), "--last-query", "1.5"])
    assert bad.exit_code != 0 and "--last-query" in bad.output
