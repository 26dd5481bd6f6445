"""The method registry: parsing, errors, parameterised variants run as their plain method would."""

from __future__ import annotations

import math

import pytest
import torch

import dam.runtime as rt
from dam.runtime.errors import DamRuntimeError
from dam.runtime.eval import EvalConfig, EvalSample, evaluate
from dam.runtime.eval.baselines import MInferenceHook
from dam.runtime.eval.methods import REGISTRY, Method, Plan, parse, register
from dam.runtime.eval.recall import measure_recall

from .._helpers import MIXED_PROGRAMS, make_artifact, tiny_model


def test_parse_names_parameters_and_artifacts():
    s = parse("minference:last_q=32")
    assert (s.name, s.kind, dict(s.params)) == ("minference:last_q=32", "minference", {"last_q": "32"})
    assert parse("dam").kind == "dam"
    s = parse("dam-paper", {"dam-paper": object()})
    assert s.kind == "artifact" and s.params["name"] == "dam-paper"
    with pytest.raises(DamRuntimeError, match="unknown method 'nope'.*streaming"):
        parse("nope")
    with pytest.raises(DamRuntimeError, match="unknown parameter"):
        parse("streaming:window=3")
    with pytest.raises(DamRuntimeError, match="key=value"):
        parse("dam:0.1")
    with pytest.raises(DamRuntimeError, match="artifact"):  # 'artifact' is reached by naming one
        parse("artifact")


def _setup(n=160):
    torch.manual_seed(0)
    model = tiny_model()
    art = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    return model, art, torch.randint(0, 128, (n,))


def test_variant_runs_as_the_plain_method_with_that_parameter():
    model, art, ids = _setup()
    rep = evaluate(model, {"dam": art}, [EvalSample("text", ids)],
                   EvalConfig(methods=("dam", "dam:last_query=0.3", "minference:last_q=16"), tasks=("fidelity",),
                              backend="cpu"))
    runs = {r.method: r for r in rep.results}
    dam = runs["dam"]
    with rt.apply(model, art, backend="cpu", min_length=1, last_query=0.3) as h:
        more = measure_recall(model, h, ids[None])
    assert runs["dam:last_query=0.3"].density == pytest.approx(more.mean_density)
    assert runs["dam:last_query=0.3"].density > dam.density  # the estimate adds blocks
    with rt.apply(model, art, backend="cpu", min_length=1, last_query=0.0) as h:
        h.layout_hook = MInferenceHook(h, dam.density, last_q=16)
        mi = measure_recall(model, h, ids[None])
    assert runs["minference:last_q=16"].density == pytest.approx(mi.mean_density)
    assert [r["method"] for r in rep.rows()] == ["dense", "dam", "dam:last_query=0.3", "minference:last_q=16"]


def test_registered_method_is_run():
    model, art, ids = _setup()
    seen = []

    def build(spec, ctx):
        seen.append((ctx.density, ctx.length))
        return Plan(art, last_query=0.0)

    register(Method("probe-static", "the programs alone", True, (), build))
    try:
        rep = evaluate(model, {"dam": art}, [EvalSample("text", ids)],
                       EvalConfig(methods=("dam", "probe-static"), tasks=("fidelity",), backend="cpu"))
    finally:
        del REGISTRY["probe-static"]
    dam = next(r for r in rep.results if r.method == "dam")
    assert seen == [(pytest.approx(dam.density), ids.numel())]


def test_handle_scaling_and_capture():
    model, art, ids = _setup(96)
    with rt.apply(model, art, backend="cpu", min_length=1) as h:
        mod = model.model.layers[1].self_attn
        assert h.scaling(1) == pytest.approx(mod.scaling)
        assert h.scaling(1) == pytest.approx(1 / math.sqrt(mod.head_dim))
        with pytest.raises(DamRuntimeError, match="layer 9"):
            h.scaling(9)
        with h.capture(1) as got, torch.no_grad():
            out = model(ids[None]).logits
        assert set(got) == {"q", "k", "v", "scale", "layout"}
        H, Hkv, D = model.config.num_attention_heads, model.config.num_key_value_heads, mod.head_dim
        assert got["q"].shape == (1, H, 96, D) and got["k"].shape == got["v"].shape == (1, Hkv, 96, D)
        assert got["layout"].num_q_blocks == 6
        with pytest.raises(DamRuntimeError, match="already"), h.capture(0), h.capture(0):
            pass
        with torch.no_grad():
            torch.testing.assert_close(model(ids[None]).logits, out)  # capture changes nothing
