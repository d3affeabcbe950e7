"""SmolLM2-135M on a GPU: more calibration for the time, and what healing buys (fp32, CUDA).

    python benchmarks/gpu_quality.py --gguf PATH --data DIR --sizes 20=114836544 50=84303360 \
        [--sizes-from quality_rows.jsonl] [--config '{"target": "dense"}'] [--out results.jsonl]

``--sizes`` gives, per point, the total parameter count to prune to (the authors' recreation's
size from ``quality_smollm2.py``; ``--sizes-from`` reads it from that script's output); every
run is matched to it. What runs:

* the default at 64 x 512 calibration windows (the baseline, and the pruning time);
* 128 / 256 / 512 windows of 512 tokens (``--calib-windows``): quality and time;
* healing the baseline with LoRA and with full weights, the token budget chosen so that the
  healing takes ``--heal-time-factors`` times as long as the pruning did (default 1: the same
  time; the step rate is measured on a warm probe first; ``--heal-tokens`` overrides).

Perplexity on the first ``--eval-windows`` windows of 512 tokens of ``eval.txt``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality_smollm2 import _sync, ratio_for_params, warm_up
from slimgpt_core.calibration import consecutive_windows, sample_windows
from slimgpt_core.evaluate import perplexity
from slimgpt_core.heal import HealConfig, heal
from slimgpt_core.pruner import PruneConfig, prune_model
from slimgpt_core.schedule import ModelShape


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--sizes", nargs="*", default=[], help="POINT=TOTAL_PARAMS")
    ap.add_argument("--sizes-from", type=Path, default=None,
                    help="take the sizes from the 'authors' rows of quality_smollm2.py's output")
    ap.add_argument("--heal-time-factors", type=float, nargs="*", default=[1.0],
                    help="heal budgets as multiples of the pruning time (1 = the same time)")
    ap.add_argument("--config", default="{}", help="PruneConfig fields of the default, JSON")
    ap.add_argument("--calib-windows", type=int, nargs="*", default=[128, 256, 512])
    ap.add_argument("--scaling-points", nargs="*", default=["50"])
    ap.add_argument("--heal-modes", nargs="*", default=["lora", "full"])
    ap.add_argument("--heal-tokens", type=int, default=None)
    ap.add_argument("--eval-windows", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script")
    ap.add_argument("--stop-after", type=int, default=None, help="first N layers (dry runs)")
    args = ap.parse_args()
    dev = args.device
    if args.sizes_from:
        rows = [json.loads(x) for x in args.sizes_from.read_text().splitlines() if x.strip()]
        args.sizes += [f"{r['point']}={r['params']}" for r in rows if r["variant"] == "authors"]
    if not args.sizes:
        raise SystemExit("no sizes: give --sizes or --sizes-from")

    from slimgpt_core.loading import load_base_model

    t0 = time.perf_counter()
    base, tok, _ = load_base_model(args.gguf, dtype=torch.float32)
    base.to(dev)
    shape = ModelShape.from_config(base.config.to_dict())
    calib_text = (args.data / "calib.txt").read_text(encoding="utf-8")
    evals = consecutive_windows((args.data / "eval.txt").read_text(encoding="utf-8"), tok, 512,
                                args.eval_windows)
    extra = json.loads(args.config)
    warm_up(base, sample_windows(calib_text, tok, 8, 512), dev)

    def emit(row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    emit({"variant": "dense", "ppl": round(perplexity(base, evals), 3),
          "params": sum(p.numel() for p in base.parameters()), "eval_windows": args.eval_windows,
          "load_s": round(time.perf_counter() - t0, 1),
          "device": torch.cuda.get_device_name() if dev.startswith("cuda") else dev})

    def prune(point: str, windows: int) -> tuple[Any, dict[str, Any]]:
        size = dict(s.split("=") for s in args.sizes)[point]
        cfg = {**extra, "target_ratio": ratio_for_params(shape, int(size), extra)}
        if args.stop_after:
            cfg["stop_after"] = args.stop_after
        calib = sample_windows(calib_text, tok, windows, 512, seed=0)
        model = copy.deepcopy(base)
        _sync(dev)
        t = time.perf_counter()
        result = prune_model(model, calib, PruneConfig(device=dev, **cfg))
        _sync(dev)
        seconds = time.perf_counter() - t
        row = {"point": point, "calib_windows": windows, "params": result.params_after,
               "ppl": round(perplexity(model, evals), 3), "prune_seconds": round(seconds, 2),
               "config": extra}
        return model, row

    baselines = {}
    row_params: dict[str, int] = {}
    for point in [s.split("=")[0] for s in args.sizes]:
        model, row = prune(point, 64)
        emit({"variant": "default", **row})
        baselines[point] = (model, row["prune_seconds"])
        row_params[point] = row["params"]
    for point in args.scaling_points:
        for n in args.calib_windows:
            model, row = prune(point, n)
            emit({"variant": f"calib-{n}", **row})
            del model
    for point, (model, prune_s) in baselines.items():
        heal_windows = sample_windows(calib_text, tok, 1024, 512, seed=1)
        for mode in args.heal_modes:
            per_token = None
            if args.heal_tokens is None:  # the step rate first, warm (compiles, allocator)
                probe = copy.deepcopy(model)
                heal(probe, base, heal_windows, HealConfig(tokens=4 * 512, mode=mode),
                     device=dev)
                _sync(dev)
                t = time.perf_counter()
                heal(probe, base, heal_windows, HealConfig(tokens=4 * 512 * 3, mode=mode),
                     device=dev)
                _sync(dev)
                per_token = (time.perf_counter() - t) / (4 * 512 * 3)
                del probe
            for factor in args.heal_time_factors:
                tokens = args.heal_tokens or max(4 * 512, int(factor * prune_s / per_token))
                student = copy.deepcopy(model)
                _sync(dev)
                t = time.perf_counter()
                report = heal(student, base, heal_windows, HealConfig(tokens=tokens, mode=mode),
                              device=dev)
                _sync(dev)
                emit({"variant": f"heal-{mode}", "point": point, "time_factor": factor,
                      "heal_tokens": report.tokens, "params": row_params[point],
                      "heal_seconds": round(time.perf_counter() - t, 2),
                      "prune_seconds": prune_s, "kl_first": round(report.loss_first, 4),
                      "kl_last": round(report.loss_last, 4),
                      "ppl": round(perplexity(student, evals), 3)})
                del student


if __name__ == "__main__":
    main()
