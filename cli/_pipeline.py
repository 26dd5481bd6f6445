"""Orchestration shared by ``dam eval`` and ``dam demo``: building evaluation inputs from the
profiler's data sources, baseline artifacts with the compiler, and writing JSON + PNG plots.
(cli may import every stage; the runtime harness itself never sees the profiler or zarr.)"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

log = logging.getLogger(__name__)

# sample seeds of the synthetic retrieval prompts used for evaluation: far from the profiler's
# (sample j of a profile run uses seed * 1000003 + j), so no prompt is one the profile saw
RETRIEVAL_SEED_BASE = 7_000_000


def build_samples(tokenizer, data: str, lengths: Sequence[int], tasks: Sequence[str], samples: int,
                  *, seed: int = 0, start: int = 64, passkey_depths: Sequence[float] | None = None):
    """EvalSamples: ``samples`` text windows of each source of ``data`` (items ``start ..`` of that
    source's stream; the source is the window's ``domain``) per length when fidelity or recall is
    asked, and ``samples`` passkey / kv-retrieval prompts per length when asked (with
    ``passkey_depths``: ``samples`` pass-key prompts at each of those depths)."""
    import torch

    from dam.profiler import calibration_samples, make_kv_retrieval_ids, make_passkey_ids
    from dam.profiler.data import parse_data_spec
    from dam.runtime.eval.evaluate import EvalSample

    out = []
    for n in lengths:
        if "fidelity" in tasks or "recall" in tasks:  # retrieval-only runs need no text windows
            for source in parse_data_spec(data):
                text = calibration_samples(source, tokenizer, n, samples, seed=seed, start=start)
                out += [EvalSample("text", row.clone(), domain=source) for row in text]
        # the answer as it continues the prompt: ' 12345' after "The pass key is", ' "<uuid>' after
        # "...the specified key is:" (values are quoted in the prompt's JSON)
        for task, make, lead in (("passkey", make_passkey_ids, " "), ("kv-retrieval", make_kv_retrieval_ids, ' "')):
            if task not in tasks:
                continue
            depths = passkey_depths if task == "passkey" and passkey_depths else (None,)
            for i in range(samples):
                seed_i = RETRIEVAL_SEED_BASE + 1000 * n + i
                for depth in depths:
                    ids, ans = make(tokenizer, n, seed_i) if depth is None else make(tokenizer, n, seed_i, depth)
                    ans_ids = tokenizer(lead + ans, add_special_tokens=False)["input_ids"]
                    out.append(EvalSample(task, torch.tensor(ids, dtype=torch.long), tuple(ans_ids), ans,
                                          depth=depth))
    return out


def paper_artifact(store: str, target_length: int | None = None):
    """The seed paper's method compiled from a profile store (``dam compile --method dam-paper``)."""
    from dam.compiler import CompileConfig, compile_profile

    return compile_profile(store, CompileConfig(method="dam-paper", target_length=target_length)).artifact


def write_report(report, out_dir: str, meta: dict | None = None, prefix: str = "eval") -> list[str]:
    """``{prefix}.json`` and the PNG plots into ``out_dir``; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    import sys

    from dam.runtime.eval.evaluate import plot_report
    from dam.runtime.eval.record import write_result

    data = report.to_json()
    meta = dict(meta or {})
    path = os.path.join(out_dir, f"{prefix}.json")
    write_result(path, data, command="dam " + " ".join(sys.argv[1:]), dtype=meta.pop("dtype", None),
                 device=meta.pop("device", None), **meta)

    return [path, *plot_report(data["rows"], out_dir, prefix)]


def tqdm_progress(desc: str, unit: str = "run"):
    """A ``progress(done, total)`` callback driving one tqdm bar, and a closer."""
    from tqdm import tqdm

    bars: list = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=desc, unit=unit))
        bars[0].total = total
        bars[0].n = done
        bars[0].refresh()

    def close() -> None:
        for b in bars:
            b.close()

    return progress, close
