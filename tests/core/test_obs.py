"""The OBS arithmetic: compensation, joint group errors, downdates, damping."""

from __future__ import annotations

import itertools

import pytest
import torch

from slimgpt_core.obs import channel_errors, damped_inverse, group_errors, remove_group


def _problem(out: int = 5, inp: int = 12, n: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    X = torch.randn(inp, n, generator=g, dtype=torch.float64)
    X[3] += 0.8 * X[4]  # correlated inputs make compensation matter
    H = 2 * X @ X.T / n
    return W, X, H


def _least_squares(W: torch.Tensor, X: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Best W' with zero pruned columns: solve min ||W X - W'_K X_K||^2 directly."""
    XK = X[keep]
    WK = torch.linalg.lstsq(XK.T, (W @ X).T).solution.T
    out = torch.zeros_like(W)
    out[:, keep] = WK
    return out


def test_compensation_equals_least_squares_optimum() -> None:
    W, X, H = _problem()
    group = torch.tensor([2, 3, 7])
    Wc = W.clone()
    remove_group(Wc, torch.linalg.inv(H), group)
    keep = [j for j in range(W.shape[1]) if j not in group.tolist()]
    torch.testing.assert_close(Wc, _least_squares(W, X, keep), rtol=1e-8, atol=1e-8)


def test_reported_error_is_output_error_on_the_data() -> None:
    W, X, H = _problem()
    n = X.shape[1]
    Wc = W.clone()
    err = remove_group(Wc, torch.linalg.inv(H), torch.tensor([0, 5]))
    assert err == pytest.approx(2 / n * ((W - Wc) @ X).pow(2).sum().item(), rel=1e-9)


def test_group_errors_match_direct_formula() -> None:
    W, _, H = _problem()
    hinv = torch.linalg.inv(H)
    groups = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
    expected = torch.stack([
        torch.trace(W[:, g] @ torch.linalg.inv(hinv[g][:, g]) @ W[:, g].T) for g in groups
    ])
    torch.testing.assert_close(group_errors(W, hinv, groups), expected, rtol=1e-9, atol=1e-12)


def test_greedy_choice_matches_brute_force_on_tiny_layer() -> None:
    W, X, H = _problem(out=4, inp=8, seed=3)
    heads = torch.arange(8).view(4, 2)  # four "heads" of two columns each
    scores = group_errors(W, torch.linalg.inv(H), heads)
    residuals = []
    for g in heads.tolist():
        keep = [j for j in range(8) if j not in g]
        residuals.append((W @ X - _least_squares(W, X, keep) @ X).pow(2).sum().item())
    assert int(torch.argmin(scores)) == min(range(4), key=residuals.__getitem__)


def test_downdate_equals_inverse_of_reduced_hessian() -> None:
    W, _, H = _problem()
    hinv = torch.linalg.inv(H)
    group = torch.tensor([1, 6, 9])
    remove_group(W.clone(), hinv, group)
    keep = torch.tensor([j for j in range(12) if j not in group.tolist()])
    torch.testing.assert_close(hinv[keep][:, keep], torch.linalg.inv(H[keep][:, keep]),
                               rtol=1e-8, atol=1e-8)
    assert hinv[group].abs().max() == 0 and hinv[:, group].abs().max() == 0


def test_sequential_group_removals_equal_one_joint_removal() -> None:
    W, _X, H = _problem()
    W1, W2 = W.clone(), W.clone()
    h1, h2 = torch.linalg.inv(H), torch.linalg.inv(H)
    e1 = remove_group(W1, h1, torch.tensor([2, 3])) + remove_group(W1, h1, torch.tensor([7]))
    e2 = remove_group(W2, h2, torch.tensor([2, 3, 7]))
    torch.testing.assert_close(W1, W2, rtol=1e-8, atol=1e-8)
    assert e1 == pytest.approx(e2, rel=1e-8)


def test_channel_errors_are_single_column_obs_errors() -> None:
    W, _, H = _problem()
    hinv = torch.linalg.inv(H)
    expected = torch.stack([W[:, j].pow(2).sum() / hinv[j, j] for j in range(12)])
    torch.testing.assert_close(channel_errors(W, hinv), expected)


def test_damping_is_a_share_of_the_mean_diagonal() -> None:
    _, _, H = _problem()
    inv = damped_inverse(H, 0.01)
    damp = 0.01 * torch.diagonal(H).mean().item()
    assert inv.damping == pytest.approx(damp)
    assert inv.retries == 0
    torch.testing.assert_close(inv.hinv, torch.linalg.inv(H + damp * torch.eye(12)))


def test_indefinite_hessian_is_retried_with_more_damping() -> None:
    H = torch.diag(torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64))
    inv = damped_inverse(H, 0.01)
    assert inv.retries > 0
    assert inv.damping > 0.5
    assert torch.isfinite(inv.hinv).all()


def test_dead_input_channels_are_flagged_and_invertible() -> None:
    _, X, _ = _problem()
    X[5] = 0
    H = 2 * X @ X.T / X.shape[1]
    inv = damped_inverse(H, 0.01)
    assert inv.dead.tolist() == [j == 5 for j in range(12)]
    assert torch.isfinite(inv.hinv).all()


@pytest.mark.parametrize("g", [1, 2, 3])
def test_removing_a_superset_never_costs_less(g: int) -> None:
    # The joint error of a group is at least that of any single column in it: the optimum over
    # fewer free columns cannot beat the optimum over more.
    W, _, H = _problem(seed=g)
    hinv = torch.linalg.inv(H)
    for group in itertools.islice(itertools.combinations(range(12), g), 20):
        idx = torch.tensor(group)
        joint = group_errors(W, hinv, idx[None])[0]
        assert joint >= channel_errors(W, hinv)[idx].max() - 1e-9


def test_non_finite_hessian_is_refused_without_damping_retries() -> None:
    from slimgpt_core.errors import NonFiniteHessianError

    _, _, H = _problem()
    H[2, 3] = H[3, 2] = float("nan")
    with pytest.raises(NonFiniteHessianError, match="2 of 144 entries"):
        damped_inverse(H, 0.01)


def test_damping_actually_used_is_reported_as_a_share_of_the_mean_diagonal() -> None:
    H = torch.diag(torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64))
    inv = damped_inverse(H, 0.01)
    assert inv.percdamp == pytest.approx(inv.damping / torch.diagonal(H).mean().item())
    assert inv.percdamp > 0.01
    assert damped_inverse(_problem()[2], 0.01).percdamp == pytest.approx(0.01)
