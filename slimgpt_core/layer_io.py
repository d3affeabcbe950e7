"""Running calibration activations through one Llama-layout decoder layer at a time.

The layer forward is written out (attention block, then FFN block) rather than calling the
layer module, because SlimGPT needs the activation between the two blocks and the input of
``down_proj``; the same two functions produce every layer's output, in a first run and when a
resumed run replays finished layers, so both give bit-identical activations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class LayerContext:
    """What every decoder layer receives besides hidden states (shared by all samples)."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor | None

    def to(self, device: torch.device) -> LayerContext:
        cos, sin = self.position_embeddings
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        return LayerContext((cos.to(device), sin.to(device)), mask)


class _Captured(Exception):
    """Raised by the capture hook to stop the model forward at the first decoder layer."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} is not a Llama-layout causal LM "
                        "(expected model.model.layers)")
    return layers


def layers_prefix(model: nn.Module) -> str:
    """Qualified name of the decoder-layer list (``model.layers``): the key prefix of every
    layer's tensors in a checkpoint."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise TypeError("the decoder layers are not a submodule of the model")


def check_uniform_attention(model: nn.Module) -> None:
    """Layers must share one attention mask; mixed sliding/full models are not supported."""
    kinds = {getattr(layer, "attention_type", "full_attention") for layer in decoder_layers(model)}
    if len(kinds) > 1:
        raise NotImplementedError(
            f"layers mix attention types {sorted(kinds)} (sliding-window layers); "
            "SlimGPT here supports models whose layers all use the same attention"
        )


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    device: torch.device,
    batch_size: int,
    store_device: torch.device,
) -> tuple[torch.Tensor, LayerContext]:
    """Hidden states entering layer 0 for every calibration window, and the shared context.

    Only the embeddings and the rotary module visit ``device``; the other layers stay where
    they are, so models larger than the accelerator can be pruned.
    """
    inner = model.model
    first = decoder_layers(model)[0]
    moved = [m for m in (inner.embed_tokens, getattr(inner, "rotary_emb", None)) if m is not None]
    homes = [next(m.parameters(), next(m.buffers(), None)) for m in moved]
    home_devices = [t.device if t is not None else device for t in homes]
    for m in moved:
        m.to(device)
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = kwargs
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    n, seqlen = input_ids.shape
    out: torch.Tensor | None = None
    context: LayerContext | None = None
    try:
        for start in range(0, n, batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _Captured:
                pass
            hidden = captured["hidden"]
            if out is None:
                out = torch.empty((n, seqlen, hidden.shape[-1]), dtype=hidden.dtype,
                                  device=store_device)
                kw = captured["kwargs"]
                cos, sin = kw["position_embeddings"]
                # Positions are identical for every window: keep one copy that broadcasts.
                context = LayerContext((cos[:1], sin[:1]), _first_mask(kw.get("attention_mask")))
            out[start:start + batch.shape[0]] = hidden.to(store_device)
    finally:
        handle.remove()
        for m, home in zip(moved, home_devices):
            m.to(home)
    assert out is not None and context is not None
    return out, context


def _first_mask(mask: Any) -> torch.Tensor | None:
    if mask is None:
        return None
    if isinstance(mask, dict):  # some models pass a mask per attention type
        mask = mask.get("full_attention", next(iter(mask.values())))
    if isinstance(mask, torch.Tensor):
        return mask[:1]
    raise NotImplementedError(f"unsupported attention mask type {type(mask).__name__}")


def attention_block(layer: nn.Module, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """``x + attn(norm(x))``: the residual stream after the attention half of the layer."""
    out = layer.self_attn(
        hidden_states=layer.input_layernorm(x),
        position_embeddings=ctx.position_embeddings,
        attention_mask=ctx.attention_mask,
    )[0]
    return x + out


def ffn_hidden(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Input of ``down_proj``: ``act(gate(z)) * up(z)`` with ``z = norm(h)``."""
    mlp = layer.mlp
    z = layer.post_attention_layernorm(h)
    return mlp.act_fn(mlp.gate_proj(z)) * mlp.up_proj(z)


def ffn_block(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``h + mlp(norm(h))``: the layer's output."""
    return h + layer.mlp(layer.post_attention_layernorm(h))


def micro_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
