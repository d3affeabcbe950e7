"""Llama-layout decoders whose layers have their own widths (SlimGPT's `hetero` artifacts).

This file is self-contained on purpose: it is copied next to the weights of every `hetero`
export and loaded with ``trust_remote_code=True``, so it may import torch and transformers only.
The pruner uses the same classes for the in-memory model, so what is verified is what ships.

Per layer ``i`` the config carries ``layer_num_heads[i]``, ``layer_num_kv_heads[i]``,
``layer_intermediate_sizes[i]`` and optionally ``layer_kv_index[i]``: for each kept query head,
the position of the key/value head it reads. Without a kv index a layer is an ordinary grouped
layer (query head ``j`` reads KV head ``j // (heads / kv_heads)``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

_PER_LAYER_KEYS = ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_sizes",
                   "layer_kv_index")


def _linear_like(old: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def _cache_update(cache: Any, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
                  cos: torch.Tensor, sin: torch.Tensor, kwargs: dict[str, Any]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    # transformers renamed the cache argument and changed how extras reach it during 5.x;
    # ask the signature rather than the version so both spellings work.
    params = inspect.signature(cache.update).parameters
    if "cache_kwargs" in params:
        extras = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
        return cache.update(key, value, layer_idx, extras)
    return cache.update(key, value, layer_idx, kwargs=kwargs)


class KVIndexedAttention(nn.Module):
    """Forward for an attention layer whose query heads read key/value heads by index.

    Installed as a subclass of the architecture's own attention class (see
    :func:`install_kv_index`), so projections, rotary handling and attention kernels stay those
    of transformers; only the grouping of query heads onto KV heads is explicit.
    """

    #: Per kept query head, the position of the KV head it reads (a plain tuple, not a buffer:
    #: from_pretrained builds models on the meta device and would leave a non-persistent
    #: buffer uninitialised; a tuple survives meta init, ``device_map`` and ``.to()`` alike).
    kv_index_list: tuple[int, ...]

    @property
    def kv_index(self) -> torch.Tensor:
        """The kv index as a CPU tensor (for inspection)."""
        return torch.tensor(self.kv_index_list, dtype=torch.long)

    def _kv_index_on(self, device: torch.device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_kv_index_cache", {})
        index = cache.get(device)
        if index is None:
            index = torch.tensor(self.kv_index_list, dtype=torch.long, device=device)
            cache[device] = index
        return index

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = kwargs.pop("cache", None)
        legacy_cache = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy_cache
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        assert position_embeddings is not None, "rotary position embeddings are required"
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = _cache_update(cache, key, value, self.layer_idx, cos, sin, kwargs)
        # The cache keeps the compact KV heads; expand to one KV head per query head here.
        index = self._kv_index_on(key.device)
        key = key.index_select(1, index)
        value = value.index_select(1, index)
        impl = self.config._attn_implementation
        if impl == "sdpa":
            attention = sdpa_attention_forward
        elif impl in (None, "eager"):
            attention = eager_attention_forward
        else:
            attention = ALL_ATTENTION_FUNCTIONS[impl]
        extra = {}
        if getattr(self, "sliding_window", None) is not None:
            extra["sliding_window"] = self.sliding_window
        kwargs.pop("position_ids", None)
        attn_output, attn_weights = attention(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **extra, **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


_KV_INDEXED_CLASSES: dict[type, type] = {}


def install_kv_index(attn: nn.Module, kv_index: list[int]) -> None:
    """Make ``attn`` route query head ``j`` to KV head ``kv_index[j]``."""
    base = type(attn)
    if not isinstance(attn, KVIndexedAttention):
        if base not in _KV_INDEXED_CLASSES:
            _KV_INDEXED_CLASSES[base] = type(f"KVIndexed{base.__name__}", (KVIndexedAttention, base), {})
        attn.__class__ = _KV_INDEXED_CLASSES[base]
    attn.kv_index_list = tuple(int(k) for k in kv_index)
    attn.__dict__["_kv_index_cache"] = {}
    # After the gather every query head has its own KV head, so the kernels must not repeat.
    attn.num_key_value_groups = 1


def regular_groups(kv_index: list[int], num_kv_heads: int) -> int | None:
    """Query heads per KV head if ``kv_index`` is the standard grouped layout, else None."""
    if num_kv_heads == 0 or len(kv_index) % num_kv_heads:
        return None
    per = len(kv_index) // num_kv_heads
    return per if kv_index == [j // per for j in range(len(kv_index))] else None


def resize_layer(layer: nn.Module, num_heads: int, num_kv_heads: int, intermediate_size: int,
                 kv_index: list[int] | None = None) -> None:
    """Give a freshly built decoder layer the widths of a pruned one (weights loaded later)."""
    attn, mlp = layer.self_attn, layer.mlp
    d = attn.head_dim
    hidden = attn.q_proj.in_features
    attn.q_proj = _linear_like(attn.q_proj, num_heads * d, hidden)
    attn.k_proj = _linear_like(attn.k_proj, num_kv_heads * d, hidden)
    attn.v_proj = _linear_like(attn.v_proj, num_kv_heads * d, hidden)
    attn.o_proj = _linear_like(attn.o_proj, hidden, num_heads * d)
    mlp.gate_proj = _linear_like(mlp.gate_proj, intermediate_size, hidden)
    mlp.up_proj = _linear_like(mlp.up_proj, intermediate_size, hidden)
    mlp.down_proj = _linear_like(mlp.down_proj, hidden, intermediate_size)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = intermediate_size
    set_attention_layout(attn, num_heads, num_kv_heads, kv_index)


def set_attention_layout(attn: nn.Module, num_heads: int, num_kv_heads: int,
                         kv_index: list[int] | None) -> None:
    """Record how query heads map onto KV heads after pruning."""
    if kv_index is None:
        kv_index = [j // (num_heads // num_kv_heads) for j in range(num_heads)]
    groups = regular_groups(kv_index, num_kv_heads)
    if groups is None or isinstance(attn, KVIndexedAttention):
        # (a module that already routes by index keeps doing so, with the new index)
        install_kv_index(attn, kv_index)
    else:
        attn.num_key_value_groups = groups
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attn, name):
            setattr(attn, name, num_heads)
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = num_kv_heads


class SlimGPTConfigMixin:
    """Per-layer widths on top of the base architecture's config."""

    def _init_layer_widths(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in _PER_LAYER_KEYS:
            setattr(self, key, kwargs.pop(key, None))
        return kwargs


class SlimGPTModelMixin:
    """Builds the base architecture, then narrows each layer to its pruned widths.

    The narrowing runs at the start of ``post_init`` (which the base ``__init__`` calls last),
    so weight initialisation, weight tying and ``from_pretrained``'s bookkeeping (meta-device
    init, ``device_map`` planning, missing-key checks) all see the pruned shapes.
    """

    def post_init(self) -> None:
        self._apply_layer_widths()
        super().post_init()  # type: ignore[misc]

    def _apply_layer_widths(self) -> None:
        cfg = self.config
        if cfg.layer_num_heads is None:
            return
        kv_indices = cfg.layer_kv_index or [None] * cfg.num_hidden_layers
        for i, layer in enumerate(self.model.layers):
            resize_layer(layer, cfg.layer_num_heads[i], cfg.layer_num_kv_heads[i],
                         cfg.layer_intermediate_sizes[i], kv_indices[i])


class SlimGPTLlamaConfig(SlimGPTConfigMixin, LlamaConfig):
    model_type = "slimgpt_llama"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self._init_layer_widths(kwargs))


class SlimGPTMistralConfig(SlimGPTConfigMixin, MistralConfig):
    model_type = "slimgpt_mistral"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self._init_layer_widths(kwargs))


class SlimGPTQwen2Config(SlimGPTConfigMixin, Qwen2Config):
    model_type = "slimgpt_qwen2"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self._init_layer_widths(kwargs))


class SlimGPTLlamaForCausalLM(SlimGPTModelMixin, LlamaForCausalLM):
    config_class = SlimGPTLlamaConfig

    def __init__(self, config: SlimGPTLlamaConfig) -> None:
        super().__init__(config)


class SlimGPTMistralForCausalLM(SlimGPTModelMixin, MistralForCausalLM):
    config_class = SlimGPTMistralConfig

    def __init__(self, config: SlimGPTMistralConfig) -> None:
        super().__init__(config)


class SlimGPTQwen2ForCausalLM(SlimGPTModelMixin, Qwen2ForCausalLM):
    config_class = SlimGPTQwen2Config

    def __init__(self, config: SlimGPTQwen2Config) -> None:
        super().__init__(config)


#: base ``model_type`` -> (config class, model class) of its hetero variant.
HETERO_CLASSES: dict[str, tuple[type, type]] = {
    "llama": (SlimGPTLlamaConfig, SlimGPTLlamaForCausalLM),
    "mistral": (SlimGPTMistralConfig, SlimGPTMistralForCausalLM),
    "qwen2": (SlimGPTQwen2Config, SlimGPTQwen2ForCausalLM),
}
