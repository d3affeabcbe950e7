"""Pruning speed and peak accelerator memory on a LLaMA-shaped model with random weights.

Random bf16 weights cost the same compute as real ones. The model lives in CPU memory; the
pruner moves one layer at a time to the device, as it would for a model larger than the GPU.

    python benchmarks/prune_speed.py --shape 7b            # hidden 4096, FFN 11008, 32 layers
    python benchmarks/prune_speed.py --shape 13b           # hidden 5120, FFN 13824, 40 layers
    python benchmarks/prune_speed.py --shape tiny --device cpu --nsamples 4 --seqlen 128

Prints one JSON line with per-phase seconds, total seconds and peak device memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimgpt_core.pruner import PruneConfig, prune_model

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=8),
}


def random_model(shape: str, dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    # Random numbers are drawn on the GPU when there is one (minutes faster for 7B), then the
    # model is parked in CPU memory: the pruner brings one layer at a time to the device.
    init_device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=init_device).to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model = model.to("cpu")
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # buffers were left empty
    if init_device == "cuda":
        torch.cuda.empty_cache()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="7b")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--min-group", type=int, default=64)
    ap.add_argument("--offload-activations", action="store_true")
    ap.add_argument("--resident", action="store_true",
                    help="keep the whole model on the device (no per-layer transfers)")
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    model = random_model(args.shape, dtype)
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, 32000, (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(1))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    config = PruneConfig(target_ratio=args.ratio, batch_size=args.batch_size, device=args.device,
                         min_group=args.min_group, offload_activations=args.offload_activations,
                         resident=args.resident)
    t0 = time.perf_counter()
    result = prune_model(model, ids, config)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    print(json.dumps({
        "shape": args.shape, "ratio": args.ratio, "windows": args.nsamples,
        "seqlen": args.seqlen, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__, "build_model_s": round(build_s, 1),
        "prune_s": round(total, 2),
        "per_layer_s": round(total / model.config.num_hidden_layers, 3),
        "phases_s": {k: round(v, 2) for k, v in result.seconds.items()},
        "peak_gpu_GiB": None if peak is None else round(peak, 2),
        "params_before": result.params_before, "params_after": result.params_after,
        "decoder_ratio": round(result.plan.achieved_ratio, 4),
        "resident": args.resident,
        "per_layer_phases_s": {
            phase: [round(r.seconds.get(phase, 0.0), 3) for r in result.layers]
            for phase in ("attn_pass", "ffn_pass", "heads", "ffn", "output_pass")
        },
    }))


if __name__ == "__main__":
    main()
