"""Fisher selection + dense target + allocation over calibration seeds, beside the same
without Fisher selection, on SmolLM2-135M-Instruct (rows in
benchmarks/results/issue15_fisher_h200_seeds.jsonl; the rows marked ``"curves": "full"`` came
from commit 5ace3f5, whose allocation curves ran in the full Fisher metric).

    python benchmarks/issue15_fisher_seeds.py --gguf GGUF --data ../shared/data \
        --ratios 0.4742 0.1853 --seeds 0 1 2 [--device cuda] [--eval-windows 200] \
        [--variants fisher-dense-alloc free-dense-alloc]

0.4742 / 0.1853 land on the sizes of the authors' recreation at 50% / 20%
(benchmarks/quality_smollm2.py); calibration 64 x 512 tokens of calib.txt per seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from slimgpt_core.calibration import consecutive_windows, sample_windows
from slimgpt_core.evaluate import perplexity
from slimgpt_core.loading import load_base_model
from slimgpt_core.pruner import PruneConfig, prune_model

VARIANTS = {
    "fisher-dense-alloc": {"selection": "fisher", "target": "dense",
                           "allocation": "sensitivity"},
    "free-dense-alloc": {"target": "dense", "allocation": "sensitivity"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.4742, 0.1853])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = ap.parse_args()
    base, tok, _ = load_base_model(args.gguf, dtype=torch.float32)
    base.to(args.device)
    text = (args.data / "calib.txt").read_text(encoding="utf-8")
    evals = consecutive_windows((args.data / "eval.txt").read_text(encoding="utf-8"), tok, 512,
                                args.eval_windows)
    print(json.dumps({"variant": "dense", "ppl": round(perplexity(base, evals), 3)}), flush=True)
    for ratio in args.ratios:
        for seed in args.seeds:
            calib = sample_windows(text, tok, 64, 512, seed=seed)
            for name in args.variants:
                settings = VARIANTS[name]
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                result = prune_model(model, calib, PruneConfig(target_ratio=ratio, seed=seed,
                                                               device=args.device, **settings))
                seconds = time.perf_counter() - t0
                print(json.dumps({"variant": name, "ratio": ratio, "seed": seed,
                                  "params": result.params_after,
                                  "ppl": round(perplexity(model, evals), 3),
                                  "s": round(seconds, 2)}), flush=True)


if __name__ == "__main__":
    main()
