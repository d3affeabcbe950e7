"""Fit the time coefficients of :mod:`slimgpt_core.costs` on the H200 benchmark runs.

    python benchmarks/fit_costs.py [benchmarks/results/h200_scale.jsonl [HELD_OUT.jsonl]]

Prints the coefficients (to paste into ``slimgpt_core.costs.Coefficients``), then every run's
measured and predicted seconds and peak GPU/host memory, the largest relative errors, and
the errors when each model shape is left out of the fit (how far the model extrapolates).
Runs in ``HELD_OUT`` (default ``results/h200_scale_full.jsonl``, the whole 80-layer 70B runs)
are predicted by the fitted model but not fitted on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import SHAPES

from slimgpt_core.costs import (
    COEFFICIENTS,
    Coefficients,
    GiB,
    Workload,
    gpu_peak_bytes,
    host_peak_bytes,
    layer_work,
    predict_seconds,
)
from slimgpt_core.schedule import ModelShape, make_plan

FOLDERS = {"m7": "7b", "m8": "8b", "m13": "13b"}
PLACEMENT = {"resident": "resident", "host": "host", "disk": "stream", "generated": "stream"}


def load(path: Path) -> list[dict]:
    runs = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "wrote" in r or r.get("device", "").startswith("cpu"):
            continue
        shape_name = FOLDERS.get(r["shape"], r["shape"])
        shape = ModelShape.from_config({"model_type": "llama", **SHAPES[shape_name]})
        plan = make_plan(shape, r["ratio"])
        work = Workload(r["windows"], r["seqlen"])
        k = r["layers_pruned"]
        runs.append({**r, "shape_name": shape_name, "shape_obj": shape, "plan": plan,
                     "work": work, "w": layer_work(shape, plan, work, k), "k": k,
                     "place": PLACEMENT[r["placement"]]})
    return runs


def fit(runs: list[dict]) -> Coefficients:
    def lstsq(rows: list[list[float]], ys: list[float]) -> np.ndarray:
        return np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)[0]

    one = [r for r in runs if r["gpus"] == 1]
    p = lstsq([[r["w"]["pass_flop"] / 1e15] for r in runs],
              [r["gpus"] * sum(r["phases_s"][x] for x in ("attn_pass", "ffn_pass", "output_pass"))
               for r in runs])
    ffn = lstsq([[r["w"]["ffn_maths"], r["k"]] for r in one], [r["phases_s"]["ffn"] for r in one])
    heads = lstsq([[r["w"]["heads_units"], r["k"]] for r in one],
                  [r["phases_s"]["heads"] for r in one])
    over = [(r["phases_s"]["total"] - sum(v for x, v in r["phases_s"].items()
                                           if x not in ("total", "transfer_wait"))
             + r["phases_s"]["hessian_finalize"]) / r["k"] for r in one]
    start_rows, start_y = [], []
    for r in runs:
        steady = r["per_layer_s_mean"]
        start_rows.append([r["place"] == "resident", r["place"] != "resident",
                           r["w"]["embed_bytes"] / 1e9])
        start_y.append(r["first_layer_s"] - steady)
    s = lstsq(start_rows, start_y)
    return replace(COEFFICIENTS, pass_s_per_pflop=float(p[0]),
                   ffn_maths_s_per_tflop3=float(ffn[0]), ffn_maths_s=float(ffn[1] / 1),
                   heads_s_per_unit=float(heads[0]), heads_s=float(heads[1]),
                   layer_overhead_s=float(np.mean(over)), startup_s=float(s[0]),
                   startup_stream_s=float(s[1]), startup_s_per_embed_gb=float(s[2]))


def predict(r: dict, coef: Coefficients) -> float:
    return predict_seconds(r["shape_obj"], r["plan"], r["work"], gpus=r["gpus"],
                           placement=r["place"], layers=r["k"], coef=coef)["total_s"]


def host_pred_meas(r: dict) -> tuple[float, float]:
    """Predicted and measured host peak (GiB) of a run: the whole job (every rank's VmHWM
    summed) where each rank's was recorded, else the leader's alone (one rank's prediction)."""
    per_rank = r.get("peak_host_GiB_per_rank")
    whole_job = per_rank is not None and len(per_rank) == r["gpus"]
    h_pred = host_peak_bytes(r["shape_obj"], r["work"], placement=r["place"],
                             gpus=r["gpus"] if whole_job else 1)
    if r["placement"] == "generated" and not r.get("lm_head_in_host"):  # older runs had none
        h_pred -= r["w"]["embed_bytes"]  # the embeddings were there, the LM head was not
    return h_pred / GiB, sum(per_rank) if whole_job else r["peak_host_GiB"]


def main() -> None:
    results = Path(__file__).resolve().parent / "results"
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else results / "h200_scale.jsonl"
    held_path = Path(sys.argv[2]) if len(sys.argv) > 2 else results / "h200_scale_full.jsonl"
    runs = load(path)
    coef = fit(runs)
    held = load(held_path) if held_path.exists() else []
    print("fitted:", {k: float(f"{v:.4g}") for k, v in vars(coef).items()
                      if isinstance(v, float) and not k.startswith("error")})
    errs, gpu_errs, host_errs = [], [], []
    print(f"{'run':36s} {'measured s':>10s} {'pred s':>8s} {'err':>6s} | {'GPU GiB':>7s} "
          f"{'pred':>6s} | {'host GiB':>8s} {'pred':>6s}")
    for r in runs:
        pred = predict(r, coef)
        err = pred / r["prune_s"] - 1
        errs.append(abs(err))
        g_pred = gpu_peak_bytes(r["shape_obj"], r["work"], gpus=r["gpus"],
                                placement=r["place"], include_base=False) / GiB
        h_pred, h_meas = host_pred_meas(r)
        g_meas = r["peak_gpu_GiB"][0]
        gpu_errs.append(abs(g_pred / g_meas - 1))
        if r["placement"] != "disk":  # disk runs' VmHWM counted mapped page cache (see docs)
            host_errs.append(abs(h_pred / h_meas - 1))
        print(f"{r['label']:36s} {r['prune_s']:10.2f} {pred:8.2f} {err:+6.1%} | {g_meas:7.2f} "
              f"{g_pred:6.2f} | {h_meas:8.2f} {h_pred:6.2f}")
    print(f"time: max |error| {max(errs):.1%}; GPU peak: {max(gpu_errs):.1%}; "
          f"host peak (not disk): {max(host_errs):.1%}")
    held_host_errs: list[float] = []
    for r in held:
        pred = predict(r, coef)
        g_pred = gpu_peak_bytes(r["shape_obj"], r["work"], gpus=r["gpus"],
                                placement=r["place"], include_base=False) / GiB
        h_pred, h_meas = host_pred_meas(r)
        held_host_errs.append(abs(h_pred / h_meas - 1))
        print(f"held out {r['label']:27s} {r['prune_s']:10.2f} {pred:8.2f} "
              f"{pred / r['prune_s'] - 1:+6.1%} | {r['peak_gpu_GiB'][0]:7.2f} {g_pred:6.2f} | "
              f"{h_meas:8.2f} {h_pred:6.2f}")
    if held:
        print(f"held-out runs: host peak max |error| {max(held_host_errs):.1%}")
    loo = []
    for left in sorted({r["shape_name"] for r in runs}):
        c = fit([r for r in runs if r["shape_name"] != left])
        for r in runs:
            if r["shape_name"] == left:
                loo.append(abs(predict(r, c) / r["prune_s"] - 1))
                print(f"  leave {left} out: {r['label']:34s} error {predict(r, c) / r['prune_s'] - 1:+.1%}")
    print(f"leave-one-shape-out: max |error| {max(loo):.1%}")
    shape = ModelShape.from_config({"model_type": "llama", **SHAPES["70b"]})
    plan, work = make_plan(shape, 0.2), Workload()
    for gpus in (1, 2):
        t = predict_seconds(shape, plan, work, gpus=gpus, placement="stream", coef=coef)
        print(f"70B, all 80 layers, {gpus} GPU(s): predicted {t['total_s']:.0f} s "
              f"({t['total_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
