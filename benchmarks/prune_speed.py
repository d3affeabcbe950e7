"""Pruning speed and peak memory (GPU and host) on LLaMA-shaped models with random weights.

Placements (``--placement``):
  resident   the whole model on the GPU
  host       the model in host memory, one layer at a time on the GPU (prefetched)
  disk       streamed from a sharded safetensors folder (``--model``, made by ``--write``)
  generated  streamed from weights made when each layer is reached (70B: no disk holds it)

    python benchmarks/prune_speed.py --shape 7b --placement resident
    python benchmarks/prune_speed.py --shape 7b --placement host [--no-prefetch]
    python benchmarks/prune_speed.py --shape 13b --write /tmp/m13     # make the checkpoint
    python benchmarks/prune_speed.py --placement disk --model /tmp/m13
    python benchmarks/prune_speed.py --shape 70b --placement generated [--stop-after 8] [--gpus 2]
    python benchmarks/prune_speed.py --shape tiny --placement host --device cpu --nsamples 4 --seqlen 128
    python benchmarks/prune_speed.py --shape 7b --placement resident --allocation sensitivity --target dense

Prints one JSON line: per-phase seconds, per-layer wall seconds, peak GPU memory (torch's
allocator high-water mark, per rank) and peak host memory (VmHWM of the pruning process).
Disk and generated placements write nothing to keep (pruned layers are copied back to host
memory and dropped), so the figures include the device-to-host traffic but no disk writes.

``--gpus N`` (disk and generated placements) runs the job through the library's own launcher,
:func:`slimgpt_core.multi_gpu.prune_streamed`, as the worker does: this process leads and
starts N-1 helper ranks (NCCL on GPUs, gloo on CPU); ``prune_s`` then includes starting them.
``--trace FILE`` appends one JSON line per finished layer (seconds, memory so far), so a run
stopped at a time limit still leaves its figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import (
    SHAPES,
    dump,
    host_peak_bytes,
    open_generated,
    random_model,
    write_checkpoint,
)

from slimgpt_core.pruner import PruneConfig, prune_model


def _drop(_index: int, _tensors: dict, report: dict) -> None:
    """Pruned layers of a benchmark are not kept."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=SHAPES, default="7b")
    ap.add_argument("--placement", choices=["resident", "host", "disk", "generated"],
                    default="host")
    ap.add_argument("--model", type=Path, help="checkpoint folder for --placement disk")
    ap.add_argument("--write", type=Path, help="write a random checkpoint of --shape and exit")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--min-group", type=int, default=64)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--stop-after", type=int, default=None, help="prune only the first N layers")
    ap.add_argument("--no-prefetch", action="store_true")
    # Spelled out so a run measures the same thing whatever PruneConfig's defaults are.
    ap.add_argument("--allocation", choices=["schedule", "sensitivity"], default="schedule")
    ap.add_argument("--target", choices=["layer", "dense"], default="layer")
    ap.add_argument("--selection", choices=["output", "fisher"], default="output")
    ap.add_argument("--fisher-windows", type=int, default=None)
    ap.add_argument("--fisher-samples", type=int, default=0)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON line to this file")
    ap.add_argument("--trace", type=Path, default=None, help="append a line per finished layer")
    args = ap.parse_args()

    if args.write:
        info = write_checkpoint(args.shape, args.write)
        dump({"wrote": str(args.write), "shape": args.shape, **info}, args.out)
        return

    if args.gpus > 1 and args.placement not in ("disk", "generated"):
        ap.error("--gpus > 1 streams the model: use --placement disk or generated")
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32

    t0 = time.perf_counter()
    streamed = None
    shape_name = args.shape
    if args.placement in ("resident", "host"):
        model = random_model(args.shape, dtype)
    elif args.placement == "disk":
        from slimgpt_core.streaming import open_streamed

        streamed = open_streamed(args.model, dtype)
        shape_name = f"{args.model.name}"
    else:
        streamed = open_generated(args.shape, dtype)
    if streamed is not None:
        model = streamed.model
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(1))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    config = PruneConfig(target_ratio=args.ratio, batch_size=args.batch_size, device=args.device,
                         min_group=args.min_group, resident=args.placement == "resident",
                         prefetch=not args.no_prefetch, stop_after=args.stop_after,
                         allocation=args.allocation, target=args.target,
                         selection=args.selection, fisher_windows=args.fisher_windows,
                         fisher_samples=args.fisher_samples)
    stamps: list[float] = []
    wall0 = time.perf_counter()

    def progress(ev) -> None:
        if ev.phase == "layer_done":
            stamps.append(ev.elapsed_s)
            if args.trace is not None:
                with args.trace.open("a") as fh:
                    fh.write(json.dumps({
                        "label": args.label, "layer": ev.layer, "pruner_s": round(ev.elapsed_s, 2),
                        "wall_s": round(time.perf_counter() - wall0, 2),
                        "peak_gpu_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                        if cuda else None,
                        "peak_host_GiB": round(host_peak_bytes() / 2**30, 2)}) + "\n")

    work = tempfile.mkdtemp(prefix="prune-speed-")
    t0 = time.perf_counter()
    if args.gpus > 1:
        from slimgpt_core.multi_gpu import prune_streamed, rank_stats

        result = prune_streamed(
            streamed, ids, config, gpus=args.gpus, work_dir=work, progress=progress,
            on_layer=_drop, dtype=str(dtype).removeprefix("torch."),
            opener="synthetic:open_generated" if args.placement == "generated" else None,
            pythonpath=[str(Path(__file__).resolve().parent)])
    else:
        result = prune_model(model, ids, config, progress=progress,
                             source=streamed.source if streamed is not None else None,
                             on_layer=_drop if streamed is not None else None)
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    helpers = rank_stats(work) if args.gpus > 1 else []
    peaks = [torch.cuda.max_memory_allocated() / 2**30 if cuda else None]
    peaks += [None if h["peak_gpu_bytes"] is None else h["peak_gpu_bytes"] / 2**30
              for h in helpers]
    host_peaks = [host_peak_bytes() / 2**30] + [h["peak_host_bytes"] / 2**30 for h in helpers]
    layers_done = len(result.layers)
    per_layer = [round(b - a, 3) for a, b in zip([0.0, *stamps[:-1]], stamps)]
    dump({
        "label": args.label, "shape": shape_name, "placement": args.placement,
        "gpus": args.gpus, "prefetch": not args.no_prefetch, "ratio": args.ratio,
        "allocation": args.allocation, "target": args.target,
        "selection": args.selection, "fisher_windows": args.fisher_windows,
        "fisher_samples": args.fisher_samples,
        "windows": args.nsamples, "seqlen": args.seqlen, "device": args.device,
        "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
        "layers_pruned": layers_done, "num_layers": model.config.num_hidden_layers,
        "build_model_s": round(build_s, 1), "prune_s": round(total, 2),
        "per_layer_s_mean": round(sum(per_layer[1:]) / max(1, len(per_layer) - 1), 3)
        if len(per_layer) > 1 else None,
        "first_layer_s": per_layer[0] if per_layer else None,
        "phases_s": {k: round(v, 2) for k, v in result.seconds.items()},
        "peak_gpu_GiB": [None if p is None else round(p, 2) for p in peaks],
        "peak_host_GiB": round(host_peaks[0], 2),
        "peak_host_GiB_per_rank": [round(h, 2) for h in host_peaks],
        "pruner_s": round(result.seconds.get("total", 0.0), 2),
        "transfer_GB": {k: round(v / 1e9, 2) for k, v in result.transfer.items()},
        "params_before": result.params_before, "params_after": result.params_after,
        "per_layer_s": per_layer,
        "per_layer_phases_s": {
            phase: [round(r.seconds.get(phase, 0.0), 3) for r in result.layers]
            for phase in ("attn_pass", "ffn_pass", "heads", "ffn", "output_pass",
                          "hessian_finalize")
        },
        # open_generated holds the LM head in host memory as a checkpoint's would be (runs
        # recorded before 2026-11-30 had none).
        "lm_head_in_host": True,
        "generated_s": round(getattr(getattr(streamed, "source", None), "seconds", 0.0), 1),
    }, args.out)


if __name__ == "__main__":
    main()
