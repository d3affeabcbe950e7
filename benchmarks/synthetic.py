"""LLaMA-shaped models with random weights for the scale benchmarks (same compute as real ones).

* :func:`random_model`: a whole model in host memory (drawn on the GPU when there is one).
* :func:`write_checkpoint`: a sharded safetensors folder written one layer at a time, so even
  a 13B checkpoint is made without holding the model in host memory.
* :class:`GeneratedSource`: layer weights made when the pruner reaches the layer (a 70B
  checkpoint does not fit a 64 GB disk): slices of one pool of normal(0, 0.02) numbers at
  offsets that depend on the layer and the tensor, copied into the pruner's pinned buffers
  by its reader thread, as a disk read would be.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES: dict[str, dict[str, Any]] = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
               "rope_theta": 500000.0},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                "rope_theta": 500000.0},
    "cpu-medium": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 8,
                   "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 32000},
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                 "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000},
    "tiny-gqa": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6,
                     "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000},
}


def config_for(shape: str) -> LlamaConfig:
    cfg = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    return cfg


def _fill_(t: torch.Tensor, name: str) -> None:
    if "norm" in name:
        t.fill_(1.0)
    else:
        t.normal_(0.0, 0.02)


def random_model(shape: str, dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = config_for(shape)
    init_device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=init_device).to(dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _fill_(p, name)
    model = model.to("cpu")
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # buffers were left empty
    if init_device == "cuda":
        torch.cuda.empty_cache()
    return model.eval()


@torch.no_grad()
def write_checkpoint(shape: str, folder: Path, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A Hugging Face folder of ``shape`` with one shard per decoder layer (plus one for the
    rest), written layer by layer. Returns sizes and seconds."""
    from safetensors.torch import save_file

    from slimgpt_core.shards import shard_name, write_index

    t0 = time.perf_counter()
    cfg = config_for(shape)
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen_device = torch.device(device)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    n = cfg.num_hidden_layers
    total = n + 1
    files = []
    torch.manual_seed(0)
    outside = {
        "model.embed_tokens.weight": torch.empty(cfg.vocab_size, cfg.hidden_size),
        "model.norm.weight": torch.empty(cfg.hidden_size),
        "lm_head.weight": torch.empty(cfg.vocab_size, cfg.hidden_size),
    }
    state = {}
    for name, t in outside.items():
        g = torch.empty(t.shape, device=gen_device, dtype=dtype)
        _fill_(g, name)
        state[name] = g.cpu()
    path = folder / shard_name(1, total)
    save_file(state, str(path), metadata={"format": "pt"})
    files.append(path)
    with torch.device("meta"):
        template = LlamaDecoderLayer(cfg, 0)
    for i in range(n):
        state = {}
        for name, p in template.state_dict().items():
            g = torch.empty(p.shape, device=gen_device, dtype=dtype)
            _fill_(g, name)
            state[f"model.layers.{i}.{name}"] = g.cpu()
        path = folder / shard_name(i + 2, total)
        save_file(state, str(path), metadata={"format": "pt"})
        files.append(path)
    write_index(folder, files)
    cfg.dtype = str(dtype).removeprefix("torch.")
    cfg.save_pretrained(folder)
    nbytes = sum(p.stat().st_size for p in files)
    return {"bytes": nbytes, "seconds": round(time.perf_counter() - t0, 1)}


class GeneratedSource:
    """Random dense layers of ``config``'s shape, made when each layer is read."""

    POOL = 1 << 26  # 64M bf16 numbers, 128 MB

    def __init__(self, config: LlamaConfig, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0) -> None:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with torch.device("meta"):
            template = LlamaDecoderLayer(config, 0)
        self.shapes = {k: tuple(v.shape) for k, v in template.state_dict().items()}
        g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(self.POOL, generator=g) * 0.02).to(dtype)
        self.dtype = dtype
        self.seconds = 0.0

    def read_layer(self, index: int, alloc: Any) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        out = {}
        for k, (name, shape) in enumerate(self.shapes.items()):
            buf = alloc(shape, self.dtype)
            flat = buf.view(-1)
            if "norm" in name:
                flat.fill_(1.0)
            else:
                pos, step = 0, self.POOL // 2
                offset = (index * 7919 + k * 104729) % step
                while pos < flat.numel():
                    m = min(step, flat.numel() - pos)
                    flat[pos:pos + m].copy_(self.pool[offset:offset + m])
                    pos += m
                    offset = (offset + 15485863) % step
            out[name] = buf
        self.seconds += time.perf_counter() - t0
        return out


def open_generated(shape: str, dtype: str | torch.dtype | None = None) -> Any:
    """A skeleton of ``shape`` with its embeddings, and a :class:`GeneratedSource` for its
    layers: what :func:`slimgpt_core.streaming.open_streamed` returns for a checkpoint, for
    a model that no disk holds. Every rank of a multi-GPU job opens the same one (it is the
    ``opener`` that ``prune_streamed`` hands its helper ranks)."""
    import os
    from types import SimpleNamespace

    from slimgpt_core.streaming import build_skeleton

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.bfloat16
    cfg = config_for(shape)
    model = build_skeleton(cfg, dtype)
    # Everything outside the decoder layers (embeddings, final norm, LM head) is held in host
    # memory, as open_streamed loads it from a checkpoint. Drawing 1B numbers on the CPU takes
    # a while; the same seed gives every rank the same ones.
    gen = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() \
        else "cpu"
    g = torch.Generator(device=gen).manual_seed(0)
    from slimgpt_core.layer_store import assign_tensors

    tensors = {}
    for name, p in model.named_parameters():
        if name.startswith("model.layers.") or not p.is_meta:
            continue
        t = torch.empty(p.shape, dtype=dtype, device=gen)
        t = t.fill_(1.0) if "norm" in name else t.normal_(0, 0.02, generator=g)
        tensors[name] = t.cpu()
    assign_tensors(model, tensors, strict=False)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return SimpleNamespace(model=model, source=GeneratedSource(cfg, dtype), folder=shape)


def host_peak_bytes() -> int:
    """High-water mark of this process's resident memory (VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def dump(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as fh:
            fh.write(line + "\n")
