"""Decoders whose layers have their own widths (SlimGPT's `hetero` artifacts), for any family.

This file is self-contained on purpose: it is copied next to the weights of every `hetero`
export and loaded with ``trust_remote_code=True``, so it may import torch and transformers only.
The pruner uses the same functions on the in-memory model, so what is verified is what ships.

One generic model, parameterised by the config (the format is documented in
docs/HETERO_FORMAT.md):

* ``SlimGPT<Stock>Config`` / ``SlimGPT<Stock>ForCausalLM`` exist for every stock transformers
  class ``<Stock>`` (made on first access, e.g. ``SlimGPTQwen3ForCausalLM`` extends
  ``Qwen3ForCausalLM``): the family's own modules, norms, rotary embeddings, soft-capping,
  sliding windows and multipliers all stay those of transformers;
* per layer ``i``: ``layer_num_heads[i]``, ``layer_num_kv_heads[i]``,
  ``layer_intermediate_sizes[i]`` and optionally ``layer_kv_index[i]`` (for each kept query head,
  the position of the key/value head it reads; absent = the standard grouping);
* ``slimgpt_layout``: where the prunable rows live (``qkv``: separate | fused;
  ``head_norm``: none | per_head | projection; ``ffn``: gated | fused | experts). With
  ``experts`` (Mixtral, Qwen3-MoE) ``layer_intermediate_sizes[i]`` is the width of every
  expert of layer ``i`` (the fused 3-D expert weights hold one width per layer).

A layer whose query heads read KV heads irregularly keeps its compact KV projections and
cache; the gather to one KV head per query head happens right before the attention kernel,
through an attention function registered with transformers (``slimgpt_kv_index``) that then
calls the kernel the model was loaded with (eager, sdpa, flash).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

_PER_LAYER_KEYS = ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_sizes",
                   "layer_kv_index")
LAYOUT_KEY = "slimgpt_layout"
CLASS_PREFIX = "SlimGPT"
KV_INDEX_ATTENTION = "slimgpt_kv_index"


# -- a layer's own view of the config -------------------------------------------------------------
class LayerConfigView:
    """The model config as one pruned module sees it: a few values overridden, the rest shared.

    Some stock modules read widths from their config at run time (Phi-3 splits its fused
    ``qkv_proj`` at ``config.num_attention_heads * head_dim``), and every attention module asks
    its config which attention kernel to run. A view answers both for this layer while a change
    to the model's config (e.g. ``set_attn_implementation``) still reaches every layer.
    """

    def __init__(self, base: Any, overrides: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))
        object.__setattr__(self, "_in_kernel", 0)

    @property
    def base(self) -> Any:
        return self._base

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_base", "_overrides", "_in_kernel"):
            raise AttributeError(name)
        overrides = self.__dict__["_overrides"]
        if name == "_attn_implementation" and self.__dict__["_in_kernel"]:
            return getattr(self.__dict__["_base"], name)  # the kernel asks for the real one
        if name in overrides:
            return overrides[name]
        return getattr(self.__dict__["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._base, name, value)

    def __deepcopy__(self, memo: dict[int, Any]) -> LayerConfigView:
        return LayerConfigView(copy.deepcopy(self._base, memo), self._overrides)

    def __reduce__(self) -> tuple[Any, ...]:
        return (LayerConfigView, (self._base, self._overrides))


def _set_view(module: nn.Module, **overrides: Any) -> None:
    config = module.__dict__.get("config")
    if config is None:
        return
    if isinstance(config, LayerConfigView):
        merged = {**config._overrides, **overrides}
        config = config.base
    else:
        merged = overrides
    module.__dict__["config"] = LayerConfigView(config, merged)


# -- query heads reading KV heads by index --------------------------------------------------------
def _index_on(module: nn.Module, device: torch.device) -> torch.Tensor:
    cache = module.__dict__.setdefault("_kv_index_cache", {})
    index = cache.get(device)
    if index is None:
        index = torch.tensor(module.kv_index_list, dtype=torch.long, device=device)
        cache[device] = index
    return index


def _family_eager(module: nn.Module) -> Any:
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def kv_index_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: torch.Tensor | None,
                       **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Expand the compact KV heads to one per query head, then run the model's own kernel."""
    index = _index_on(module, key.device)
    key = key.index_select(1, index)
    value = value.index_select(1, index)
    view = module.config
    impl = view.base._attn_implementation
    if impl in (None, "eager"):
        kernel = _family_eager(module)
    else:
        kernel = ALL_ATTENTION_FUNCTIONS.get_interface(impl, _family_eager(module))
    object.__setattr__(view, "_in_kernel", view._in_kernel + 1)
    try:
        return kernel(module, query, key, value, attention_mask, **kwargs)
    finally:
        object.__setattr__(view, "_in_kernel", view._in_kernel - 1)


AttentionInterface.register(KV_INDEX_ATTENTION, kv_index_attention)


def regular_groups(kv_index: list[int], num_kv_heads: int) -> int | None:
    """Query heads per KV head if ``kv_index`` is the standard grouped layout, else None."""
    if num_kv_heads == 0 or len(kv_index) % num_kv_heads:
        return None
    per = len(kv_index) // num_kv_heads
    return per if kv_index == [j // per for j in range(len(kv_index))] else None


def set_attention_layout(attn: nn.Module, num_heads: int, num_kv_heads: int,
                         kv_index: list[int] | None) -> None:
    """Record how many heads ``attn`` has now and how its query heads map onto KV heads."""
    if kv_index is None:
        kv_index = [j // (num_heads // num_kv_heads) for j in range(num_heads)]
    groups = regular_groups(kv_index, num_kv_heads)
    overrides: dict[str, Any] = {"num_attention_heads": num_heads,
                                 "num_key_value_heads": num_kv_heads}
    if groups is None or "kv_index_list" in attn.__dict__:
        # (a module that already routes by index keeps doing so, with the new index)
        attn.kv_index_list = tuple(int(k) for k in kv_index)
        attn.__dict__["_kv_index_cache"] = {}
        # After the gather every query head has its own KV head: the kernels must not repeat.
        attn.num_key_value_groups = 1
        overrides["_attn_implementation"] = KV_INDEX_ATTENTION
    else:
        attn.num_key_value_groups = groups
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attn, name):
            setattr(attn, name, num_heads)
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = num_kv_heads
    _set_view(attn, **overrides)


# -- narrowing a freshly built layer ------------------------------------------------------------
def _linear_like(old: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def _resize_norm(norm: nn.Module, size: int) -> None:
    w = norm.weight
    norm.weight = nn.Parameter(torch.empty(size, device=w.device, dtype=w.dtype),
                               requires_grad=w.requires_grad)


def resize_layer(layer: nn.Module, layout: Mapping[str, str], num_heads: int, num_kv_heads: int,
                 intermediate_size: int, kv_index: list[int] | None = None) -> None:
    """Give a decoder layer the widths of a pruned one (weights are loaded afterwards)."""
    attn, mlp = layer.self_attn, layer.mlp
    d = attn.head_dim
    hidden = attn.o_proj.out_features
    if layout.get("qkv", "separate") == "fused":
        attn.qkv_proj = _linear_like(attn.qkv_proj, (num_heads + 2 * num_kv_heads) * d, hidden)
    else:
        attn.q_proj = _linear_like(attn.q_proj, num_heads * d, hidden)
        attn.k_proj = _linear_like(attn.k_proj, num_kv_heads * d, hidden)
        attn.v_proj = _linear_like(attn.v_proj, num_kv_heads * d, hidden)
    attn.o_proj = _linear_like(attn.o_proj, hidden, num_heads * d)
    if layout.get("head_norm", "none") == "projection":
        _resize_norm(attn.q_norm, num_heads * d)
        _resize_norm(attn.k_norm, num_kv_heads * d)
    ffn = layout.get("ffn", "gated")
    if ffn == "experts":
        experts = mlp.experts
        num_experts = experts.gate_up_proj.shape[0]
        set_expert_weights(experts,
                           _empty_like(experts.gate_up_proj,
                                       (num_experts, 2 * intermediate_size, hidden)),
                           _empty_like(experts.down_proj, (num_experts, hidden, intermediate_size)))
        set_attention_layout(attn, num_heads, num_kv_heads, kv_index)
        return
    if ffn == "fused":
        mlp.gate_up_proj = _linear_like(mlp.gate_up_proj, 2 * intermediate_size, hidden)
    else:
        mlp.gate_proj = _linear_like(mlp.gate_proj, intermediate_size, hidden)
        mlp.up_proj = _linear_like(mlp.up_proj, intermediate_size, hidden)
    mlp.down_proj = _linear_like(mlp.down_proj, hidden, intermediate_size)
    set_mlp_width(mlp, intermediate_size)
    set_attention_layout(attn, num_heads, num_kv_heads, kv_index)


def _empty_like(param: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, device=param.device, dtype=param.dtype)


def set_expert_weights(experts: nn.Module, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Give a fused experts module (``gate_up_proj`` ``[E, 2F, D]``, ``down_proj``
    ``[E, D, F]``) new weights of width ``F``; its forward reads the width from them."""
    for name, value in (("gate_up_proj", gate_up), ("down_proj", down)):
        old = getattr(experts, name)
        setattr(experts, name, nn.Parameter(value, requires_grad=old.requires_grad))
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = int(down.shape[-1])


def set_mlp_width(mlp: nn.Module, intermediate_size: int) -> None:
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = intermediate_size
    _set_view(mlp, intermediate_size=intermediate_size)


# -- the config and model classes ---------------------------------------------------------------
class SlimGPTConfigMixin:
    """Per-layer widths and the layout on top of the base architecture's config."""

    def _init_layer_widths(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in (*_PER_LAYER_KEYS, LAYOUT_KEY):
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
        cfg = self.config  # type: ignore[attr-defined]
        if cfg.layer_num_heads is None:
            return
        layout = cfg.slimgpt_layout or {}
        kv_indices = cfg.layer_kv_index or [None] * cfg.num_hidden_layers
        for i, layer in enumerate(self.model.layers):  # type: ignore[attr-defined]
            resize_layer(layer, layout, cfg.layer_num_heads[i], cfg.layer_num_kv_heads[i],
                         cfg.layer_intermediate_sizes[i], kv_indices[i])


_CLASSES: dict[str, type] = {}


def _config_class(stock: type) -> type:
    def __init__(self: Any, **kwargs: Any) -> None:
        stock.__init__(self, **self._init_layer_widths(kwargs))

    return type(CLASS_PREFIX + stock.__name__, (SlimGPTConfigMixin, stock), {
        "model_type": "slimgpt_" + stock.model_type, "__init__": __init__,
        "__module__": __name__, "__qualname__": CLASS_PREFIX + stock.__name__,
    })


def _share_weight_conversions(stock: type, name: str) -> None:
    """Give class ``name`` the checkpoint conversions of ``stock``.

    transformers 5.x renames and fuses some families' weights on load and splits them back on
    save (Mixtral's and Qwen3-MoE's per-expert ``experts.<e>.*`` tensors <-> fused 3-D
    ``experts.gate_up_proj``/``down_proj``), but never for custom code unless the mapping is
    registered under the custom class's name. The folder holds the stock on-disk layout, so
    the per-layer-width class must convert exactly as the stock one does."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers before 5: no conversions, nothing to share
        return
    mapping = (get_checkpoint_conversion_mapping(stock.__name__)
               or get_checkpoint_conversion_mapping(stock.config_class.model_type))
    if mapping:
        register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


def _model_class(stock: type) -> type:
    config_cls = hetero_class(stock.config_class.__name__)

    def __init__(self: Any, config: Any) -> None:
        stock.__init__(self, config)

    name = CLASS_PREFIX + stock.__name__
    _share_weight_conversions(stock, name)
    return type(name, (SlimGPTModelMixin, stock), {
        "config_class": config_cls, "__init__": __init__,
        "__module__": __name__, "__qualname__": name,
    })


def hetero_class(stock_name: str) -> type:
    """``SlimGPT<stock_name>``: the per-layer-width variant of a stock transformers class."""
    name = CLASS_PREFIX + stock_name
    if name not in _CLASSES:
        stock = getattr(transformers, stock_name, None)
        if isinstance(stock, type) and issubclass(stock, PretrainedConfig):
            _CLASSES[name] = _config_class(stock)
        elif isinstance(stock, type) and issubclass(stock, PreTrainedModel):
            _CLASSES[name] = _model_class(stock)
        else:
            raise AttributeError(f"transformers has no config or model class {stock_name!r}")
    return _CLASSES[name]


def hetero_classes(model_type: str) -> tuple[type, type]:
    """``(SlimGPT<Config>, SlimGPT<ForCausalLM>)`` for a stock ``model_type`` (e.g. ``qwen3``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = model_type.removeprefix("slimgpt_")
    if base not in CONFIG_MAPPING_NAMES or base not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise KeyError(f"transformers has no causal LM of model_type {base!r}")
    return (hetero_class(CONFIG_MAPPING_NAMES[base]),
            hetero_class(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base]))


def __getattr__(name: str) -> type:
    # transformers resolves auto_map entries with getattr(module, "SlimGPT<Stock>...").
    if name.startswith(CLASS_PREFIX) and len(name) > len(CLASS_PREFIX):
        try:
            return hetero_class(name[len(CLASS_PREFIX):])
        except AttributeError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
