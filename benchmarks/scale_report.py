"""Print the whole-model scale runs against the issue's targets, and the rank-death run.

    python benchmarks/scale_report.py [results/h200_scale_full.jsonl [results/h200_rank_death.jsonl]]

Reads the JSON lines that ``benchmarks/scale_suite.sh 3`` and ``4`` wrote (``prune_speed.py``
and ``rank_death.py``) and prints the figures docs/BENCHMARKS.md records: wall time, GPU peak
per rank, host peak (VmHWM) per rank, and whether the Llama-3-70B targets are met.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: Issue 11's targets for the whole 80-layer Llama-3-70B shape: seconds, GPU GB, host GB.
TARGETS = {1: (600.0, 80.0, 32.0), 2: (360.0, None, None)}
GB_PER_GIB = 2**30 / 1e9


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ok(value: float, limit: float | None) -> str:
    return "" if limit is None else (" ok" if value <= limit else " MISSED")


def main() -> None:
    runs = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "h200_scale_full.jsonl"
    deaths = Path(sys.argv[2]) if len(sys.argv) > 2 else RESULTS / "h200_rank_death.jsonl"
    for r in _lines(runs):
        if "label" not in r:
            continue
        gpu = [g * GB_PER_GIB for g in r["peak_gpu_GiB"]]
        host = [h * GB_PER_GIB for h in r.get("peak_host_GiB_per_rank", [r["peak_host_GiB"]])]
        print(f"{r['label']}: {r['layers_pruned']}/{r['num_layers']} layers on {r['gpus']} GPU(s) "
              f"({r['gpu']}, torch {r['torch']})")
        t_lim, g_lim, h_lim = TARGETS.get(r["gpus"], (None, None, None)) \
            if r["shape"] == "70b" and r["layers_pruned"] == 80 else (None, None, None)
        print(f"  wall {r['prune_s']:.1f} s = {r['prune_s'] / 60:.2f} min"
              f"{_ok(r['prune_s'], t_lim)} (pruner's own clock {r['pruner_s']:.1f} s; first layer "
              f"{r['first_layer_s']:.2f} s, then {r['per_layer_s_mean']:.3f} s a layer)")
        print("  GPU peak per rank: " + ", ".join(f"{g:.1f} GB" for g in gpu)
              + _ok(max(gpu), g_lim))
        print("  host peak (VmHWM) per rank: " + ", ".join(f"{h:.1f} GB" for h in host)
              + _ok(max(host), h_lim))
        print(f"  parameters {r['params_before'] / 1e9:.2f}B -> {r['params_after'] / 1e9:.2f}B; "
              f"host->GPU {r['transfer_GB']['bytes_in']:.0f} GB, back "
              f"{r['transfer_GB']['bytes_out']:.0f} GB")
    if deaths.exists():
        for d in _lines(deaths):
            if d.get("stage") != "resumed":
                continue
            print(f"rank death ({d['backend']}, {d['gpus']} ranks, {d['shape']} shape): rank 1 "
                  f"SIGKILLed after layer {d['kill_after_layer']}; the leader raised "
                  f"{d['error_type']} {d['kill_to_error_s']:.2f} s later: \"{d['error']}\"; "
                  f"helpers left {d['helpers_left']}; {d['layers_checkpointed']} layers "
                  f"checkpointed; the next run resumed from layer {d['resumed_from']} and "
                  f"finished {d['layers_done']} layers in {d['resume_run_s']:.1f} s")


if __name__ == "__main__":
    main()
