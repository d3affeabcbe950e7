"""A ``hetero`` export as a GGUF file for llama.cpp / Ollama (llama architecture, per-layer arrays).

llama.cpp reads ``llama.attention.head_count``, ``llama.attention.head_count_kv`` and
``llama.feed_forward_length`` either as one number or as one number per layer, so a pruned model
with its own widths per layer is a plain ``llama`` GGUF. What llama.cpp cannot express is the
``free`` GQA policy's per-layer KV index; such layers are written in the exact padded layout of
:mod:`slimgpt_core.served_layout` (zero query heads / KV copies), as for vLLM. The head size is
written explicitly (``attention.key_length``/``value_length``) because pruning breaks
``hidden_size / heads``.

Tensors follow llama.cpp's llama naming; ``attn_q``/``attn_k`` rows are reordered from the
Hugging Face rotary layout (two halves per head) to llama.cpp's (interleaved pairs), as its own
converter does. The tokenizer is taken from a GGUF of the base model (``tokenizer_from``; e.g. the
SmolLM2 file this project starts from): converting a Hugging Face tokenizer needs llama.cpp's
``convert_hf_to_gguf.py`` (pre-tokenizer detection), which is not part of this package.

Only Llama-layout checkpoints without biases (Llama, Mistral without sliding window). Weights in
float32 or float16. Verified with the ``gguf`` reader and a reference forward pass over the GGUF
tensors (tests/serving/test_gguf_export.py); not run in llama.cpp here (no build available).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from slimgpt_core.served_layout import layer_widths_from_config, plan_layer
from slimgpt_core.served_weights import rewrite_tensor

__all__ = ["GGUFExportError", "export_gguf", "to_llamacpp_rope_order"]


class GGUFExportError(ValueError):
    """The folder cannot be written as a llama GGUF."""


def to_llamacpp_rope_order(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from the Hugging Face rotary layout (per head: first half,
    second half) to llama.cpp's (per head: pairs (i, i + d/2) side by side)."""
    rows = weight.shape[0]
    d = rows // num_heads
    return (weight.reshape(num_heads, 2, d // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise GGUFExportError(f"{folder} has no safetensors weights")
    return state


def _copy_tokenizer(writer: Any, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    copied = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
        copied += 1
    if not copied:
        raise GGUFExportError(f"{source} carries no tokenizer.* metadata")


def export_gguf(folder: str | Path, out_file: str | Path, *, tokenizer_from: str | Path,
                dtype: str = "f16") -> Path:
    """Write the export in ``folder`` as the llama GGUF ``out_file``."""
    import gguf

    folder, out_file = Path(folder), Path(out_file)
    cfg = json.loads((folder / "config.json").read_text())
    base = str(cfg.get("model_type", "")).removeprefix("slimgpt_")
    if base not in ("llama", "mistral"):
        raise GGUFExportError(f"GGUF export supports Llama-layout models, not {base!r}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise GGUFExportError("GGUF export of checkpoints with biases is not supported")
    if cfg.get("sliding_window"):
        raise GGUFExportError("GGUF export of sliding-window attention is not supported")
    if dtype not in ("f16", "f32"):
        raise GGUFExportError(f"dtype must be 'f16' or 'f32', not {dtype!r}")
    n = int(cfg["num_hidden_layers"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // int(cfg["num_attention_heads"]))
    layouts = [plan_layer(w) for w in layer_widths_from_config(SimpleNamespace(**cfg))]
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"rope type {rope.get('rope_type')!r} is not supported")
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    state = _load_state(folder)
    np_dtype = np.float16 if dtype == "f16" else np.float32

    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(folder.name)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n)
    writer.add_feed_forward_length([lay.intermediate_size for lay in layouts])
    writer.add_head_count([lay.num_heads for lay in layouts])
    writer.add_head_count_kv([lay.num_kv_heads for lay in layouts])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16"
                         else gguf.LlamaFileType.ALL_F32)
    _copy_tokenizer(writer, Path(tokenizer_from))

    def add(name: str, t: torch.Tensor, *, vector: bool = False) -> None:
        # llama.cpp keeps norms (1-D tensors) in float32 whatever the file type
        arr = t.detach().to(torch.float32).numpy()
        writer.add_tensor(name, arr if vector else arr.astype(np_dtype))

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"], vector=True)
    if "lm_head.weight" in state and not cfg.get("tie_word_embeddings", False):
        add("output.weight", state["lm_head.weight"])
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i, lay in enumerate(layouts):
        p = f"model.layers.{i}"
        add(f"blk.{i}.attn_norm.weight", state[f"{p}.input_layernorm.weight"], vector=True)
        add(f"blk.{i}.ffn_norm.weight", state[f"{p}.post_attention_layernorm.weight"],
            vector=True)
        for hf, cpp in names.items():
            group = "self_attn" if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"{p}.{group}.{hf}.weight"
            t = rewrite_tensor(key, state[key], layouts, head_dim)
            if hf == "q_proj":
                t = to_llamacpp_rope_order(t, lay.num_heads)
            elif hf == "k_proj":
                t = to_llamacpp_rope_order(t, lay.num_kv_heads)
            add(f"blk.{i}.{cpp}.weight", t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file
