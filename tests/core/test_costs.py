"""The cost model behind /v1/estimate: it reproduces the recorded H200 runs within its stated
error, and its answers move the right way with GPUs and memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from slimgpt_core.costs import (
    COEFFICIENTS,
    GiB,
    Workload,
    estimate_resources,
    gpu_peak_bytes,
    predict_seconds,
)
from slimgpt_core.schedule import ModelShape, make_plan

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
LLAMA3_70B = {"model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192,
              "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
              "vocab_size": 128256}


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    sys.path.insert(0, str(BENCH))
    try:
        from fit_costs import load
    finally:
        sys.path.remove(str(BENCH))
    return load(BENCH / "results" / "h200_scale.jsonl")


def test_time_model_reproduces_the_recorded_runs_within_its_stated_error(runs) -> None:
    assert len(runs) >= 10
    for r in runs:
        pred = predict_seconds(r["shape_obj"], r["plan"], r["work"], gpus=r["gpus"],
                               placement=r["place"], layers=r["k"])["total_s"]
        assert abs(pred / r["prune_s"] - 1) <= COEFFICIENTS.error_fit, r["label"]


def test_gpu_memory_model_reproduces_the_recorded_peaks(runs) -> None:
    for r in runs:
        pred = gpu_peak_bytes(r["shape_obj"], r["work"], gpus=r["gpus"], placement=r["place"],
                              include_base=False) / GiB
        assert abs(pred / r["peak_gpu_GiB"][0] - 1) <= 0.1, r["label"]


def test_host_memory_model_reproduces_the_whole_model_runs_summed_over_ranks() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from fit_costs import host_pred_meas, load
    finally:
        sys.path.remove(str(BENCH))
    full = load(BENCH / "results" / "h200_scale_full.jsonl")
    assert {r["gpus"] for r in full} == {1, 2}
    for r in full:
        pred, measured = host_pred_meas(r)  # a 2-GPU run: both processes' VmHWM summed
        assert abs(pred / measured - 1) <= 0.1, r["label"]


def test_every_rank_of_a_multi_gpu_job_counts_in_its_host_memory() -> None:
    shape, plan = _shape_plan()
    one = estimate_resources(shape, plan, gpu_type="h200", gpus=1)
    eight = estimate_resources(shape, plan, gpu_type="h200", gpus=8)
    assert eight.peak_host_gb > 6 * one.peak_host_gb


def _shape_plan():
    shape = ModelShape.from_config(LLAMA3_70B)
    return shape, make_plan(shape, 0.2)


def test_a_70b_model_streams_on_one_h200_within_the_issue_targets() -> None:
    shape, plan = _shape_plan()
    est = estimate_resources(shape, plan, gpu_type="h200", gpus=1)
    assert est.placement == "stream" and est.fits
    assert est.peak_gpu_gb <= 80 and est.peak_host_gb <= 32
    assert est.output_disk_gb < 141


def test_more_gpus_take_less_time_and_less_memory_each() -> None:
    shape, plan = _shape_plan()
    one, two = (estimate_resources(shape, plan, gpus=n) for n in (1, 2))
    assert two.predicted_s < one.predicted_s
    assert two.peak_gpu_gb < one.peak_gpu_gb


def test_a_gpu_too_small_for_the_job_is_reported_with_the_reason() -> None:
    shape, plan = _shape_plan()
    est = estimate_resources(shape, plan, gpu_type="a100-40gb", gpus=1,
                             work=Workload(num_samples=512))
    assert not est.fits and "busiest GPU" in est.reasons[0]
    assert est.predicted_error >= 0.5 and not est.measured_gpu_type


# -- calibration chosen by a time budget ----------------------------------------------------
def _llama3_8b():
    from slimgpt_core.schedule import ModelShape, make_plan

    shape = ModelShape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                       head_dim=128, intermediate_size=14336, vocab_size=128256)
    return shape, make_plan(shape, 0.2, "log", "free")


@pytest.mark.parametrize("budget", [30.0, 60.0, 120.0])
def test_the_budget_gets_the_most_windows_whose_predicted_time_fits(budget: float) -> None:
    from slimgpt_core.costs import BUDGET_STEP, Workload, calibration_for_budget, predict_seconds

    shape, plan = _llama3_8b()
    n = calibration_for_budget(shape, plan, budget, seq_len=2048)

    def seconds(windows: int) -> float:
        return predict_seconds(shape, plan, Workload(windows, 2048), placement="resident")[
            "total_s"]

    assert n % BUDGET_STEP == 0
    assert seconds(n) <= budget < seconds(n + BUDGET_STEP)


def test_a_larger_budget_never_gives_fewer_windows() -> None:
    from slimgpt_core.costs import calibration_for_budget

    shape, plan = _llama3_8b()
    counts = [calibration_for_budget(shape, plan, b, seq_len=2048) for b in (20, 40, 80, 160)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_gpu_memory_caps_the_windows_whatever_the_budget() -> None:
    from slimgpt_core.costs import GPU_TYPES, Workload, calibration_for_budget, gpu_peak_bytes

    shape, plan = _llama3_8b()
    n = calibration_for_budget(shape, plan, 1e6, seq_len=2048, gpu="a100-40gb")
    assert n < 4096
    assert gpu_peak_bytes(shape, Workload(n, 2048), placement="resident") <= \
        GPU_TYPES["a100-40gb"].memory_gb * 1e9 < \
        gpu_peak_bytes(shape, Workload(n + 8, 2048), placement="resident")


def test_a_budget_too_small_for_any_calibration_is_refused() -> None:
    from slimgpt_core.costs import calibration_for_budget

    shape, plan = _llama3_8b()
    with pytest.raises(ValueError, match="not even 8 windows"):
        calibration_for_budget(shape, plan, 0.5, seq_len=2048)


@pytest.mark.parametrize(("name", "memory", "expected"), [
    ("NVIDIA H200", 150.0, "h200"), ("NVIDIA H100 80GB HBM3", 85.0, "h100-80gb"),
    ("NVIDIA A100-SXM4-40GB", 42.0, "a100-40gb"), ("NVIDIA A100-SXM4-80GB", 85.0, "a100-80gb"),
    ("NVIDIA L40S", 48.0, "l40s"), ("NVIDIA GeForce RTX 4090", 24.0, None)])
def test_gpu_types_are_recognised_by_name(name: str, memory: float, expected: str | None) -> None:
    from slimgpt_core.costs import gpu_type_for

    assert gpu_type_for(name, memory) == expected
