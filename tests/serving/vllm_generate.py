"""Run in the vLLM venv: greedy generations with log-probabilities from vLLM for model folders.

``python vllm_generate.py spec.json out.json``; the spec has ``models`` (list of
``{"name", "path"}``), ``prompts`` (token-id lists), ``max_tokens`` and ``logprobs``, optionally
``skip_tokenizer_init`` (folders without a tokenizer: token ids in and out). All models
run one after the other in this one process (vLLM's start-up is the expensive part), each freed
before the next. The output records, per model, the architecture vLLM resolved, whether the
SlimGPT plugin's architectures were registered in this process, the generated token ids, the
top-``logprobs`` log-probabilities of every generated and prompt position, and timings.
"""

from __future__ import annotations

import gc
import json
import sys
import time


def _top(entry: dict | None) -> dict[str, float]:
    if not entry:
        return {}
    return {str(tok): float(lp.logprob) for tok, lp in entry.items()}


def run(spec: dict) -> dict:
    t_import = time.perf_counter()
    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.inputs import TokensPrompt

    results: dict = {"import_s": round(time.perf_counter() - t_import, 2), "models": {}}
    no_tokenizer = bool(spec.get("skip_tokenizer_init", False))
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            logprobs=spec["logprobs"], prompt_logprobs=spec["logprobs"],
                            seed=0, detokenize=not no_tokenizer)
    for model in spec["models"]:
        t0 = time.perf_counter()
        llm = LLM(model=model["path"], dtype="float32", enforce_eager=True, seed=0,
                  # on CPU this share of host memory is reserved for the KV cache
                  gpu_memory_utilization=spec.get("memory_utilization", 0.2),
                  max_model_len=spec.get("max_model_len", 512),
                  max_num_seqs=len(spec["prompts"]), skip_tokenizer_init=no_tokenizer)
        t1 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params,
                            use_tqdm=False)
        t2 = time.perf_counter()
        config = llm.llm_engine.model_config
        results["models"][model["name"]] = {
            "architectures": list(config.architectures),
            "plugin_registered": "SlimGPTLlamaForCausalLM" in ModelRegistry.get_supported_archs(),
            "outputs": [{
                "token_ids": list(o.outputs[0].token_ids),
                "logprobs": [_top(step) for step in (o.outputs[0].logprobs or [])],
                "prompt_logprobs": [_top(step) for step in (o.prompt_logprobs or [])],
            } for o in outs],
            "startup_s": round(t1 - t0, 2),
            "generate_s": round(t2 - t1, 2),
        }
        del llm, outs
        gc.collect()
    return results


if __name__ == "__main__":  # vLLM starts worker processes that re-import the main module
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    result = run(spec)
    with open(sys.argv[2], "w") as fh:
        json.dump(result, fh)
