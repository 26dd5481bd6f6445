"""LazyLogits: rows computed from hidden states equal the model's own logits; the harness gives the
same figures with them."""

from __future__ import annotations

import pytest
import torch

from dam.runtime.eval import EvalConfig, EvalSample, evaluate
from dam.runtime.eval import logits as lg
from dam.runtime.eval.evaluate import answer_correct, compare_logits, compare_tail

from ..._helpers_hybrid import tiny_gemma3
from .._helpers import MIXED_PROGRAMS, make_artifact, tiny_model

EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("which", ["llama", "gemma3-softcap"])
def test_lazy_rows_equal_the_model_logits(monkeypatch, which):
    if which == "llama":
        model = tiny_model()
        vocab = 128
    else:
        model = tiny_gemma3(dtype=torch.float32, attn="sdpa")
        model.config.final_logit_softcapping = 3.0  # small: the cap bends these logits
        vocab = 257
    ids = torch.randint(0, vocab, (1, 90))
    with torch.no_grad():
        want = model(ids).logits[0]
    assert lg.forward_logits(model, ids).shape == want.shape  # small: the plain tensor
    monkeypatch.setattr(lg, "LAZY_ABOVE", 0)
    lazy = lg.forward_logits(model, ids)
    assert isinstance(lazy, lg.LazyLogits) and lazy.shape == want.shape and len(lazy) == 90
    tol = dict(rtol=64 * EPS32, atol=64 * EPS32 * float(want.abs().max()))
    torch.testing.assert_close(lazy.float(), want, **tol)
    torch.testing.assert_close(lazy[30:61].float(), want[30:61], **tol)
    assert torch.equal(lazy[5:9].argmax(-1), want[5:9].argmax(-1))
    other = want + 0.1 * torch.randn_like(want)
    got, ref = compare_logits(lazy, other, ids[0]), compare_logits(want, other, ids[0])
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert compare_tail(lazy, other, ids[0]) == pytest.approx(compare_tail(want, other, ids[0]), rel=1e-4, abs=1e-6)
    assert answer_correct(lazy, 50, want[49:52].argmax(-1).tolist())


def test_evaluate_is_the_same_with_lazy_logits(monkeypatch):
    torch.manual_seed(0)
    model = tiny_model()
    art = make_artifact(model.config, MIXED_PROGRAMS, block_size=16)
    samples = [EvalSample("text", torch.randint(0, 128, (160,))),
               EvalSample("passkey", torch.randint(0, 128, (120,)), answer_ids=(5, 6))]
    cfg = EvalConfig(methods=("dam", "minference"), backend="cpu")
    plain = evaluate(model, {"dam": art}, samples, cfg).rows()
    monkeypatch.setattr(lg, "LAZY_ABOVE", 0)
    lazy = evaluate(model, {"dam": art}, samples, cfg).rows()
    for a, b in zip(plain, lazy, strict=True):
        for key in ("density", "recall", "top1", "kl", "dppl", "passkey_acc"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
