"""Running calibration activations through one decoder layer at a time.

The layer forward is split into its attention and FFN branches by the family adapter
(:meth:`~slimgpt_core.families.Family.attention_block`, ``ffn_block``) rather than calling the
layer module, because SlimGPT needs the activation between the two branches and the input of
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
    """Raised by the last layer's recorder to stop the model forward."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} is not a decoder-only causal LM "
                        "(expected model.model.layers)")
    return layers


def contexts_to(contexts: list[LayerContext], device: torch.device) -> list[LayerContext]:
    """Move per-layer contexts to ``device``, keeping layers that share one sharing it."""
    moved: dict[int, LayerContext] = {}
    return [moved.setdefault(id(c), c.to(device)) for c in contexts]


def layers_prefix(model: nn.Module) -> str:
    """Qualified name of the decoder-layer list (``model.layers``): the key prefix of every
    layer's tensors in a checkpoint."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise TypeError("the decoder layers are not a submodule of the model")


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    device: torch.device,
    batch_size: int,
    store_device: torch.device,
) -> tuple[torch.Tensor, list[LayerContext]]:
    """Hidden states entering layer 0 for every calibration window, and each layer's context.

    Every decoder layer's forward is replaced, for the duration, by a recorder that notes what
    the model passes it (rotary embeddings and attention mask, which differ between the sliding
    and the full layers of Gemma, say) and hands its input on unchanged; the last one stops the
    forward. So the model's own code computes embeddings (with any scaling), masks and
    positions, and no layer weight is touched: only the modules outside the layers visit
    ``device``, and models larger than the accelerator can be pruned.
    """
    inner = model.model
    layers = decoder_layers(model)
    n_layers = len(layers)
    moved = [m for name, m in inner.named_children() if name != "layers"]
    homes = [next(m.parameters(), next(m.buffers(), None)) for m in moved]
    home_devices = [t.device if t is not None else device for t in homes]
    for m in moved:
        m.to(device)
    seen: list[dict[str, Any] | None] = [None] * n_layers
    first_hidden: list[torch.Tensor] = []

    def recorder(index: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                first_hidden.append(hidden)
            if seen[index] is None:
                seen[index] = kwargs
            if index == n_layers - 1:
                raise _Captured
            return hidden
        return forward

    # Instance attributes shadow the class's forward; an existing one (e.g. an accelerate
    # offload hook) is put back afterwards.
    saved = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    n, seqlen = input_ids.shape
    out: torch.Tensor | None = None
    try:
        for start in range(0, n, batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            first_hidden.clear()
            try:
                model(input_ids=batch, use_cache=False)
            except _Captured:
                pass
            hidden = first_hidden[0]
            if out is None:
                out = torch.empty((n, seqlen, hidden.shape[-1]), dtype=hidden.dtype,
                                  device=store_device)
            out[start:start + batch.shape[0]] = hidden.to(store_device)
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward
        for m, home in zip(moved, home_devices):
            m.to(home)
    assert out is not None and all(kw is not None for kw in seen)
    return out, _contexts(seen)


def _contexts(seen: list[Any]) -> list[LayerContext]:
    """One :class:`LayerContext` per layer; layers given the same tensors share one."""
    shared: dict[tuple[int, int, int], LayerContext] = {}
    out = []
    for kw in seen:
        cos, sin = kw["position_embeddings"]
        mask = kw.get("attention_mask")
        key = (id(cos), id(sin), id(mask))
        if key not in shared:
            # Positions are identical for every window: keep one copy that broadcasts.
            shared[key] = LayerContext((cos[:1], sin[:1]), _first_mask(mask))
        out.append(shared[key])
    return out


def _first_mask(mask: Any) -> torch.Tensor | None:
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        return mask[:1]
    raise NotImplementedError(f"unsupported attention mask type {type(mask).__name__}")


def micro_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
