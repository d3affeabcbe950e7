"""Hessian accumulation over calibration batches."""

from __future__ import annotations

import pytest
import torch

from slimgpt_core.hessian import HessianAccumulator


def test_batches_accumulate_to_two_x_xt_over_n() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 8, generator=g) for _ in range(4)]  # (batch, tokens, dim)
    acc = HessianAccumulator(8, "cpu")
    for b in batches:
        acc.add(b)
    X = torch.cat([b.reshape(-1, 8) for b in batches]).double()
    torch.testing.assert_close(acc.hessian().double(), 2 * X.T @ X / X.shape[0], rtol=1e-5,
                               atol=1e-5)


def test_half_precision_inputs_accumulate_in_fp32() -> None:
    x = torch.randn(64, 16).to(torch.bfloat16)
    acc = HessianAccumulator(16, "cpu")
    acc.add(x)
    assert acc.sum.dtype == torch.float32
    xf = x.float()
    torch.testing.assert_close(acc.hessian(), 2 * xf.T @ xf / 64)


def test_no_tokens_is_an_error() -> None:
    with pytest.raises(ValueError, match="no calibration tokens"):
        HessianAccumulator(4, "cpu").hessian()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_accumulation_matches_fp32() -> None:
    x = torch.randn(4096, 256, device="cuda").to(torch.bfloat16)
    acc = HessianAccumulator(256, "cuda")
    acc.add(x)
    xf = x.float()
    torch.testing.assert_close(acc.hessian(), 2 * xf.T @ xf / 4096, rtol=1e-4, atol=1e-4)


def test_non_finite_activations_are_refused_naming_the_layer() -> None:
    from slimgpt_core.errors import NonFiniteHessianError

    acc = HessianAccumulator(4, "cpu", name="layer 7 mlp.down_proj")
    x = torch.ones(3, 4)
    x[1, 2] = float("inf")
    acc.add(x)
    with pytest.raises(NonFiniteHessianError, match="layer 7 mlp.down_proj") as info:
        acc.hessian()
    assert info.value.where == "layer 7 mlp.down_proj"
