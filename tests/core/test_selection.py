"""Head and channel selection against brute force: at every step the greedy choice must be the
unit whose removal (with optimal compensation of the rest) leaves the least output error, among
the units the GQA policy allows."""

from __future__ import annotations

import pytest
import torch

from slimgpt_core.channels import group_size, prune_channels
from slimgpt_core.heads import prune_heads

HEADS, KV, HEAD_DIM = 6, 2, 3  # two KV groups of three query heads
TINY_DAMP = 1e-12  # float64: the damped optimum is the exact optimum to ~1e-12


def _problem(inp: int, out: int = 5, n: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    X = torch.randn(inp, n, generator=g, dtype=torch.float64)
    X[1::3] += 0.7 * X[0::3][: X[1::3].shape[0]]  # correlated inputs: compensation matters
    X *= torch.linspace(0.3, 2.0, inp, dtype=torch.float64)[:, None]
    return W, X, 2 * X @ X.T / n


def _residual(W: torch.Tensor, X: torch.Tensor, removed_cols: list[int]) -> float:
    """Least output error after zeroing ``removed_cols`` and refitting the others (lstsq)."""
    keep = [j for j in range(W.shape[1]) if j not in set(removed_cols)]
    if not keep:
        return float((W @ X).pow(2).sum())
    fit = torch.linalg.lstsq(X[keep].T, (W @ X).T).solution.T
    return float((W @ X - fit @ X[keep]).pow(2).sum())


def _cols(heads: list[int]) -> list[int]:
    return [h * HEAD_DIM + d for h in heads for d in range(HEAD_DIM)]


def _allowed(policy: str, removed: list[int], total: int) -> list[list[int]]:
    """Candidate units (lists of query heads) the policy allows at this step."""
    group = HEADS // KV
    per_group = [sum(1 for h in removed if h // group == g) for g in range(KV)]
    alive = [h for h in range(HEADS) if h not in removed]
    if policy == "group":
        return [list(range(g * group, (g + 1) * group)) for g in range(KV) if per_group[g] == 0]
    if policy == "balanced":
        quota = total // KV
        return [[h] for h in alive if per_group[h // group] < quota]
    may_empty = max(0, total - (HEADS - KV))
    emptied = sum(1 for c in per_group if c == group)
    return [[h] for h in alive if emptied < may_empty or per_group[h // group] < group - 1]


def _brute_force_heads(W, X, policy: str, total: int) -> list[int]:
    removed: list[int] = []
    while len(removed) < total:
        options = _allowed(policy, removed, total)
        best = min(options, key=lambda unit: _residual(W, X, _cols(removed + unit)))
        removed += best
    return sorted(removed)


@pytest.mark.parametrize(("policy", "counts"), [
    ("group", [3]), ("balanced", [2, 4]), ("free", [1, 2, 3, 4, 5]),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prune_heads_equals_brute_force_greedy_at_every_step(policy: str, counts: list[int],
                                                             seed: int) -> None:
    W, X, H = _problem(HEADS * HEAD_DIM, seed=seed)
    for total in counts:
        result = prune_heads(W.clone(), H, num_heads=HEADS, num_kv_heads=KV, head_dim=HEAD_DIM,
                             heads_to_remove=total, policy=policy, percdamp=TINY_DAMP)
        removed = sorted(set(range(HEADS)) - set(result.kept_heads))
        assert removed == _brute_force_heads(W, X, policy, total), (policy, total)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prune_heads_reports_the_exact_joint_error(seed: int) -> None:
    W, X, H = _problem(HEADS * HEAD_DIM, seed=seed)
    result = prune_heads(W.clone(), H, num_heads=HEADS, num_kv_heads=KV, head_dim=HEAD_DIM,
                         heads_to_remove=3, policy="free", percdamp=TINY_DAMP)
    removed = sorted(set(range(HEADS)) - set(result.kept_heads))
    assert result.error == pytest.approx(2 / X.shape[1] * _residual(W, X, _cols(removed)),
                                         rel=1e-6)


@pytest.mark.parametrize("total", [1, 2, 3, 4])
def test_free_policy_keeps_every_kv_head_when_it_can(total: int) -> None:
    W, _, H = _problem(HEADS * HEAD_DIM)
    result = prune_heads(W, H, num_heads=HEADS, num_kv_heads=KV, head_dim=HEAD_DIM,
                         heads_to_remove=total, policy="free", percdamp=TINY_DAMP)
    assert result.kept_kv_heads == [0, 1]


def test_free_policy_empties_exactly_the_groups_it_must() -> None:
    W, _, H = _problem(HEADS * HEAD_DIM)
    result = prune_heads(W, H, num_heads=HEADS, num_kv_heads=KV, head_dim=HEAD_DIM,
                         heads_to_remove=5, policy="free", percdamp=TINY_DAMP)
    assert len(result.kept_heads) == 1 and len(result.kept_kv_heads) == 1
    assert result.kv_index == [0]


def _brute_force_channels(W, X, total: int) -> list[int]:
    removed: list[int] = []
    for _ in range(total):
        alive = [j for j in range(W.shape[1]) if j not in removed]
        removed.append(min(alive, key=lambda j: _residual(W, X, removed + [j])))
    return removed


@pytest.mark.parametrize("seed", [0, 1])
def test_prune_channels_with_unit_groups_equals_brute_force_greedy_at_every_step(
        seed: int) -> None:
    W, X, H = _problem(16, seed=seed)
    order = _brute_force_channels(W, X, 12)
    for k in range(1, 13):
        result = prune_channels(W.clone(), H, channels_to_remove=k, percdamp=TINY_DAMP,
                                min_group=1, max_group=1)
        assert sorted(set(range(16)) - set(result.kept_channels)) == sorted(order[:k]), k


def test_group_size_is_capped_at_max_group_while_far_from_the_target() -> None:
    assert group_size(5000, 64, 1024) == 1024
    assert group_size(2560, 64, 1024) == 1024


def test_group_size_is_half_of_what_is_left_beyond_512() -> None:
    assert group_size(1600, 64, 1024) == 544
    assert group_size(2559, 64, 1024) == 1023


def test_group_size_never_goes_below_the_floor_or_above_what_is_left() -> None:
    assert group_size(600, 64, 1024) == 64
    assert group_size(40, 64, 1024) == 40
    assert group_size(40, 1, 1024) == 1


def test_prune_channels_follows_the_rule_from_the_cap_down_to_the_floor() -> None:
    # The same rule as at 1024 on a 7B layer, scaled down: a cap of 64 on an 800-wide layer.
    W, _, H = _problem(700, out=4, n=800)
    result = prune_channels(W.float(), H.float(), channels_to_remove=660, percdamp=0.01,
                            min_group=8, max_group=64)
    sizes = result.group_sizes
    assert sizes[:5] == [64, 42, 21, 10, 8]
    assert sum(sizes) == 660 and len(result.kept_channels) == 40
    assert all(s == 8 for s in sizes[4:-1]) and 1 <= sizes[-1] <= 8
