"""Variants of one recipe at equal size, on SmolLM2-135M-Instruct: each variant is a JSON
object of ``PruneConfig`` settings merged over ``--base`` (by default Fisher selection + dense
target + sensitivity allocation); one JSON line per run.

    python benchmarks/issue15_variants.py --gguf GGUF --data ../shared/data --ratios 0.4742 \
        --seeds 0 1 2 --variant base= sampled8='{"fisher_samples": 8}' [--device cuda]

0.4742 / 0.1853 land on the sizes of the authors' recreation at 50% / 20%
(benchmarks/quality_smollm2.py); calibration 64 x 512 tokens of calib.txt per seed. A
variant's ``"search_settings"`` object sets fields of
:class:`slimgpt_core.alloc_search.SearchSettings` (experiments on the search itself). Each
row also gives the pruned model's KL divergence from the dense one on the search's fitness
windows (the first ``SearchSettings.fitness_tokens`` of calibration), beside the stitched
proxy's. With ``--eval-trail`` every allocation the search's judging prunes is also
evaluated on the held-out windows (``trail_ppl``, in the order of ``search.pruned_kl``), and
its KL divergence from the dense model measured on the calibration windows the judging did not
use (``trail_kl_rest``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimgpt_core import alloc_search
from slimgpt_core.calibration import consecutive_windows, sample_windows
from slimgpt_core.evaluate import perplexity
from slimgpt_core.loading import load_base_model
from slimgpt_core.pruner import PruneConfig, prune_model

BASE = {"selection": "fisher", "target": "dense", "allocation": "sensitivity"}


@torch.no_grad()
def kl_from(dense: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean per-token KL(dense || model) on ``ids``, two windows at a time."""
    total, tokens = 0.0, 0
    for i in range(0, len(ids), 2):
        x = ids[i:i + 2].to(next(model.parameters()).device)
        p = F.log_softmax(dense(x).logits.float(), -1)
        q = F.log_softmax(model(x).logits.float(), -1)
        total += float((p.exp() * (p - q)).sum())
        tokens += x.numel()
    return total / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.4742])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--base", default=json.dumps(BASE), help="JSON PruneConfig settings")
    ap.add_argument("--variant", nargs="+", required=True, help="NAME=JSON")
    ap.add_argument("--eval-trail", action="store_true",
                    help="held-out perplexity of every candidate the search's judging prunes")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    base_settings = json.loads(args.base)
    variants = {}
    for item in args.variant:
        name, _, settings = item.partition("=")
        variants[name] = {**base_settings, **json.loads(settings or "{}")}
    base, tok, _ = load_base_model(args.gguf, dtype=torch.float32)
    base.to(args.device)
    text = (args.data / "calib.txt").read_text(encoding="utf-8")
    evals = consecutive_windows((args.data / "eval.txt").read_text(encoding="utf-8"), tok, 512,
                                args.eval_windows)
    print(json.dumps({"variant": "dense", "ppl": round(perplexity(base, evals), 3)}), flush=True)
    default_search = alloc_search.SearchSettings
    judge = alloc_search.rescore
    trail_ppl: list[float] = []
    trail_kl_rest: list[float] = []

    def judge_and_evaluate(model, calibration, plan, result, policy, device, settings, prune,
                           on_step=None):
        rest = calibration[settings.rescore_tokens // calibration.shape[1]:]

        def prune_and_evaluate(candidate):
            prune(candidate)
            trail_ppl.append(round(perplexity(model, evals), 3))
            if len(rest):
                trail_kl_rest.append(round(kl_from(base, model, rest), 6))
        return judge(model, calibration, plan, result, policy, device, settings,
                     prune_and_evaluate, on_step)

    if args.eval_trail:
        alloc_search.rescore = judge_and_evaluate
    for ratio in args.ratios:
        for seed in args.seeds:
            calib = sample_windows(text, tok, args.nsamples, 512, seed=seed)
            for name, settings in variants.items():
                config = {k: v for k, v in settings.items() if k != "search_settings"}
                tweaks = settings.get("search_settings", {})
                # the variant's settings win over the pruner's (its seed, say)
                alloc_search.SearchSettings = functools.partial(
                    lambda tweaks, **kw: default_search(**{**kw, **tweaks}), tweaks)
                trail_ppl.clear()
                trail_kl_rest.clear()
                fit = calib[:max(1, default_search(**tweaks).fitness_tokens // 512)]
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                result = prune_model(model, calib, PruneConfig(target_ratio=ratio, seed=seed,
                                                               device=args.device, **config))
                seconds = time.perf_counter() - t0
                print(json.dumps({"variant": name, "ratio": ratio, "seed": seed,
                                  "settings": settings, "params": result.params_after,
                                  "ppl": round(perplexity(model, evals), 3),
                                  "s": round(seconds, 2),
                                  "search": result.allocation_search,
                                  **({"trail_ppl": list(trail_ppl)} if trail_ppl else {}),
                                  **({"trail_kl_rest": list(trail_kl_rest)}
                                     if trail_kl_rest else {}),
                                  "fitness_kl": round(kl_from(base, model, fit), 5)}),
                      flush=True)
                del model, result
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
