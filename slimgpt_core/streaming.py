"""Models larger than host memory: a skeleton in memory, the layers on disk.

:func:`open_streamed` builds the model from its ``config.json`` with every decoder-layer
parameter on the ``meta`` device (no memory), loads only what sits outside the layers
(embeddings, final norm, LM head) from the safetensors shards, and returns the shards as the
:class:`~slimgpt_core.layer_store.LayerSource` that ``prune_model(..., source=...)`` reads one
layer at a time. :func:`lazy_layers` runs an ordinary forward of such a skeleton with each
layer materialised from its shards just for its own forward (the streamed export's
fresh-process check uses it). :func:`should_stream` decides when a model must take this path.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimgpt_core.layer_io import decoder_layers, layers_prefix
from slimgpt_core.layer_store import ShardSource, assign_tensors
from slimgpt_core.shards import ShardedCheckpoint, ShardError

#: What a streamed job needs from a Hub repo (no pickled weights).
SNAPSHOT_PATTERNS: list[str] = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "README.md",
]

#: A model is streamed from disk when its weights take more than this share of the host
#: memory available to the process: the rest is for activations, pinned buffers, the export
#: and everything else on the machine.
HOST_MEMORY_SHARE = 0.6


@dataclass
class StreamedModel:
    model: nn.Module  # decoder layers on meta; embeddings, norm, LM head in host memory
    source: ShardSource
    checkpoint: ShardedCheckpoint
    folder: Path

    def non_layer_state(self) -> dict[str, torch.Tensor]:
        """What the export copies through: every tensor outside the decoder layers that the
        checkpoint stores (a tied LM head is stored once, as the embeddings)."""
        prefix = layers_prefix(self.model) + "."
        return {k: v for k, v in self.model.state_dict().items()
                if not k.startswith(prefix) and k in self.checkpoint}


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on ``meta`` but real buffers (rotary frequencies)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def build_skeleton(config: Any, dtype: torch.dtype | None = None,
                   trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def _checkpoint_dtype(ckpt: ShardedCheckpoint) -> torch.dtype:
    floats = [t.dtype for t in ckpt.tensors.values() if t.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def load_outside_layers(model: nn.Module, ckpt: ShardedCheckpoint, dtype: torch.dtype) -> None:
    """Materialise every parameter outside the decoder layers from ``ckpt`` (host memory)."""
    prefix = layers_prefix(model) + "."
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    tensors = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.startswith(prefix) or not param.is_meta:
            continue
        if name in ckpt:
            t = ckpt.read(name)
            if t.is_floating_point():
                t = t.to(dtype)
            tensors[name] = t
        elif name in tied or (name == "lm_head.weight"
                              and getattr(model.config, "tie_word_embeddings", False)):
            continue  # filled by tie_weights below
        else:
            raise ShardError(f"{ckpt.folder}: the checkpoint lacks {name}")
    assign_tensors(model, tensors, strict=False)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if left:
        raise ShardError(f"{ckpt.folder}: no weights for {left[:5]}")


def _refuse_experts(config: Any, folder: Path) -> None:
    # Layers stream tensor by tensor under the model's own names, but MoE checkpoints store
    # one tensor per expert that transformers fuses into 3-D parameters only when it loads.
    from slimgpt_core.families import family_for_config

    family = family_for_config(config, allow_hetero=True)
    if family.layout.ffn == "experts":
        raise ValueError(f"{folder}: streaming layers from the checkpoint is not supported for "
                         f"mixture-of-experts models ({family.name}); load the model into host "
                         "memory instead")


def open_streamed(folder: str | os.PathLike[str], dtype: str | torch.dtype | None = None,
                  trust_remote_code: bool = False) -> StreamedModel:
    """A skeleton of the model in ``folder`` plus its shards as a layer source.

    ``dtype``: the compute dtype (default: the checkpoint's); layers are converted on the
    device as they arrive.
    """
    from transformers import AutoConfig, GenerationConfig

    from slimgpt_core.loading import _check_model_type, _resolve_dtype

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    _check_model_type(config, str(folder))
    _refuse_experts(config, folder)
    ckpt = ShardedCheckpoint(folder)
    resolved = _resolve_dtype(dtype)
    compute = _checkpoint_dtype(ckpt) if resolved == "auto" else resolved
    assert isinstance(compute, torch.dtype)
    model = build_skeleton(config, compute, trust_remote_code)
    model.config._name_or_path = str(folder)
    load_outside_layers(model, ckpt, compute)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    source = ShardSource(ckpt, layers_prefix(model) + ".")
    return StreamedModel(model, source, ckpt, folder)


@contextlib.contextmanager
def lazy_layers(model: nn.Module, source: Any, device: torch.device,
                dtype: torch.dtype | None = None) -> Iterator[None]:
    """Within the block, each decoder layer of the skeleton ``model`` is loaded from
    ``source`` right before its forward and sent back to ``meta`` right after (strictly:
    a missing or unexpected tensor raises)."""
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        def pre(module: nn.Module, _args: Any, _i: int = i) -> None:
            tensors = source.read_layer(_i, lambda shape, dt: torch.empty(shape, dtype=dt))
            tensors = {k: (v.to(device, dtype) if dtype is not None and v.is_floating_point()
                           else v.to(device)) for k, v in tensors.items()}
            assign_tensors(module, tensors, strict=True)

        def post(module: nn.Module, _args: Any, _out: Any) -> None:
            module.to("meta")

        handles.append(layer.register_forward_pre_hook(pre))
        handles.append(layer.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _final_norm(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    if norm is None:
        raise TypeError(f"{type(model).__name__} has no final norm at model.norm")
    return norm


@torch.no_grad()
def logits_from_hidden(model: nn.Module, hidden: torch.Tensor,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """``lm_head(norm(hidden))`` in fp32 on the CPU: what the full model's forward returns
    for windows whose last decoder layer produced ``hidden``."""
    device = torch.device(device) if device is not None else hidden.device
    norm, head = _final_norm(model), model.get_output_embeddings()
    homes = [next(norm.parameters()).device, next(head.parameters()).device]
    norm.to(device)
    head.to(device)
    try:
        return head(norm(hidden.to(device))).float().cpu()
    finally:
        norm.to(homes[0])
        head.to(homes[1])


@torch.no_grad()
def perplexity_from_hidden(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                           device: torch.device | str | None = None,
                           batch_size: int = 4) -> float:
    """Perplexity of windows ``input_ids`` whose final hidden states are ``hidden`` (same
    definition as :func:`slimgpt_core.evaluate.perplexity`)."""
    total, count = 0.0, 0
    for start in range(0, hidden.shape[0], batch_size):
        logits = logits_from_hidden(model, hidden[start:start + batch_size], device)
        ids = input_ids[start:start + batch_size]
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                       ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def available_host_memory() -> int:
    """Bytes of host memory this process can still use (MemAvailable, or a cgroup limit)."""
    avail = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            avail = min(avail, int(raw)) if avail else int(raw)
    return avail


def checkpoint_bytes(folder: str | os.PathLike[str], dtype: torch.dtype | None = None) -> int:
    """Bytes the model's weights take in memory (in ``dtype`` when given)."""
    ckpt = ShardedCheckpoint(folder)
    if dtype is None:
        return ckpt.nbytes
    size = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(t.shape) * (size if t.dtype.is_floating_point else
                                     torch.empty((), dtype=t.dtype).element_size())
               for t in ckpt.tensors.values())


def should_stream(folder: str | os.PathLike[str], dtype: torch.dtype | None = None,
                  host_bytes: int | None = None) -> bool:
    """Whether ``folder``'s model must be streamed: its weights exceed
    :data:`HOST_MEMORY_SHARE` of the available host memory (``host_bytes`` overrides)."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        return False  # GGUF or pickles: only the in-memory path can read them
    available = host_bytes if host_bytes is not None else available_host_memory()
    if available <= 0:
        return False
    return checkpoint_bytes(folder, dtype) > HOST_MEMORY_SHARE * available
