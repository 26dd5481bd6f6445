"""Run one vLLM engine (in its own process: vLLM spawns workers, so it must run under
``__main__``) and write what the tests compare: python _serve.py ARGS.json OUT.json.

ARGS: ``model`` (a local directory), ``prompts`` (lists of token ids), ``max_tokens``,
``additional_config`` (dict or null), ``engine`` (extra ``LLM`` keyword arguments)."""

from __future__ import annotations

import json
import sys


def main() -> None:
    args = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = dict(dtype="bfloat16", enforce_eager=True, max_model_len=8192, seed=0,
                  enable_prefix_caching=False, max_num_seqs=8, gpu_memory_utilization=0.25)
    engine.update(args.get("engine") or {})
    llm = LLM(model=args["model"], additional_config=args.get("additional_config") or {}, **engine)
    sp = SamplingParams(temperature=0.0, max_tokens=int(args["max_tokens"]), logprobs=5)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in args["prompts"]], sp, use_tqdm=False)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append({"tokens": list(c.token_ids),
                    "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in (c.logprobs or [])]})
    with open(sys.argv[2], "w") as fh:
        json.dump(res, fh)


if __name__ == "__main__":
    main()
