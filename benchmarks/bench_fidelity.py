"""Predicted vs measured recall of a DAM artifact, per head, and top-1 agreement with dense.

For each held-out prompt (text the profile never saw): one dense forward (logits) and one DAM
forward through ``dam.runtime.eval.recall.measure_recall``, which scores the layout every layer really
ran (static programs + dynamic blocks from pooled q.k) against the exact attention of that
input. Reported per head: the artifact's predicted ``recall`` (compiler, calibration data) vs the
measured recall, the static-only recall, the recall a mass-ranked (oracle) selector would reach
with the same dynamic budget, and the block density; per prompt: top-1 agreement over the last
``--last`` positions and mean KL(dense || dam).

    python benchmarks/bench_fidelity.py --artifact A.safetensors --data /usr/share/common-licenses \\
        --length 2048 --prompts 2 --out benchmarks/results/fidelity_smollm2.json

With ``--profile STORE`` (and no ``--artifact``) it compiles the artifact itself with
``--recall`` / ``--target-length`` / ``--overselect`` / ``--max-verticals`` / ``--max-sink`` /
``--no-block-slashes``; a missing STORE is first profiled (``--profile-data``, default builtin:mix,
``--profile-samples`` x ``--length``). ``--data licenses`` evaluates on the license texts of
/usr/share/common-licenses (copied as .txt into a temp dir). The recorded result:

    python benchmarks/bench_fidelity.py --profile /tmp/fid/mix2k.zarr --recall 0.99 --target-length 2048 \
        --max-verticals 0 --max-sink 64 --no-block-slashes --data licenses --prompts 2 \
        --out benchmarks/results/fidelity_smollm2.json
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("bench_fidelity")


def _len(s: str) -> int:
    s = s.strip().lower()
    return int(s[:-1]) * 1024 if s.endswith("k") else int(s)


def _dyn(art) -> np.ndarray:
    fr = np.array([p.dynamic_fraction if not p.dense else 0.0 for p in art.programs])
    return fr[art.head_program]


def evaluate(model, tok, art, ids: torch.Tensor, last: int, min_length: int, backend: str) -> dict:
    import dam.runtime as rt
    from dam.runtime.eval.recall import measure_recall, top1_agreement

    t = time.perf_counter()
    with torch.no_grad():
        dense = model(ids).logits
    t_dense = time.perf_counter() - t
    t = time.perf_counter()
    with rt.apply(model, art, backend=backend, min_length=min_length) as h:
        rep = measure_recall(model, h, ids, keep_logits=True)
    t_dam = time.perf_counter() - t
    sp = rep.logits
    d, s = dense[0, -last:].double(), sp[0, -last:].double()
    kl = (F.softmax(d, -1) * (F.log_softmax(d, -1) - F.log_softmax(s, -1))).sum(-1).mean()
    pred = np.asarray(art.recall, dtype=np.float64)
    meas = rep.recall.numpy()
    dyn = _dyn(art) > 0
    dense_heads = np.array([p.dense for p in art.programs])[art.head_program]
    gap = pred - meas
    out = {
        "length": int(ids.shape[1]),
        "top1_last": top1_agreement(dense, sp, last),
        "top1_all": top1_agreement(dense, sp),
        "kl_last": float(kl),
        **rep.summary(),
        "mean_predicted_recall": float(pred.mean()),
        "heads_below_target": int((meas < art.metadata["compile"]["recall"]).sum()),
        "mean_gap_dynamic_heads": float(gap[dyn].mean()) if dyn.any() else None,
        "mean_gap_static_heads": float(gap[~dyn & ~dense_heads].mean()) if (~dyn & ~dense_heads).any() else None,
        "mean_selector_loss_dynamic_heads": float((rep.oracle_recall.numpy() - meas)[dyn].mean()) if dyn.any() else None,
        "worst_heads": [
            {"layer": int(i // meas.shape[1]), "head": int(i % meas.shape[1]), "predicted": float(pred.flat[i]),
             "measured": float(meas.flat[i]), "static": float(rep.static_recall.numpy().flat[i]),
             "oracle": float(rep.oracle_recall.numpy().flat[i]), "density": float(rep.density.numpy().flat[i]),
             "program": repr(art.program_for(int(i // meas.shape[1]), int(i % meas.shape[1])))}
            for i in np.argsort(meas.ravel())[:10]
        ],
        "per_head": {
            "predicted": np.round(pred, 5).tolist(), "measured": np.round(meas, 5).tolist(),
            "static": np.round(rep.static_recall.numpy(), 5).tolist(),
            "oracle": np.round(rep.oracle_recall.numpy(), 5).tolist(),
            "density": np.round(rep.density.numpy(), 5).tolist(),
        },
        "seconds_dense": t_dense, "seconds_dam_with_measurement": t_dam,
    }
    return out


def _licenses_dir() -> str:
    src = "/usr/share/common-licenses"
    out = tempfile.mkdtemp(prefix="dam_licenses_")
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out, name + ".txt"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--profile", default=None, help="compile from this store instead of --artifact")
    ap.add_argument("--recall", type=float, default=0.95)
    ap.add_argument("--target-length", default=None)
    ap.add_argument("--overselect", type=float, default=None)
    ap.add_argument("--no-dynamic", action="store_true")
    ap.add_argument("--max-verticals", type=int, default=None)
    ap.add_argument("--max-slashes", type=int, default=None)
    ap.add_argument("--max-sink", type=int, default=None)
    ap.add_argument("--no-block-slashes", action="store_true")
    ap.add_argument("--data", default="/usr/share/common-licenses")
    ap.add_argument("--length", default="2048")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--last", type=int, default=512)
    ap.add_argument("--min-length", type=int, default=256)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--save-artifact", default=None)
    ap.add_argument("--profile-data", default="builtin:mix")
    ap.add_argument("--profile-samples", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from dam.compiler import CompileConfig, compile_profile, load_artifact, save_artifact
    from dam.profiler import calibration_samples, load_model

    n = _len(args.length)
    if args.data == "licenses":
        args.data = _licenses_dir()
    if args.profile and not args.artifact and not os.path.exists(args.profile):
        from dam.profiler import ProfileConfig, profile

        profile(ProfileConfig(model=args.model, out=args.profile, data=args.profile_data, length=n,
                              samples=args.profile_samples, capture_length=64, block_size=64))
    if args.artifact:
        art = load_artifact(args.artifact)
    else:
        kw = {}
        if args.overselect is not None:
            kw["dynamic_overselect"] = args.overselect
        if args.max_verticals is not None:
            kw["max_verticals"] = args.max_verticals
        if args.no_block_slashes:
            kw["block_slashes"] = False
        if args.max_sink is not None:
            kw["max_sink"] = args.max_sink
        if args.max_slashes is not None:
            kw["max_slashes"] = args.max_slashes
        cfg = CompileConfig(recall=args.recall, target_length=_len(args.target_length) if args.target_length else None,
                            dynamic=not args.no_dynamic, **kw)
        t = time.perf_counter()
        art = compile_profile(args.profile, cfg).artifact
        log.info("compiled in %.1f s: %s", time.perf_counter() - t, art.metadata["figures"])
        if args.save_artifact:
            save_artifact(art, args.save_artifact)
    model, tok = load_model(args.model)
    ids = calibration_samples(args.data, tok, n, args.prompts, seed=args.seed, start=args.start)
    prompts = []
    for i in range(args.prompts):
        r = evaluate(model, tok, art, ids[i:i + 1], args.last, args.min_length, args.backend)
        log.info("prompt %d: top1(last %d) %.4f KL %.4f measured recall %.4f (static %.4f, oracle %.4f) "
                 "predicted %.4f density %.4f", i, args.last, r["top1_last"], r["kl_last"], r["mean_recall"],
                 r["mean_static_recall"], r["mean_oracle_recall"], r["mean_predicted_recall"], r["mean_density"])
        prompts.append(r)
    res = {"args": vars(args), "artifact": {"figures": art.metadata["figures"], "compile": art.metadata["compile"],
                                            "calibration": art.metadata.get("calibration")},
           "prompts": prompts}
    if args.out:
        from dam.runtime.eval.record import write_result

        write_result(args.out, res, dtype="float32", device="cpu")
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
