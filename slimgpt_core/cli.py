"""`slimgpt prune`: load, calibrate, prune, evaluate and export in one local run."""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch

from slimgpt_core.availability import unavailable
from slimgpt_core.calibration import (
    BUNDLED_CALIBRATION,
    bundled_text,
    consecutive_windows,
    read_text_source,
    sample_windows,
)
from slimgpt_core.errors import SettingUnavailableError
from slimgpt_core.evaluate import perplexity
from slimgpt_core.families import family_for_config
from slimgpt_core.presets import DEFAULT_PRESET, estimate_notes, preset_settings
from slimgpt_core.pruner import (
    ProgressEvent,
    PruneConfig,
    PruneResult,
    check_settings,
    prune_model,
)
from slimgpt_core.schedule import default_gqa_policy

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
        args.gqa_policy = default_gqa_policy(plain_heads=args.profile == "uniform")
    if args.profile == "uniform":
        if schedule != "uniform":
            raise UsageError("--profile uniform needs identical layers: use --schedule uniform")
        if args.gqa_policy == "free":
            raise UsageError("--gqa-policy free gives uneven head groups; it needs --profile "
                             "hetero")
    if args.nsamples < 1 or args.seqlen < 2:
        raise UsageError("--nsamples must be >= 1 and --seqlen >= 2")
    if args.gpus < 1:
        raise UsageError("--gpus must be >= 1")
    if args.dry_run:
        return schedule
    if not args.out:
        raise UsageError("--out is required (unless --dry-run)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty folder")
    if getattr(args, "heal", False) and (args.stream or args.gpus > 1):
        raise UsageError("--heal needs the whole model in memory: drop --stream/--gpus")
    why = unavailable(prune_settings(args), None, placement="stream" if args.stream else None,
                      world_size=args.gpus)
    if why is not None:
        raise UsageError(why)
    if (args.stream or args.gpus > 1) and args.model.lower().endswith(".gguf"):
        raise UsageError("--stream/--gpus need safetensors weights; a .gguf file is "
                         "dequantized into memory (prune it without them)")
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
        elif event.phase in ("fisher", "allocation"):
            bar.write(event.message, file=sys.stderr)

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


def prune_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The algorithm options beyond the paper's: the ``--preset``'s, then each flag given
    (flags left unset keep the preset's or the library's defaults)."""
    options = preset_settings(getattr(args, "preset", None) or DEFAULT_PRESET)
    options.update({k: getattr(args, k) for k in ("target", "local_search", "allocation",
                                                  "selection", "fisher_windows",
                                                  "fisher_samples", "search_generations",
                                                  "expert_min_tokens")
                    if getattr(args, k, None) is not None})
    return options


def _prune_config(args: argparse.Namespace, schedule: str, device: torch.device) -> PruneConfig:
    return PruneConfig(
        **prune_settings(args),
        target_ratio=args.ratio, schedule=schedule, alpha=args.alpha,
        gqa_policy=args.gqa_policy, head_ratio=args.head_ratio, ffn_ratio=args.ffn_ratio,
        percdamp=args.percdamp, min_group=args.min_group, batch_size=args.batch_size,
        device=str(device), offload_activations=args.offload_activations,
        checkpoint_dir=args.checkpoint_dir, seed=args.seed,
        plain_heads=args.profile == "uniform",
    )


def _local_folder(ref: str, revision: str | None) -> Path | None:
    """The folder of ``ref`` (a local folder, or a Hub snapshot of its safetensors, config and
    tokenizer files); None for a .gguf file."""
    if ref.lower().endswith(".gguf"):
        return None
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    from slimgpt_core.streaming import SNAPSHOT_PATTERNS

    return Path(snapshot_download(ref, revision=revision, allow_patterns=SNAPSHOT_PATTERNS))


@functools.lru_cache(maxsize=4)
def _model_config(ref: str, revision: str | None) -> dict[str, Any]:
    # Cached (read-only for callers): a dry run with --calib-budget needs it twice, and a
    # Hub config is a download.
    from transformers import AutoConfig

    path = Path(ref).expanduser()
    if ref.lower().endswith(".gguf"):
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    return AutoConfig.from_pretrained(ref, revision=revision).to_dict()


def _local_gpu_type(device: torch.device | None) -> str | None:
    from slimgpt_core.costs import gpu_type_for

    if device is None or device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return gpu_type_for(props.name, props.total_memory / 1e9)


def apply_calib_budget(args: argparse.Namespace, schedule: str,
                       device: torch.device | None) -> None:
    """``--calib-budget``: set ``args.nsamples`` to the most windows whose predicted pruning
    time fits the budget on this GPU (``device`` None: a dry run, priced for an H200 unless a
    known GPU is here)."""
    from slimgpt_core.costs import REFERENCE_GPU, calibration_for_budget
    from slimgpt_core.schedule import ModelShape, make_plan

    if getattr(args, "calib_budget", None) is None:
        return
    here = _local_gpu_type(device if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
        else None))
    if here is None and device is not None:
        raise UsageError("--calib-budget predicts GPU time: it needs a CUDA device of a known "
                         "type (H200, H100, A100, L40S); use --nsamples here")
    gpu = here or REFERENCE_GPU
    shape = ModelShape.from_config(_model_config(args.model, args.revision))
    plan = make_plan(shape, args.ratio, schedule, args.gqa_policy, args.alpha, args.head_ratio,
                     args.ffn_ratio, args.profile == "uniform")
    try:
        args.nsamples = calibration_for_budget(shape, plan, args.calib_budget,
                                               seq_len=args.seqlen, batch_size=args.batch_size,
                                               gpu=gpu, gpus=args.gpus)
    except ValueError as err:
        raise UsageError(f"--calib-budget: {err}") from None
    print(f"calibration: {args.nsamples} windows of {args.seqlen} tokens fit the "
          f"{args.calib_budget:g} s budget on {args.gpus} x {gpu} (predicted)", file=sys.stderr)


def run_dry_run(args: argparse.Namespace, schedule: str) -> int:
    """The plan and the resources it needs, from the config alone."""
    from slimgpt_core.costs import Workload, estimate_table
    from slimgpt_core.schedule import ModelShape, make_plan
    from slimgpt_core.streaming import available_host_memory

    config = _model_config(args.model, args.revision)
    why = unavailable(prune_settings(args), family_for_config(config), world_size=args.gpus)
    if why is not None:
        print(f"slimgpt prune: error: {why}", file=sys.stderr)
        return 2
    shape = ModelShape.from_config(config)
    plan = make_plan(shape, args.ratio, schedule, args.gqa_policy, args.alpha, args.head_ratio,
                     args.ffn_ratio, args.profile == "uniform")
    notes = estimate_notes(getattr(args, "preset", None) or DEFAULT_PRESET)
    host = args.host_memory_gb or (available_host_memory() / 1e9 or None)
    counts = tuple(sorted({1, 2, 4, 8, args.gpus}))
    table = estimate_table(shape, plan, Workload(args.nsamples, args.seqlen, args.batch_size),
                           gpu_counts=counts, host_memory_gb=host)
    doc = {"plan": plan.to_dict(), "host_memory_gb": host, "calibration_windows": args.nsamples,
           "estimates": table, "notes": notes}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{args.model}: {plan.total_params_before:,} -> {plan.total_params_after:,} "
          f"parameters ({plan.achieved_ratio:.1%} of the decoder layers removed)")
    print(f"{'GPU':10s} {'n':>2s} {'placement':9s} {'GPU GB':>7s} {'host GB':>8s} "
          f"{'disk GB':>8s} {'time':>9s}  fits")
    for e in table:
        err = f"±{e['predicted_error']:.0%}"
        fits = "yes" if e["fits"] else "no: " + "; ".join(e["reasons"])
        measured = "" if e["measured_gpu_type"] else " (scaled from H200)"
        print(f"{e['gpu_type']:10s} {e['gpus']:2d} {e['placement']:9s} {e['peak_gpu_gb']:7.1f} "
              f"{e['peak_host_gb']:8.1f} {e['output_disk_gb']:8.1f} "
              f"{e['predicted_s'] / 60:6.1f}min {err}{measured}  {fits}")
    for note in notes:
        print(f"note: {note}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    from slimgpt_core.loading import load_base_model

    try:
        schedule = check_args(args)
    except UsageError as err:
        print(f"slimgpt prune: error: {err}", file=sys.stderr)
        return 2
    device = None if args.dry_run else torch.device(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        apply_calib_budget(args, schedule, device)
    except UsageError as err:
        print(f"slimgpt prune: error: {err}", file=sys.stderr)
        return 2
    if device is None:
        return run_dry_run(args, schedule)
    dtype = _DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)

    folder = _local_folder(args.model, args.revision)
    if folder is not None:
        from slimgpt_core.streaming import should_stream

        if args.stream or args.gpus > 1 or should_stream(folder, dtype,
                                                          _host_bytes(args.host_memory_gb)):
            return run_streamed(args, schedule, folder, device, dtype)

    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer, source = load_base_model(args.model, revision=args.revision, dtype=dtype)
    config = _prune_config(args, schedule, device)
    try:  # before calibration and evaluation: their time would be lost
        check_settings(model, config)
    except SettingUnavailableError as err:
        print(f"slimgpt prune: error: {err}", file=sys.stderr)
        return 2
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

    teacher = copy.deepcopy(model) if getattr(args, "heal", False) else None
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
    return _export_and_report(args, result, tokenizer, source, calib, ppl, eval_windows,
                              heal_report=heal_report)


def _heal(model: Any, teacher: Any, calib_text: str, tokenizer: Any, args: argparse.Namespace,
          device: torch.device) -> dict[str, Any]:
    """Distil ``teacher`` into ``model`` on fresh windows of the calibration text; returns the
    report, with the settings the recipe records under ``settings``."""
    from slimgpt_core.heal import HealConfig, heal, heal_settings

    count = max(1, min(4096, args.heal_tokens // args.seqlen))
    windows = sample_windows(calib_text, tokenizer, count, args.seqlen, args.seed + 1)
    print(f"healing: {args.heal_tokens:,} tokens ({args.heal_mode}) ...", file=sys.stderr)
    model.to(device)
    config = HealConfig(tokens=args.heal_tokens, mode=args.heal_mode, seed=args.seed)
    report = heal(model, teacher.to(device), windows, config, device=device)
    return {"mode": report.mode, "steps": report.steps, "tokens": report.tokens,
            "seconds": round(report.seconds, 2), "kl_first": round(report.loss_first, 5),
            "kl_last": round(report.loss_last, 5),
            "settings": heal_settings(config, windows=count, window_seed=args.seed + 1,
                                      seqlen=args.seqlen)}


def _host_bytes(gb: float | None) -> int | None:
    return int(gb * 1e9) if gb else None


def run_streamed(args: argparse.Namespace, schedule: str, folder: Path, device: torch.device,
                 dtype: torch.dtype) -> int:
    """Prune layer by layer from ``folder``'s shards (on ``--gpus`` GPUs) into ``--out``."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from slimgpt_core.errors import RankFailed
    from slimgpt_core.loading import folder_source_info
    from slimgpt_core.multi_gpu import prune_streamed
    from slimgpt_core.pruner import Probe
    from slimgpt_core.streaming import logits_from_hidden, open_streamed, perplexity_from_hidden
    from slimgpt_core.verify import default_windows

    print(f"streaming {args.model} from {folder} ({args.gpus} GPU(s)) ...", file=sys.stderr)
    streamed = open_streamed(folder, dtype)
    try:
        check_settings(streamed.model, _prune_config(args, schedule, device), streamed=True,
                       world_size=args.gpus)
    except SettingUnavailableError as err:
        print(f"slimgpt prune: error: {err} (this model is pruned streamed from its shards)",
              file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(folder)
    source = folder_source_info(folder, args.revision, hub_id=None if Path(args.model).is_dir()
                                else args.model)
    calib_text = read_text_source(args.calib) if args.calib else bundled_text(BUNDLED_CALIBRATION)
    calib = sample_windows(calib_text, tokenizer, args.nsamples, args.seqlen, args.seed)
    verify_ids = default_windows(streamed.model.config.vocab_size)
    probes = {"verify": Probe(verify_ids)}
    eval_windows = None
    if args.eval_file:
        eval_windows = consecutive_windows(read_text_source(args.eval_file), tokenizer,
                                           args.seqlen, args.eval_windows)
        probes["eval_before"] = Probe(eval_windows, dense=True)
        probes["eval_after"] = Probe(eval_windows)
    config = _prune_config(args, schedule, device)
    own_ckpt = config.checkpoint_dir is None
    out = Path(args.out)
    if own_ckpt:  # the pruned layers' files become the output shards (hard links)
        out.parent.mkdir(parents=True, exist_ok=True)
        config.checkpoint_dir = tempfile.mkdtemp(prefix=f".{out.name}.layers-", dir=out.parent)
    bar, on_event = _progress_bar(streamed.model.config.num_hidden_layers)
    try:
        result = prune_streamed(streamed, calib, config, gpus=args.gpus,
                                work_dir=Path(config.checkpoint_dir) / "ranks",
                                dtype=str(dtype).removeprefix("torch."), progress=on_event,
                                probes=probes)
    except RankFailed as err:
        print(f"slimgpt prune: error: {err}\nthe finished layers are checkpointed in "
              f"{config.checkpoint_dir}: run the same command with --checkpoint-dir "
              f"{config.checkpoint_dir} to resume after them", file=sys.stderr)
        return 1
    finally:
        bar.close()
    ppl: dict[str, float | None] = {"before": None, "after": None}
    if eval_windows is not None:
        ppl["before"] = perplexity_from_hidden(streamed.model, result.probe_outputs["eval_before"],
                                               eval_windows, device)
        ppl["after"] = perplexity_from_hidden(streamed.model, result.probe_outputs["eval_after"],
                                              eval_windows, device)
    verify_logits = logits_from_hidden(streamed.model, result.probe_outputs["verify"], device)
    code = _export_and_report(args, result, tokenizer, source, calib, ppl, eval_windows,
                              verify_ids=verify_ids, verify_logits=verify_logits)
    if own_ckpt:
        shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
    return code


def _export_and_report(args: argparse.Namespace, result: PruneResult, tokenizer: Any,
                       source: dict[str, Any], calib: torch.Tensor,
                       ppl: dict[str, float | None], eval_windows: torch.Tensor | None,
                       heal_report: dict[str, Any] | None = None, **verify: Any) -> int:
    from slimgpt_core.export import describe_calibration, export_pruned

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
        heal=(heal_report or {}).get("settings"), **verify,
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
        seconds = summary["seconds"]
        # "total" times the layers; the whole-model passes before them are added here
        before = {k: seconds[k] for k in ("fisher", "allocation") if seconds.get(k)}
        whole = seconds.get("total", 0) + sum(before.values())
        print(f"pruning time: {whole:.1f} s" + (" (of it " + ", ".join(
            f"{k} {v:.1f} s" for k, v in before.items()) + ")" if before else ""))
        print(f"pruned model: {out}")
    return 0
