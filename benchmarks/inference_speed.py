"""Inference speed of dense vs SlimGPT-pruned models in transformers: prefill, decode, memory.

The pruned shapes are those the pruner would produce (``slimgpt_core.schedule.make_plan``: log
schedule, ``balanced`` GQA policy, FFN widths rounded to multiples of 8), built as the ``hetero``
model class that exports load with; the weights are random (same compute as real ones).

    python benchmarks/inference_speed.py --shapes llama-7b llama3-8b --ratios 0 0.2 0.5
    python benchmarks/inference_speed.py --shapes smollm2 --device cpu --dtype float32 \\
        --prefill 512 --context 128 --batches 1 8 --steps 16

Per model: parameters, prefill tokens/s (batch 1, ``--prefill`` tokens, sdpa), decode tokens/s
at each batch size after a ``--context``-token prompt (eager with the dynamic KV cache, and on
CUDA also one decode step captured as a CUDA graph over a static KV cache: what removes the
per-kernel launch cost that dominates small-batch decoding), peak memory, and the ideal speed-ups
of the arithmetic: the FLOPs ratio for prefill (linear layers plus causal attention) and the
bytes-read ratio for decode (weights plus the KV cache). One JSON line per model, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from typing import Any

import torch

from slimgpt_core.modeling_slimgpt import SlimGPTLlamaConfig, SlimGPTLlamaForCausalLM
from slimgpt_core.schedule import ModelShape, make_plan

SHAPES: dict[str, dict[str, Any]] = {
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                     "max_position_embeddings": 4096},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                      "max_position_embeddings": 8192, "rope_parameters": {
                          "rope_type": "default", "rope_theta": 500000.0}},
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                    "max_position_embeddings": 8192, "tie_word_embeddings": True,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}},
    "tiny": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
                 "max_position_embeddings": 1024},
}


def model_config(shape: str, ratio: float) -> SlimGPTLlamaConfig:
    """The config of ``shape`` pruned by ``ratio`` (dense when 0) as the pruner plans it."""
    base = dict(SHAPES[shape])
    base["head_dim"] = base["hidden_size"] // base["num_attention_heads"]
    if ratio == 0:
        return SlimGPTLlamaConfig(**base)
    plan = make_plan(ModelShape.from_config({**base, "model_type": "llama"}), ratio, "log",
                     "balanced")
    return SlimGPTLlamaConfig(
        **base,
        layer_num_heads=[lay.heads_kept for lay in plan.layers],
        layer_num_kv_heads=[lay.kv_heads_kept for lay in plan.layers],
        layer_intermediate_sizes=[lay.channels_kept for lay in plan.layers])


def build(config: SlimGPTLlamaConfig, dtype: torch.dtype, device: str) -> SlimGPTLlamaForCausalLM:
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs (minutes faster on a GPU)
        model = SlimGPTLlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def widths(config: SlimGPTLlamaConfig) -> list[tuple[int, int, int]]:
    n = config.num_hidden_layers
    return list(zip(config.layer_num_heads or [config.num_attention_heads] * n,
                    config.layer_num_kv_heads or [config.num_key_value_heads] * n,
                    config.layer_intermediate_sizes or [config.intermediate_size] * n,
                    strict=True))


def arithmetic(config: SlimGPTLlamaConfig, prefill: int, context: int, batch: int,
               bytes_per: int) -> dict[str, float]:
    """Prefill FLOPs and decode bytes read, from the widths."""
    h, d, v = config.hidden_size, config.head_dim, config.vocab_size
    linear = sum(h * d * (2 * q + 2 * k) + 3 * h * f for q, k, f in widths(config)) + v * h
    attn_prefill = sum(2 * prefill * prefill * q * d for q, _, _ in widths(config))  # causal
    kv_per_token = sum(2 * k * d for _, k, _ in widths(config)) * bytes_per
    params = linear + (0 if config.tie_word_embeddings else v * h)
    return {
        # generation computes the LM head for the last position only (logits_to_keep=1)
        "prefill_flops": 2 * prefill * (linear - v * h) + 2 * v * h + attn_prefill,
        "decode_bytes": params * bytes_per + batch * context * kv_per_token,
        "linear_params": linear,
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Any, device: str, reps: int) -> float:
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def bench_prefill(model: Any, tokens: int, device: str, reps: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    model(ids, use_cache=True, logits_to_keep=1)  # warm-up (kernel selection, allocator)
    return tokens / timed(lambda: model(ids, use_cache=True, logits_to_keep=1), device, reps)


@torch.no_grad()
def bench_decode_eager(model: Any, batch: int, context: int, steps: int, device: str) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(2):  # warm-up steps
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


@torch.no_grad()
def bench_decode_graph(model: Any, batch: int, context: int, steps: int) -> dict[str, float]:
    """One decode step over a static KV cache captured as a CUDA graph and replayed."""
    from transformers import StaticCache

    device = "cuda"
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    # reference: the first decode step through the dynamic cache, as bench_decode_eager runs it
    out = model(ids, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1:].argmax(-1)
    reference = model(tok, past_key_values=out.past_key_values, use_cache=True).logits.float()
    del out
    cache = StaticCache(config=model.config, max_cache_len=context + steps + 8)
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
          cache_position=torch.arange(context, device=device))
    pos = torch.tensor([context], device=device)

    def step() -> torch.Tensor:
        return model(tok, past_key_values=cache, use_cache=True, cache_position=pos).logits
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # rewrites the same cache slot: position ``pos`` is not advanced
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()
    # Warm-up and capture wrote position ``pos`` three times, which the static cache does not
    # treat as idempotent: refill the (same) cache tensors before checking the replay.
    cache.reset()
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
          cache_position=torch.arange(context, device=device))
    graph.replay()  # same position and token as the reference step: must give its logits
    sync(device)
    diff = float((logits.float() - reference).abs().max())
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        pos.add_(1)
        graph.replay()
        tok.copy_(logits[:, -1:].argmax(-1))
    sync(device)
    return {"tokens_per_s": batch * steps / (time.perf_counter() - t0),
            "check_max_abs_diff": diff}


def run_one(shape: str, ratio: float, args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    device = args.device
    config = model_config(shape, ratio)
    t0 = time.perf_counter()
    model = build(config, dtype, device)
    row: dict[str, Any] = {
        "shape": shape, "ratio": ratio, "dtype": args.dtype, "device": device,
        "params": sum(p.numel() for p in model.parameters()),
        "build_s": round(time.perf_counter() - t0, 1),
        "widths_first_last": [widths(config)[0], widths(config)[-1]],
    }
    bytes_per = torch.finfo(dtype).bits // 8
    row["arith"] = {f"b{b}": arithmetic(config, args.prefill, args.context, b, bytes_per)
                    for b in args.batches}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    row["prefill_tok_s"] = round(bench_prefill(model, args.prefill, device, args.reps), 1)
    if device.startswith("cuda"):
        row["prefill_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    for b in args.batches:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        row[f"decode_b{b}_eager_tok_s"] = round(
            bench_decode_eager(model, b, args.context, args.steps, device), 1)
        if device.startswith("cuda"):
            row[f"decode_b{b}_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if args.cuda_graphs:
                try:
                    g = bench_decode_graph(model, b, args.context, args.steps)
                    row[f"decode_b{b}_graph_tok_s"] = round(g["tokens_per_s"], 1)
                    row[f"decode_b{b}_graph_check"] = g["check_max_abs_diff"]
                except Exception as exc:  # noqa: BLE001  recorded, not fatal: eager figures stand
                    row[f"decode_b{b}_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict[str, Any]], batches: list[int]) -> str:
    """Speed-ups relative to the dense row of the same shape, next to the ideal ones."""
    dense = {r["shape"]: r for r in rows if r["ratio"] == 0}
    lines = []
    for r in rows:
        d = dense.get(r["shape"])
        if d is None:
            continue

        def su(key: str, r: dict[str, Any] = r, d: dict[str, Any] = d) -> str:
            if key not in r or key not in d:
                return "-"
            return f"{r[key] / d[key]:.2f}x"

        b0 = f"b{batches[0]}"
        ideal_prefill = d["arith"][b0]["prefill_flops"] / r["arith"][b0]["prefill_flops"]
        parts = [f"{r['shape']} {r['ratio']:.0%}", (f"params {r['params'] / 1e9:.2f}B "
                 f"({d['params'] / r['params']:.2f}x fewer)"),
                 (f"prefill {r['prefill_tok_s']:.0f} tok/s ({su('prefill_tok_s')}, "
                 f"FLOPs ideal {ideal_prefill:.2f}x)")]
        for b in batches:
            ideal = d["arith"][f"b{b}"]["decode_bytes"] / r["arith"][f"b{b}"]["decode_bytes"]
            for mode in ("eager", "graph"):
                key = f"decode_b{b}_{mode}_tok_s"
                if key in r:
                    parts.append(f"decode b{b} {mode} {r[key]:.0f} tok/s ({su(key)})")
            parts.append(f"bytes ideal b{b} {ideal:.2f}x")
        lines.append(" | ".join(parts))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", choices=SHAPES, default=["llama-7b", "llama3-8b"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.2, 0.5])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill", type=int, default=2048, help="prefill tokens (batch 1)")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens before decoding")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values renamed in 5.x
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        for ratio in args.ratios:
            row = run_one(shape, ratio, args)
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(line + "\n")
    print(table(rows, args.batches))
    if args.device.startswith("cuda"):
        print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
