"""`slimgpt prune`: load, calibrate, prune, evaluate and export in one local run."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

from slimgpt_core.calibration import (
    BUNDLED_CALIBRATION,
    bundled_text,
    consecutive_windows,
    read_text_source,
    sample_windows,
)
from slimgpt_core.evaluate import perplexity
from slimgpt_core.pruner import ProgressEvent, PruneConfig, PruneResult, prune_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """Bad command-line input; reported without a traceback."""


def check_args(args: argparse.Namespace) -> str:
    """Validate argument combinations; returns the effective schedule (and fills the GQA
    policy's profile-dependent default)."""
    if not 0.0 < args.ratio <= 0.9:
        raise UsageError(f"--ratio must be in (0, 0.9], got {args.ratio}")
    schedule = args.schedule or ("uniform" if args.profile == "uniform" else "log")
    if args.gqa_policy is None:
        args.gqa_policy = "balanced" if args.profile == "uniform" else "free"
    if getattr(args, "heal", False) and args.heal_tokens < 1:
        raise UsageError("--heal-tokens must be >= 1")
    if args.profile == "uniform":
        if schedule != "uniform":
            raise UsageError("--profile uniform needs identical layers: use --schedule uniform")
        if args.gqa_policy == "free":
            raise UsageError("--gqa-policy free gives uneven head groups; it needs --profile "
                             "hetero")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder")
    if args.nsamples < 1 or args.seqlen < 2:
        raise UsageError("--nsamples must be >= 1 and --seqlen >= 2")
    return schedule


def _progress_bar(total: int) -> tuple[Any, Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="pruning", unit="layer", file=sys.stderr)

    def on_event(event: ProgressEvent) -> None:
        if event.phase == "layer_done":
            bar.update(1)
            bar.set_postfix(attn=f"{event.metrics['attn_error']:.3g}",
                            ffn=f"{event.metrics['ffn_error']:.3g}")
        elif event.phase == "resumed" and event.layer:
            bar.update(event.layer)

    return bar, on_event


def _summary(result: PruneResult, ppl: dict[str, float | None], out: Path) -> dict[str, Any]:
    return {
        "params_before": result.params_before,
        "params_after": result.params_after,
        "params_removed_ratio": round(1 - result.params_after / result.params_before, 4),
        "decoder_ratio": round(result.plan.achieved_ratio, 4),
        "perplexity_before": ppl.get("before"),
        "perplexity_after": ppl.get("after"),
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
        "output": str(out),
    }


def _heal(model: Any, teacher: Any, calib_text: str, tokenizer: Any, args: argparse.Namespace,
          device: torch.device) -> dict[str, Any]:
    from slimgpt_core.heal import HealConfig, heal

    count = max(1, min(4096, args.heal_tokens // args.seqlen))
    windows = sample_windows(calib_text, tokenizer, count, args.seqlen, args.seed + 1)
    print(f"healing: {args.heal_tokens:,} tokens ({args.heal_mode}) ...", file=sys.stderr)
    report = heal(model, teacher.to(device), windows,
                  HealConfig(tokens=args.heal_tokens, mode=args.heal_mode, seed=args.seed),
                  device=device)
    return {"mode": report.mode, "steps": report.steps, "tokens": report.tokens,
            "seconds": round(report.seconds, 2), "kl_first": round(report.loss_first, 5),
            "kl_last": round(report.loss_last, 5)}


def run_prune(args: argparse.Namespace) -> int:
    from slimgpt_core.export import describe_calibration, export_pruned
    from slimgpt_core.loading import load_base_model

    try:
        schedule = check_args(args)
    except UsageError as err:
        print(f"slimgpt prune: error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)

    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer, source = load_base_model(args.model, revision=args.revision, dtype=dtype)
    model.to(device)
    calib_text = read_text_source(args.calib) if args.calib else bundled_text(BUNDLED_CALIBRATION)
    calib = sample_windows(calib_text, tokenizer, args.nsamples, args.seqlen, args.seed)
    eval_windows = None
    if args.eval_file:
        eval_windows = consecutive_windows(read_text_source(args.eval_file), tokenizer,
                                           args.seqlen, args.eval_windows)
    ppl: dict[str, float | None] = {"before": None, "after": None}
    if eval_windows is not None:
        ppl["before"] = perplexity(model, eval_windows, device=device)
        print(f"perplexity before: {ppl['before']:.3f}", file=sys.stderr)

    options = {k: getattr(args, k) for k in ("target", "local_search", "allocation")
               if getattr(args, k, None) is not None}
    teacher = copy.deepcopy(model) if args.heal else None
    config = PruneConfig(
        **options,
        target_ratio=args.ratio, schedule=schedule, alpha=args.alpha,
        gqa_policy=args.gqa_policy, head_ratio=args.head_ratio, ffn_ratio=args.ffn_ratio,
        percdamp=args.percdamp, min_group=args.min_group, batch_size=args.batch_size,
        device=str(device), offload_activations=args.offload_activations,
        checkpoint_dir=args.checkpoint_dir, seed=args.seed,
        plain_heads=args.profile == "uniform",
    )
    bar, on_event = _progress_bar(model.config.num_hidden_layers)
    try:
        result = prune_model(model, calib, config, progress=on_event)
    finally:
        bar.close()
    heal_report = None
    if teacher is not None:
        heal_report = _heal(model, teacher, calib_text, tokenizer, args, device)
        del teacher
    if eval_windows is not None:
        ppl["after"] = perplexity(model, eval_windows, device=device)

    calibration_info = describe_calibration(
        calib, source=args.calib or f"bundled:{BUNDLED_CALIBRATION}", seed=args.seed)
    eval_metrics = None
    if eval_windows is not None:
        eval_metrics = {"ppl_before": ppl["before"], "ppl_after": ppl["after"],
                        "dataset": args.eval_file, "tokens": int(eval_windows.numel())}
    out = Path(args.out)
    report = export_pruned(
        result, out, tokenizer=tokenizer, profile=args.profile,
        base_model_id=source.get("base_model_id") or args.model,
        base_revision=source.get("revision"), calibration_info=calibration_info,
        eval_metrics=eval_metrics, verify=not args.no_verify, license=source.get("license"),
    )
    if report.verification is not None:
        print(f"verified: reloaded in a fresh process, max logit difference "
              f"{report.verification.get('max_abs_diff')}", file=sys.stderr)
    summary = _summary(result, ppl, out)
    if heal_report is not None:
        summary["heal"] = heal_report
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"parameters: {summary['params_before']:,} -> {summary['params_after']:,} "
              f"({summary['params_removed_ratio']:.1%} removed; decoder layers "
              f"{summary['decoder_ratio']:.1%})")
        if ppl["before"] is not None:
            print(f"perplexity: {ppl['before']:.3f} -> {ppl['after']:.3f}")
        print(f"pruning time: {summary['seconds'].get('total', 0):.1f} s")
        print(f"pruned model: {out}")
    return 0
