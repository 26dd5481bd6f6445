"""dam.runtime.eval.evaluate / baselines / bench on tiny random models: metrics against brute-force
computations, baselines at the matched density, the oracle at the target recall."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dam.runtime as rt
from dam.compiler import MaskProgram
from dam.runtime.errors import DamRuntimeError
from dam.runtime.eval.baselines import (
    MInferenceHook,
    OracleHook,
    causal_block_mask,
    diagonal_block_mask,
    mean_artifact_density,
    minference_mask,
    oracle_mask,
    streaming_artifact,
)
from dam.runtime.eval.bench import BenchConfig, bench
from dam.runtime.eval.evaluate import (
    EvalConfig,
    EvalSample,
    answer_correct,
    compare_logits,
    evaluate,
)
from dam.runtime.eval.recall import block_mass, measure_recall

from .._helpers import MIXED_PROGRAMS, make_artifact, tiny_model


def test_compare_logits_matches_brute_force():
    N, V = 37, 11
    d, s = torch.randn(N, V), torch.randn(N, V)
    s[:5] = d[:5]
    ids = torch.randint(0, V, (N,))
    top1, kl, nll, dnll = compare_logits(d, s, ids, chunk=8)
    pd, ps = torch.softmax(d.double(), -1), torch.softmax(s.double(), -1)
    assert top1 == pytest.approx(float((d.argmax(-1) == s.argmax(-1)).double().mean()))
    assert kl == pytest.approx(float((pd * (pd.log() - ps.log())).sum(-1).mean()), rel=1e-5)
    assert nll == pytest.approx(float(-ps.log()[torch.arange(N - 1), ids[1:]].mean()), rel=1e-5)
    assert dnll == pytest.approx(float(-pd.log()[torch.arange(N - 1), ids[1:]].mean()), rel=1e-5)
    assert compare_logits(d, d, ids)[:2] == (1.0, pytest.approx(0.0, abs=1e-6))


def test_answer_correct_uses_the_answer_span():
    logits = torch.zeros(12, 9)
    logits[9, 4] = logits[10, 7] = 1  # prompt of 10, answer (4, 7): positions 9 and 10 predict it
    assert answer_correct(logits, 10, (4, 7))
    assert not answer_correct(logits, 10, (4, 8))
    assert not answer_correct(logits, 9, (4, 7))


@pytest.mark.parametrize("nq,nk,B", [(97, 97, 16), (40, 130, 16), (64, 64, 32)])
def test_oracle_mask_is_minimal_and_reaches_target(nq, nk, B):
    H = 3
    q, k = torch.randn(1, H, nq, 8) * 3, torch.randn(1, H, nk, 8) * 3
    mass = block_mass(q, k, 1 / math.sqrt(8), B)[0]
    causal, diag = causal_block_mask(nq, nk, B), diagonal_block_mask(nq, nk, B)
    for target in (0.5, 0.9, 0.99):
        m = oracle_mask(mass, nq, nk, B, target)
        assert not (m & ~causal).any() and (m >= diag).all()
        got = (mass * m).sum((-1, -2)) / nq
        assert (got >= target - 1e-9).all()
        for h in range(H):  # dropping its lightest non-diagonal block falls below the target
            extra = m[h] & ~diag
            if extra.any() and (mass[h] * diag).sum() / nq < target:
                lightest = mass[h][extra].min()
                assert float(got[h] - lightest / nq) < target + 1e-9


def test_streaming_artifact_matches_density_and_shape():
    model = tiny_model()
    dam = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    for n in (160, 1000):
        d = mean_artifact_density(dam, n)
        s = streaming_artifact(dam, n, d)
        assert s.head_program.shape == dam.head_program.shape
        p = s.programs[0]
        assert p.sink == 16 and p.window % 16 == 0 and not p.dense
        step = MaskProgram(sink=16, window=16).density(n, n, 16) - MaskProgram(sink=16).density(n, n, 16)
        assert abs(p.density(n, n, 16) - d) <= step
    with pytest.raises(DamRuntimeError):
        streaming_artifact(dam, 100, 0.0)


def test_minference_mask_reaches_density_and_favours_heavy_columns():
    nq = nk = 256
    B, H = 16, 2
    q = torch.randn(1, H, nq, 8)
    k = torch.randn(1, 1, nk, 8)
    u = torch.nn.functional.normalize(torch.randn(8), dim=0)
    q[0, 0, -32:] = 6 * u
    k[0, 0, 100:104] = 6 * u  # the last queries of head 0 attend key block 6
    causal = causal_block_mask(nq, nk, B)
    for dens in (0.35, 0.6):  # diagonal + first block alone: 31 / 136 blocks
        m = minference_mask(q, k, 1 / math.sqrt(8), B, dens, last_q=32)
        kept = (m & causal).sum((-1, -2)).double() / causal.sum()
        assert (kept >= dens - 1e-9).all() and (kept <= dens + 0.1).all()
        assert m[0][6:, 6].all()  # the vertical column of the hot key block
        assert (m >= diagonal_block_mask(nq, nk, B)).all()


def _eval(methods=("dam", "streaming", "oracle", "minference", "dam-paper")):
    torch.manual_seed(0)
    model = tiny_model()
    dam = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    paper = make_artifact(model.config, MIXED_PROGRAMS, block_size=16, seed=3)
    samples = [EvalSample("text", torch.randint(0, 128, (200,))),
               EvalSample("passkey", torch.randint(0, 128, (150,)), answer_ids=(5, 6))]
    rep = evaluate(model, {"dam": dam, "dam-paper": paper}, samples,
                   EvalConfig(methods=methods, backend="cpu"))
    return model, dam, samples, rep


def test_evaluate_matches_direct_runs():
    model, dam, samples, rep = _eval()
    ids = samples[0].input_ids
    with torch.no_grad():
        dense = model(ids[None]).logits[0]
    runs = {(r.method, r.kind): r for r in rep.results}
    assert {m for m, _ in runs} == {"dense", "dam", "streaming", "oracle", "minference", "dam-paper"}
    # DAM: the same forward as apply + measure_recall
    with rt.apply(model, dam, backend="cpu", min_length=1) as h:
        mr = measure_recall(model, h, ids[None], keep_logits=True)
    r = runs[("dam", "text")]
    assert r.density == pytest.approx(mr.mean_density) and r.recall == pytest.approx(mr.mean_recall)
    top1, kl, nll, dnll = compare_logits(dense, mr.logits, ids)
    assert (r.top1, r.kl, r.nll) == (pytest.approx(top1), pytest.approx(kl), pytest.approx(nll))
    q4 = 3 * ids.numel() // 4  # the last quarter of the positions alone
    lg, dn = mr.logits[q4:], dense[q4:]
    assert r.top1_q4 == pytest.approx(float((lg.argmax(-1) == dn.argmax(-1)).double().mean()))
    assert r.kl_q4 == pytest.approx(compare_logits(dense[q4:], mr.logits[q4:], ids[q4:])[1])
    assert runs[("dense", "text")].nll == pytest.approx(dnll)
    assert runs[("dense", "text")].top1 == 1.0 and runs[("dense", "text")].kl == pytest.approx(0, abs=1e-7)
    # the baselines: density matched to DAM's on the same input, oracle at DAM's recall
    assert runs[("oracle", "text")].recall >= r.recall - 1e-6
    assert runs[("oracle", "text")].density <= r.density + 1e-9
    assert runs[("minference", "text")].density >= r.density - 1e-9
    assert abs(runs[("streaming", "text")].density - r.density) < 0.1
    # the oracle run equals a direct run of its hook
    with rt.apply(model, dam, backend="cpu", min_length=1) as h:
        h.layout_hook = OracleHook(h, r.recall)
        orr = measure_recall(model, h, ids[None], keep_logits=True)
    assert runs[("oracle", "text")].density == pytest.approx(orr.mean_density)
    assert runs[("oracle", "text")].top1 == pytest.approx(compare_logits(dense, orr.logits, ids)[0])
    # retrieval: correctness is the dense argmax check
    full = torch.cat([samples[1].input_ids, torch.tensor([5, 6])])
    with torch.no_grad():
        dl = model(full[None]).logits[0]
    assert runs[("dense", "passkey")].correct == answer_correct(dl, 150, (5, 6))


def test_report_rows_table_and_json():
    _, _, _, rep = _eval(methods=("dam", "minference"))
    rows = rep.rows()
    assert [(r["length"], r["method"]) for r in rows] == [(150, "dense"), (150, "dam"), (150, "minference"),
                                                          (200, "dense"), (200, "dam"), (200, "minference")]
    t = {(r["length"], r["method"]): r for r in rows}
    assert t[(200, "dense")]["dppl"] == pytest.approx(0.0)
    assert t[(200, "dam")]["dppl"] == pytest.approx(t[(200, "dam")]["ppl"] / t[(200, "dense")]["ppl"] - 1)
    assert "passkey_acc" in t[(150, "dam")] and "top1" not in t[(150, "dam")]
    assert len(t[(200, "dam")]["layer_density"]) == 2
    assert np.asarray(t[(200, "dam")]["head_density"]).shape == (2, 4)
    table = rep.format_table()
    assert "minference" in table and "ΔPPL" in table
    import json

    json.dumps(rep.to_json(), allow_nan=True)


def test_eval_config_checks():
    with pytest.raises(DamRuntimeError):
        EvalConfig(methods=("streaming",))
    with pytest.raises(DamRuntimeError):
        EvalConfig(tasks=("nope",))
    for bad in (0, True, 1.5):
        with pytest.raises(DamRuntimeError, match="recall_stride"):
            EvalConfig(recall_stride=bad)
    with pytest.raises(DamRuntimeError):
        EvalSample("passkey", torch.arange(10))
    model = tiny_model()
    dam = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    with pytest.raises(DamRuntimeError, match="dam-paper"):
        evaluate(model, {"dam": dam}, [EvalSample("text", torch.arange(40))],
                 EvalConfig(methods=("dam", "dam-paper")))


def test_minference_hook_runs_in_the_model():
    model = tiny_model()
    dam = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    ids = torch.randint(0, 128, (1, 130))
    with rt.apply(model, dam, backend="cpu", min_length=1) as h:
        h.layout_hook = MInferenceHook(h, 0.5, last_q=16)
        rep = measure_recall(model, h, ids)
    assert rep.mean_density >= 0.5 - 1e-9 and 0 < rep.mean_recall <= 1


def test_bench_tiny_cpu():
    model = tiny_model()
    dam = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    inputs = {128: torch.randint(0, 128, (1, 128)), 96: torch.randint(0, 128, (1, 96))}
    rep = bench(model, dam, inputs, BenchConfig(repeats=2, warmup=1, decode_tokens=2, backend="cpu", min_length=1))
    assert [r.length for r in rep.rows] == [96, 128]
    for r in rep.rows:
        for name in ("prefill_dense_s", "prefill_dam_s", "decode_dense_s_per_token", "decode_dam_s_per_token",
                     "attn_dense_s", "attn_dam_s"):
            assert getattr(r, name) > 0
        assert r.prefill_speedup == pytest.approx(r.prefill_dense_s / r.prefill_dam_s)
        assert 0 < r.attn_layer_density <= 1 and r.attn_layer == 1
    assert rep.device == "cpu" and rep.dtype == "float32"
    assert "prefill dense" in rep.format_table()
    assert not any(getattr(m, "_dam_layer", None) for m in model.modules())  # handles removed
    with pytest.raises(DamRuntimeError):
        BenchConfig(repeats=0)


def test_bench_prefill_only_skips_the_extras():
    import math

    model = tiny_model()
    dam = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    rep = bench(model, dam, {128: torch.randint(0, 128, (1, 128))},
                BenchConfig(repeats=1, warmup=0, decode_tokens=1, backend="cpu", min_length=1, prefill_only=True))
    (r,) = rep.rows
    assert r.prefill_dense_s > 0 and r.prefill_dam_s > 0 and r.decode_dam_s_per_token > 0
    assert math.isnan(r.attn_share) and math.isnan(r.attn_dam_s) and math.isnan(r.density)
    assert r.peak_mem_dense_bytes is None and r.dense_layers is None and rep.config["prefill_only"] is True
    row = rep.format_table().splitlines()[2].split()
    assert row[0] == "128" and row[4] == row[7] == "-" and "nan" not in rep.format_table()


def test_harness_imports_without_zarr_sklearn_or_profiler():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('zarr', 'sklearn') or name.startswith('dam.profiler'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dam.runtime.eval.evaluate, dam.runtime.eval.baselines, dam.runtime.eval.bench\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_evaluate_reports_progress_from_zero_to_total():
    """The bar appears before the first (dense) forward and ends at (sample, method) runs done."""
    torch.manual_seed(0)
    model = tiny_model()
    dam = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    calls = []
    evaluate(model, {"dam": dam}, [EvalSample("text", torch.randint(0, 128, (40,)))] * 2,
             EvalConfig(methods=("dam", "streaming"), tasks=("fidelity",), backend="cpu"),
             progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(7)]


def test_passkey_accuracy_per_depth():
    """Retrieval samples that carry a depth are reported per depth as well as in all."""
    torch.manual_seed(0)
    model = tiny_model()
    dam = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    samples = [EvalSample("passkey", torch.randint(0, 128, (60,)), answer_ids=(5, 6), depth=d)
               for d in (0.1, 0.1, 0.9)]
    rep = evaluate(model, {"dam": dam}, samples, EvalConfig(methods=("dam",), tasks=("passkey",), backend="cpu"))
    for row in rep.rows():
        by = row["passkey_by_depth"]
        assert set(by) == {"0.1", "0.9"} and row["passkey_n"] == 3
        runs = [r for r in rep.results if r.method == row["method"]]
        assert by["0.9"] == float(bool(runs[2].correct))
        assert row["passkey_acc"] == pytest.approx(sum(float(bool(r.correct)) for r in runs) / 3)


def test_fidelity_per_domain():
    """Text windows tagged with their source are reported per domain: each domain's means and its
    ΔPPL against dense on that domain's windows alone, beside the means over all windows."""
    torch.manual_seed(0)
    model = tiny_model()
    dam = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    samples = [EvalSample("text", torch.randint(0, 128, (96,)), domain=d) for d in ("code", "prose", "prose")]
    rep = evaluate(model, {"dam": dam}, samples, EvalConfig(methods=("dam",), tasks=("fidelity",), backend="cpu"))
    row = next(r for r in rep.rows() if r["method"] == "dam")
    runs = {m: [r for r in rep.results if r.method == m] for m in ("dense", "dam")}
    assert set(row["by_domain"]) == {"code", "prose"} and row["by_domain"]["prose"]["samples"] == 2
    prose = row["by_domain"]["prose"]
    assert prose["top1"] == pytest.approx((runs["dam"][1].top1 + runs["dam"][2].top1) / 2)
    assert prose["kl"] == pytest.approx((runs["dam"][1].kl + runs["dam"][2].kl) / 2)
    want = math.exp((runs["dam"][1].nll + runs["dam"][2].nll) / 2) / math.exp((runs["dense"][1].nll + runs["dense"][2].nll) / 2)
    assert prose["dppl"] == pytest.approx(want - 1)
    assert row["by_domain"]["code"]["kl"] == pytest.approx(runs["dam"][0].kl)
    assert row["kl"] == pytest.approx(sum(r.kl for r in runs["dam"]) / 3)
    one = evaluate(model, {"dam": dam}, samples[:1], EvalConfig(methods=("dam",), tasks=("fidelity",), backend="cpu"))
    assert all("by_domain" not in r for r in one.rows())  # one domain: nothing to split


def test_floor_row_is_the_dtype_against_float32():
    """Row ``floor``: dense in the eval dtype against dense float32 on the same window (the best
    top-1 any method can reach in that dtype), with float32's NLL; retrieval prompts get none."""
    import copy

    torch.manual_seed(0)
    ref = tiny_model()
    model = copy.deepcopy(ref).to(torch.bfloat16)
    dam = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    ids = torch.randint(0, 128, (96,))
    samples = [EvalSample("text", ids), EvalSample("passkey", torch.randint(0, 128, (60,)), answer_ids=(5,))]
    seen = []
    rep = evaluate(model, {"dam": dam}, samples, EvalConfig(methods=("dam",), tasks=("fidelity", "passkey"),
                                                             backend="cpu"),
                   progress=lambda d, t: seen.append((d, t)), floor_model=ref)
    assert seen[-1] == (5, 5)  # 2 samples x (dense + dam) + one floor run
    floor = [r for r in rep.results if r.method == "floor"]
    assert len(floor) == 1
    with torch.no_grad():
        lf, lb = ref(ids[None]).logits[0], model(ids[None]).logits[0]
    top1, kl, _, nll32 = compare_logits(lf, lb, ids)
    assert floor[0].top1 == pytest.approx(top1) and floor[0].kl == pytest.approx(kl, rel=1e-5)
    assert floor[0].nll == pytest.approx(nll32, rel=1e-6)
    assert 0 < floor[0].kl  # bf16 moves the logits
    row = next(r for r in rep.rows() if r["method"] == "floor")
    assert row["dppl"] == pytest.approx(math.exp(nll32) / row["ppl_dense"] - 1)
