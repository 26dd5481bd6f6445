"""profile(): fresh runs, refusal rules, resume, kill -9 consistency, torchrun sharding."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest
import torch

from dam.profiler import ProfileConfig, ProfileError, profile, read_store

EPS64 = torch.finfo(torch.float64).eps


def _cfg(model_dir, out, **kw):
    base = dict(model=model_dir, out=str(out), data="builtin:passkey,builtin:kv-retrieval",
                length=160, samples=3, capture_length=24, block_size=16, flush_seconds=0)
    base.update(kw)
    return ProfileConfig(**base)


def _assert_same(a, b, tol=None):
    assert a.count == b.count
    for k, v in a.arrays().items():
        w = getattr(b, k)
        atol = tol if tol is not None else 64 * max(1, a.count) * EPS64 * max(1.0, v.abs().max().item())
        torch.testing.assert_close(v, w, rtol=0, atol=atol, msg=k)


def test_fresh_run_and_refusals(tmp_path, tiny_model_dir):
    out = tmp_path / "s.zarr"
    seen = []
    s = profile(_cfg(tiny_model_dir, out), progress=lambda d, t: seen.append((d, t)))
    assert s.samples_added == 3 and s.samples_total == 3 and s.tokens == 480 and s.store_bytes > 0
    assert seen[-1] == (3, 3)
    attrs, st = read_store(out)
    assert st.count == 3 and st.diag_mass.shape == (2, 4, 160) and st.attn_mean.shape == (2, 4, 24, 24)
    assert attrs["model"]["num_key_value_heads"] == 2 and attrs["calibration"]["length"] == 160
    assert attrs["calibration"]["sources"] == ["builtin:passkey", "builtin:kv-retrieval"]
    torch.testing.assert_close(st.col_mass.sum(-1), torch.full((2, 4), 3.0, dtype=torch.float64))
    with pytest.raises(ProfileError, match="already exists"):
        profile(_cfg(tiny_model_dir, out))
    for kw, word in (({"length": 176}, "length: store 160 vs now 176"),
                     ({"block_size": 32}, "block size: store 16 vs now 32"),
                     ({"capture_length": 8}, "capture length: store 24 vs now 8")):
        with pytest.raises(ProfileError, match=word):
            profile(_cfg(tiny_model_dir, out, resume=True, **kw))
    from .conftest import tiny_llama

    other = tmp_path / "other-model"
    tiny_llama(heads=2, kv=2, dtype=torch.float32).save_pretrained(other)
    import shutil

    for f in os.listdir(tiny_model_dir):
        if f.startswith("tokenizer") or f.endswith(".jinja"):
            shutil.copy(os.path.join(tiny_model_dir, f), other)
    with pytest.raises(ProfileError, match="num_attention_heads: store 4 vs now 2"):
        profile(_cfg(str(other), out, resume=True))
    assert read_store(out)[1].count == 3  # refusals leave the store untouched


def test_bad_configs():
    with pytest.raises(ProfileError, match="samples"):
        ProfileConfig(model="m", out="o", samples=0)
    with pytest.raises(ProfileError, match="capture length"):
        ProfileConfig(model="m", out="o", length=64, capture_length=65)
    with pytest.raises(ProfileError, match="exclude"):
        ProfileConfig(model="m", out="o", resume=True, overwrite=True)
    with pytest.raises(ProfileError, match="unknown built-in"):
        ProfileConfig(model="m", out="o", data="builtin:nope")
    with pytest.raises(ProfileError, match="dtype"):
        ProfileConfig(model="m", out="o", dtype="int8")


def test_resume_continues_the_stream(tmp_path, tiny_model_dir):
    one = tmp_path / "one.zarr"
    profile(_cfg(tiny_model_dir, one, samples=5))
    two = tmp_path / "two.zarr"
    profile(_cfg(tiny_model_dir, two, samples=2))
    s = profile(_cfg(tiny_model_dir, two, samples=5, resume=True))
    assert s.samples_added == 3 and s.samples_total == 5
    attrs, st = read_store(two)
    _assert_same(st, read_store(one)[1])
    assert [r["samples_added"] for r in attrs["calibration"]["runs"]] == [2, 3]
    assert profile(_cfg(tiny_model_dir, two, samples=4, resume=True)).samples_added == 0


def _env():
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_kill_minus_9_keeps_every_flushed_sample(tmp_path, tiny_model_dir):
    out = tmp_path / "k.zarr"
    cmd = [sys.executable, "-m", "dam.cli.main", "profile", tiny_model_dir, "--data",
           "builtin:passkey,builtin:kv-retrieval", "--length", "160", "--samples", "400",
           "--capture-length", "24", "--block-size", "16", "--flush-seconds", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not out.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(random.uniform(0.2, 1.5))  # land anywhere, also inside a write
    finally:
        proc.kill()
        proc.wait()
    attrs, st = read_store(out)  # repairs a torn switch if the kill hit one
    assert 1 <= st.count < 400
    ref = tmp_path / "ref.zarr"
    profile(_cfg(tiny_model_dir, ref, samples=st.count))
    _assert_same(st, read_store(ref)[1])
    # and --resume finishes the job as if never interrupted
    profile(_cfg(tiny_model_dir, out, samples=st.count + 2, resume=True))
    profile(_cfg(tiny_model_dir, ref, samples=st.count + 2, resume=True))
    _assert_same(read_store(out)[1], read_store(ref)[1])


@pytest.mark.slow
def test_ctrl_c_flushes_completed_samples(tmp_path, tiny_model_dir):
    import re
    import signal

    out = tmp_path / "c.zarr"
    cmd = [sys.executable, "-m", "dam.cli.main", "profile", tiny_model_dir, "--data",
           "builtin:passkey", "--length", "1024", "--samples", "2000", "--capture-length", "24",
           "--block-size", "16", "--flush-seconds", "100000", "--out", str(out)]
    # long enough (~35 ms a sample here, over a minute in all) that the run cannot finish
    # between the test seeing progress and the signal arriving
    # a shell that starts jobs in the background (as CI may) leaves SIGINT ignored, and children
    # inherit that; restore the default so the child installs Python's KeyboardInterrupt handler
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, done = b"", 0
    try:
        deadline = time.time() + 120
        while done < 2 and time.time() < deadline and proc.poll() is None:
            seen += os.read(proc.stderr.fileno(), 4096)
            counts = re.findall(rb"(\d+)/2000", seen)
            done = int(counts[-1]) if counts else 0
        assert done >= 2, seen[-2000:]
        assert not out.exists()  # nothing flushed yet: only Ctrl-C can write it
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    st = read_store(out)[1]
    assert done <= st.count < 2000
    ref = tmp_path / "ref.zarr"
    profile(_cfg(tiny_model_dir, ref, data="builtin:passkey", length=1024, samples=st.count))
    _assert_same(st, read_store(ref)[1])


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_equal_single_process(tmp_path, tiny_model_dir):
    out = tmp_path / "dist.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dam.cli.main", "profile", tiny_model_dir, "--data",
           "builtin:passkey,builtin:kv-retrieval", "--length", "160", "--samples", "5",
           "--capture-length", "24", "--block-size", "16", "--flush-seconds", "0", "--out", str(out)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("profiled 5 samples") == 1  # only rank 0 reports
    single = tmp_path / "single.zarr"
    profile(_cfg(tiny_model_dir, single, samples=5))
    a, b = read_store(out), read_store(single)
    _assert_same(a[1], b[1])
    assert a[0]["model"] == b[0]["model"] and a[0]["calibration"]["length"] == 160
