"""Mixture of experts on the tiny random test models (no real small MoE ships in a registry).

    PYTHONPATH=. python benchmarks/families_moe.py [--windows 8] [--eval-windows 8]

For Mixtral and Qwen3-MoE as built by ``tests/core/family_cases.py`` (3 layers, 4 experts of
512 channels, 2 per token): the parameter targets of the family tests (20% uniform, 50% log),
the calibration tokens routed to each expert of layer 0 and its pooled Hessian's share, and the
few-token policy compared with its two extremes at 50%: ``routed only`` (expert_min_tokens 0:
the singular routed Hessians, damped), ``blend`` (the default: threshold = expert width) and
``pooled`` (every expert on its all-token Hessian). The figure of merit is the relative error
of the final hidden states against the dense model on held-out windows. Random weights: this
says whether the policy behaves, not how a real MoE fares. Prints JSON lines and a table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from slimgpt_core.pruner import PruneConfig, count_parameters, prune_model
from tests.core.family_cases import MOE_FAMILIES, tiny_model, windows

SETTINGS = {
    "uniform 20%": {"target_ratio": 0.2, "schedule": "uniform", "gqa_policy": "balanced",
                    "plain_heads": True},
    "log 50%": {"target_ratio": 0.5, "schedule": "log", "gqa_policy": "free",
                "head_ratio": 0.375},
}
POLICIES = {"routed only": 0, "blend (default)": None, "pooled": 1 << 30}


def _hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8, help="calibration windows of 32 tokens")
    ap.add_argument("--eval-windows", type=int, default=8)
    args = ap.parse_args()
    calib = windows(args.windows, 32, seed=1)
    held_out = windows(args.eval_windows, 32, seed=99)
    rows = []
    for family in MOE_FAMILIES:
        dense_out = _hidden(tiny_model(family), held_out)
        for name, settings in SETTINGS.items():
            for policy, min_tokens in POLICIES.items():
                if name.startswith("uniform") and min_tokens is not None:
                    continue  # the policy comparison runs at 50% only
                t0 = time.perf_counter()
                result = prune_model(tiny_model(family), calib, PruneConfig(
                    batch_size=4, min_group=8, expert_min_tokens=min_tokens, **settings))
                seconds = time.perf_counter() - t0
                out = _hidden(result.model, held_out)
                err = float(((out - dense_out).norm() / dense_out.norm()) ** 2)
                layer0 = result.layers[0]
                row = {"family": family, "setting": name, "policy": policy,
                       "achieved_ratio": round(result.plan.achieved_ratio, 4),
                       "params": [result.params_before, result.params_after,
                                  count_parameters(result.model)],
                       "layer0_expert_tokens": layer0.expert_tokens,
                       "layer0_pooled_share": [round(s, 3) for s in
                                               layer0.expert_pooled_share or []],
                       "heldout_rel_error": round(err, 5), "prune_s": round(seconds, 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| family | setting | few-token policy | decoder removed | params after | "
          "layer-0 tokens per expert | held-out rel. error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['setting']} | {r['policy']} | {r['achieved_ratio']:.2%} | "
              f"{r['params'][1]:,} of {r['params'][0]:,} | {r['layer0_expert_tokens']} | "
              f"{r['heldout_rel_error']:.4f} |")


if __name__ == "__main__":
    main()
