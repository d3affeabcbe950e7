"""SlimGPT on the real SmolLM2-135M-Instruct: it must beat its own ablations.

Small on purpose (CPU CI): calibration 16 windows of 128 tokens from the shared calibration
text, perplexity on 16 windows of 128 tokens of the held-out text. The long runs with more data
are in benchmarks/quality_smollm2.py and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import copy

import pytest

from slimgpt_core.calibration import consecutive_windows, sample_windows
from slimgpt_core.evaluate import perplexity
from slimgpt_core.pruner import PruneConfig, prune_model
from tests.conftest import real_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(smollm2_base):
    base, tokenizer, _ = smollm2_base
    calib = sample_windows(real_text("calib"), tokenizer, 16, 128, seed=0)
    evals = consecutive_windows(real_text("eval"), tokenizer, 128, 16)
    return base, calib, evals


@pytest.fixture(scope="module")
def ppl(data):
    base, calib, evals = data
    cache: dict[tuple[float, str, str], float] = {}

    def get(ratio: float, method: str = "slimgpt", schedule: str = "log") -> float:
        key = (ratio, method, schedule)
        if key not in cache:
            model = copy.deepcopy(base)
            prune_model(model, calib, PruneConfig(target_ratio=ratio, method=method,
                                                  schedule=schedule, batch_size=8))
            cache[key] = perplexity(model, evals)
        return cache[key]

    return get


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_slimgpt_beats_pruning_without_compensation(ppl, ratio: float) -> None:
    assert ppl(ratio) < ppl(ratio, method="no_compensation")


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_slimgpt_beats_magnitude_pruning(ppl, ratio: float) -> None:
    assert ppl(ratio) < ppl(ratio, method="magnitude")


def test_log_schedule_beats_uniform_at_half_the_parameters(ppl) -> None:
    assert ppl(0.5) < ppl(0.5, schedule="uniform")


def test_twenty_percent_keeps_perplexity_close_to_dense(data, ppl) -> None:
    base, _, evals = data
    assert ppl(0.2) < 2.0 * perplexity(base, evals)
