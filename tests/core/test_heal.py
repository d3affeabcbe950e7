"""Recovery by distillation from the dense model (tiny models, tiny budgets, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from slimgpt_core.heal import HealConfig, heal
from slimgpt_core.pruner import PruneConfig, prune_model
from tests.core.tiny import tiny_llama, windows


def _kl(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        s = F.log_softmax(student(input_ids=ids).logits.float(), -1)
        t = F.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.fixture(scope="module")
def pruned_pair():
    teacher = tiny_llama(layers=2)
    with torch.no_grad():  # a random model with confident predictions, as trained ones have
        for name, p in teacher.named_parameters():
            if "proj" in name:
                p.mul_(6)
        teacher.lm_head.weight.mul_(10)
    result = prune_model(copy.deepcopy(teacher), windows(16, 32),
                         PruneConfig(target_ratio=0.5, batch_size=8, min_group=8,
                                     gqa_policy="free"))
    return teacher, result


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_heal_brings_the_pruned_model_closer_to_the_dense_one(pruned_pair, mode: str) -> None:
    teacher, result = pruned_pair
    student = copy.deepcopy(result.model)
    ids = windows(16, 32)
    before = _kl(student, teacher, ids)
    report = heal(student, teacher, ids, HealConfig(tokens=16 * 32 * 6, mode=mode, batch_size=4,
                                                    lr=1e-2 if mode == "lora" else 3e-3))
    assert report.steps == 24 and report.tokens == 24 * 4 * 32
    assert _kl(student, teacher, ids) < 0.8 * before


def test_lora_is_merged_away_leaving_the_pruned_shapes(pruned_pair) -> None:
    teacher, result = pruned_pair
    student = copy.deepcopy(result.model)
    shapes = {n: p.shape for n, p in student.named_parameters()}
    heal(student, teacher, windows(8, 32), HealConfig(tokens=8 * 32 * 2, rank=4, lr=1e-2,
                                                      batch_size=4))
    assert {n: p.shape for n, p in student.named_parameters()} == shapes
    assert all(type(m) is torch.nn.Linear for n, m in student.named_modules()
               if n.endswith("_proj"))
    changed = any(not torch.equal(p, q) for p, q in zip(student.parameters(),
                                                        result.model.parameters()))
    assert changed


def test_heal_leaves_embeddings_and_teacher_untouched(pruned_pair) -> None:
    teacher, result = pruned_pair
    student = copy.deepcopy(result.model)
    teacher_before = copy.deepcopy(teacher.state_dict())
    embed = student.get_input_embeddings().weight.clone()
    heal(student, teacher, windows(8, 32), HealConfig(tokens=8 * 32 * 2, mode="full",
                                                      batch_size=4, lr=1e-3))
    assert torch.equal(student.get_input_embeddings().weight, embed)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_heal_stops_when_cancelled(pruned_pair) -> None:
    teacher, result = pruned_pair
    calls = iter([False, False, True])
    report = heal(copy.deepcopy(result.model), teacher, windows(8, 32),
                  HealConfig(tokens=10_000, batch_size=2), should_cancel=lambda: next(calls))
    assert report.steps == 2


def test_bad_heal_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="heal mode"):
        HealConfig(mode="qlora")
