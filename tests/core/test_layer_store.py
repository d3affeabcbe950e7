"""The layer store's pieces that CPU runs can check: pinned slabs, sources, write errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimgpt_core.layer_store import LayerStore, ModuleSource, PinnedSlab, assign_tensors
from tests.core.tiny import tiny_llama


def test_slab_carves_aligned_views_of_one_buffer() -> None:
    slab = PinnedSlab(pin=False)
    slab.reset(reserve=4096)
    a = slab.alloc((3, 5), torch.bfloat16)
    b = slab.alloc((7,), torch.float32)
    assert a.shape == (3, 5) and b.dtype == torch.float32
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert (b.data_ptr() - a.data_ptr()) % PinnedSlab.ALIGN == 0


def test_slab_grows_and_keeps_earlier_views_valid() -> None:
    slab = PinnedSlab(pin=False)
    a = slab.alloc((4,), torch.float32)
    a.fill_(3.0)
    big = slab.alloc((10_000,), torch.float32)  # larger than the first buffer
    big.fill_(1.0)
    assert torch.equal(a, torch.full((4,), 3.0))
    slab.reset()
    again = slab.alloc((10_000,), torch.float32)  # fits the grown buffer: no new allocation
    assert again.data_ptr() == big.data_ptr()


def test_module_source_copies_a_layer_into_given_buffers() -> None:
    layers = tiny_llama(layers=1).model.layers
    slab = PinnedSlab(pin=False)
    tensors = ModuleSource(layers).read_layer(0, slab.alloc)
    for name, param in layers[0].named_parameters():
        assert torch.equal(tensors[name], param)
        assert tensors[name].data_ptr() != param.data_ptr()


def test_strict_assignment_names_missing_and_unexpected_tensors() -> None:
    layer = tiny_llama(layers=1).model.layers[0]
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state.pop("mlp.up_proj.weight")
    with pytest.raises(KeyError, match="mlp.up_proj.weight"):
        assign_tensors(layer, state, strict=True)
    with pytest.raises(KeyError, match="unexpected"):
        assign_tensors(layer, {"mlp.nope": torch.zeros(1)}, strict=False)


def test_a_failed_write_surfaces_on_the_main_thread() -> None:
    layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    store = LayerStore(layers, torch.device("cpu"), "resident")

    def broken(_tensors: dict) -> None:
        raise OSError("disk full")

    store.release(0, layers[0], on_host=broken)
    with pytest.raises(RuntimeError, match="disk full"):
        store.close()
