"""Profile SlimGPT on one LLaMA-7B-shaped decoder layer (random bf16 weights) on a GPU.

    python benchmarks/profile_layer.py [--nsamples 128 --seqlen 2048]

Prints the per-phase seconds of one pruned layer and the top CUDA kernels by device time.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from slimgpt_core.collective import Collective
from slimgpt_core.families import family_for_model_type
from slimgpt_core.layer_io import LayerContext
from slimgpt_core.pruner import PruneConfig, _Clock, _prune_layer
from slimgpt_core.schedule import ModelShape, plan_layer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--ratio", type=float, default=0.25)
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = LlamaConfig()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(dev, torch.bfloat16).eval()
    for p in layer.parameters():
        if p.dim() == 2:
            p.data.normal_(0, 0.02)
    rope = LlamaRotaryEmbedding(cfg).to(dev)
    acts = torch.randn(args.nsamples, args.seqlen, cfg.hidden_size, device=dev,
                       dtype=torch.bfloat16)
    pos = torch.arange(args.seqlen, device=dev)[None]
    ctx = LayerContext(rope(acts[:1], pos), None)
    shape = ModelShape.from_config(cfg.to_dict())
    lp = plan_layer(shape, 0, args.ratio, "balanced")
    config = PruneConfig(target_ratio=args.ratio, device="cuda")
    residual = torch.empty_like(acts)

    def run(layer_to_prune: torch.nn.Module) -> dict[str, float]:
        clock = _Clock()
        _prune_layer(layer_to_prune, lp, shape, acts.clone(), residual, ctx, config, dev, clock,
                     lambda *a: None, Collective(), family=family_for_model_type("llama"))
        torch.cuda.synchronize()
        return clock.totals

    import copy

    run(copy.deepcopy(layer))  # warm-up (kernels, allocator)
    t0 = time.perf_counter()
    totals = run(copy.deepcopy(layer))
    print({k: round(v, 4) for k, v in totals.items()}, "wall", round(time.perf_counter() - t0, 3))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(copy.deepcopy(layer))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
