"""Arguments of `slimgpt prune`. Torch-free, so `slimgpt --help` stays instant."""

from __future__ import annotations

import argparse
from typing import Any

from slimgpt_core.schedule import GQA_POLICIES, SCHEDULES


def add_prune_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prune",
        help="prune a model locally with SlimGPT and write a loadable folder",
        description="Prune a model of a supported family (Llama, Mistral, Qwen2/3, Gemma 2/3, "
        "Phi-3/4, OLMo-2, Granite; Hub id, local folder or .gguf file) with "
        "SlimGPT and write a Hugging Face folder that standard tools load.",
    )
    p.add_argument("--model", required=True, help="Hub id, local HF folder, or .gguf file")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--ratio", type=float, required=True,
                   help="share of decoder-layer parameters to remove, in (0, 0.9]")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--calib", default=None,
                   help="calibration text (.txt or .jsonl with a 'text' field); "
                   "default: the bundled excerpt of the Python docs")
    p.add_argument("--eval", dest="eval_file", default=None,
                   help="held-out text for perplexity before/after")
    p.add_argument("--eval-windows", type=int, default=32,
                   help="number of eval windows of --seqlen tokens (default 32)")
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="per-layer ratio schedule (default log; uniform with --profile uniform)")
    p.add_argument("--alpha", type=float, default=0.25, help="r_0 = alpha * r_last (log/linear)")
    p.add_argument("--gqa-policy", default="balanced", choices=GQA_POLICIES,
                   help="how grouped-query heads are removed (default balanced)")
    p.add_argument("--head-ratio", type=float, default=None, help="fixed head ratio per layer")
    p.add_argument("--ffn-ratio", type=float, default=None, help="fixed FFN ratio per layer")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--min-group", type=int, default=64,
                   help="smallest FFN channel group (1 = exact greedy)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per layer forward")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations in CPU memory")
    p.add_argument("--profile", default="hetero", choices=["hetero", "uniform"],
                   help="artifact profile (uniform implies the uniform schedule)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="per-layer checkpoints; rerunning with the same folder resumes")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reloading the folder in a fresh process to compare logits")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.set_defaults(handler=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    from slimgpt_core.cli import run_prune

    return run_prune(args)
