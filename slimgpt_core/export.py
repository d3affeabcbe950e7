"""Write a pruned model as a Hugging Face folder that standard tools load, and prove it loads.

Two profiles (see DESIGN.md, "Artifacts"):

* ``hetero`` (default): exact per-layer widths. ``config.json`` is a ``slimgpt_<base>`` config
  with the per-layer lists, the family's layout and an ``auto_map`` to ``modeling_slimgpt.py``,
  which is copied into the folder; ``AutoModelForCausalLM.from_pretrained(folder,
  trust_remote_code=True)`` loads it (format: docs/HETERO_FORMAT.md).
* ``uniform``: every layer has the same widths and the standard grouped-query layout; the folder
  is a plain checkpoint of the family's stock class (``LlamaForCausalLM``, ``Qwen3ForCausalLM``,
  ``Phi3ForCausalLM`` with its fused matrices, ...) with an explicit ``head_dim``, loadable
  without remote code.

Weights are sharded safetensors written by ``save_pretrained``; their keys are those of the
standard architecture. Never pickles.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import slimgpt_core
from slimgpt_core import modeling_slimgpt
from slimgpt_core.families import Family, all_families, family_for_config
from slimgpt_core.model_card import (
    CHART_FILE,
    plot_layer_widths,
    pruning_recipe,
    render_model_card,
)
from slimgpt_core.verify import ExportVerificationError, default_windows, verify_export

__all__ = [
    "PROFILES",
    "ExportError",
    "ExportReport",
    "ExportVerificationError",
    "describe_calibration",
    "export_config",
    "export_pruned",
    "layer_widths",
]

PROFILES: tuple[str, ...] = ("hetero", "uniform")
#: base ``model_type`` -> the standard transformers class a ``uniform`` export names.
STANDARD_ARCHITECTURES: dict[str, str] = {
    model_type: family.stock_model for family in all_families() for model_type in family.model_types
}
MODELING_FILE = "modeling_slimgpt.py"
PRUNING_CONFIG_FILE = "pruning_config.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Keys of a base config that describe the checkpoint rather than the architecture.
_DROP_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path",
              "torch_dtype", "dtype", *modeling_slimgpt._PER_LAYER_KEYS,
              modeling_slimgpt.LAYOUT_KEY)


class ExportError(ValueError):
    """The pruned model cannot be written in the requested profile."""


@dataclass
class ExportReport:
    out_dir: Path
    profile: str
    files: list[str]
    params_before: int
    params_after: int
    achieved_ratio: float
    verification: dict[str, Any] | None
    pruning_config: dict[str, Any] = field(repr=False)
    seconds: float = 0.0


# -- widths ---------------------------------------------------------------------------------
def _layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ExportError(f"{type(model).__name__} is not a decoder-only causal LM "
                          "(expected model.model.layers)")
    return layers


def layer_widths(model: nn.Module) -> list[dict[str, Any]]:
    """Per layer, the widths the modules really have: ``num_heads``, ``num_kv_heads``,
    ``intermediate_size`` and ``kv_index`` (None for the standard grouped layout)."""
    family = _family(model)
    out = []
    for layer in _layers(model):
        attn = layer.self_attn
        heads, kv, channels = family.widths(layer)
        kv_index = getattr(attn, "kv_index_list", None)
        if kv_index is not None:
            kv_index = list(kv_index)
            if modeling_slimgpt.regular_groups(kv_index, kv) is not None:
                kv_index = None
        out.append({"num_heads": heads, "num_kv_heads": kv,
                    "intermediate_size": channels, "kv_index": kv_index})
    return out


def _family(model: nn.Module) -> Family:
    try:
        return family_for_config(model.config, allow_hetero=True)
    except ValueError as err:
        raise ExportError(f"cannot export: {err}") from None


def _base_type(config: Any) -> str:
    return str(getattr(config, "model_type", "")).removeprefix("slimgpt_")


def _head_dim(model: nn.Module) -> int:
    return int(_layers(model)[0].self_attn.head_dim)


def _base_config_dict(model: nn.Module) -> dict[str, Any]:
    d = model.config.to_dict()
    for key in _DROP_KEYS:
        d.pop(key, None)
    quant = d.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "gguf":
        # A GGUF source is dequantized on load and saved as plain floats; keeping its
        # quantization_config would make vLLM and transformers expect GGUF weights.
        d.pop("quantization_config")
    d["head_dim"] = _head_dim(model)
    return d


def _dtype_name(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def export_config(model: nn.Module, profile: str = "hetero") -> Any:
    """The ``config.json`` object for ``model`` (pruned in place) in ``profile``."""
    if profile not in PROFILES:
        raise ExportError(f"unknown export profile {profile!r}; choose one of {PROFILES}")
    family = _family(model)
    base = _base_type(model.config)
    widths = layer_widths(model)
    d = _base_config_dict(model)
    if profile == "uniform":
        distinct = {(w["num_heads"], w["num_kv_heads"], w["intermediate_size"]) for w in widths}
        if len(distinct) > 1:
            shown = ", ".join(f"layer {i}: {w['num_heads']} heads/{w['num_kv_heads']} KV heads/"
                              f"{w['intermediate_size']} channels"
                              for i, w in enumerate(widths[:4]))
            raise ExportError(
                "profile 'uniform' needs the same widths in every layer, but they differ "
                f"({shown}{', ...' if len(widths) > 4 else ''}). Prune with "
                "PruneConfig(schedule='uniform') for a uniform export, or export with "
                "profile='hetero'."
            )
        irregular = [i for i, w in enumerate(widths) if w["kv_index"] is not None]
        if irregular:
            raise ExportError(
                f"profile 'uniform' needs the standard grouped-query layout, but layers "
                f"{irregular} map query heads onto KV heads irregularly (gqa_policy 'free'). "
                "Prune with gqa_policy='balanced' or 'group' (and schedule='uniform'), or "
                "export with profile='hetero'."
            )
        w = widths[0]
        if family.heads_divide_hidden and d["hidden_size"] % w["num_heads"]:
            raise ExportError(
                f"profile 'uniform': transformers only accepts a plain {base} config whose "
                f"hidden_size ({d['hidden_size']}) is a multiple of the number of heads "
                f"({w['num_heads']}). Prune with PruneConfig(plain_heads=True) (the CLI's "
                "--profile uniform does), or export with profile='hetero'."
            )
        d.update({"num_attention_heads": w["num_heads"], "num_key_value_heads": w["num_kv_heads"],
                  family.ffn_width_key: w["intermediate_size"]})
        from transformers import CONFIG_MAPPING

        config = CONFIG_MAPPING[base](**d)
        config.architectures = [family.stock_model]
    else:
        config_cls = modeling_slimgpt.hetero_class(family.stock_config)
        model_cls = modeling_slimgpt.hetero_class(family.stock_model)
        d[modeling_slimgpt.LAYOUT_KEY] = {
            "family": family.name, "base_model_type": base,
            "base_architecture": family.stock_model, **family.layout.as_dict(),
        }
        d.update(
            layer_num_heads=[w["num_heads"] for w in widths],
            layer_num_kv_heads=[w["num_kv_heads"] for w in widths],
            layer_intermediate_sizes=[w["intermediate_size"] for w in widths],
        )
        if any(w["kv_index"] is not None for w in widths):
            d["layer_kv_index"] = [
                w["kv_index"] if w["kv_index"] is not None else
                [j // (w["num_heads"] // w["num_kv_heads"]) for j in range(w["num_heads"])]
                for w in widths
            ]
        config = config_cls(**d)
        config.architectures = [model_cls.__name__]
        stem = MODELING_FILE.removesuffix(".py")
        config.auto_map = {"AutoConfig": f"{stem}.{config_cls.__name__}",
                           "AutoModelForCausalLM": f"{stem}.{model_cls.__name__}"}
    config.dtype = _dtype_name(model)
    return config


# -- calibration & provenance ---------------------------------------------------------------
def describe_calibration(input_ids: torch.Tensor, *, source: str, dataset: str | None = None,
                         seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """The ``calibration_info`` of :func:`export_pruned` for calibration windows ``input_ids``:
    source, Hub dataset id, windows, window length, seed and the sha256 of the token ids."""
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    return {
        "source": source,
        "dataset": dataset,
        "num_samples": int(ids.shape[0]),
        "seqlen": int(ids.shape[1]) if ids.dim() > 1 else None,
        "seed": seed,
        "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        **extra,
    }


def _compute_dtype(model: nn.Module) -> str | None:
    """The dtype the layers were pruned in (the pruner works in the model's own dtype)."""
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return None


def _versions() -> dict[str, str]:
    import huggingface_hub
    import safetensors
    import transformers

    return {"slimgpt_core": slimgpt_core.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "huggingface_hub": huggingface_hub.__version__,
            "python": platform.python_version()}


def _shape_params(plan: Any, widths: list[dict[str, Any]]) -> tuple[int, int]:
    shape = plan.shape
    before = shape.num_layers * shape.dense_layer_params
    after = sum(shape.layer_params(w["num_heads"], w["num_kv_heads"], w["intermediate_size"])
                for w in widths)
    return before, after


def _pruning_config(result: Any, widths: list[dict[str, Any]], profile: str,
                    base_model_id: str, base_revision: str | None, license: str,
                    calibration_info: dict[str, Any], eval_metrics: dict[str, Any] | None,
                    architecture: str) -> dict[str, Any]:
    plan = result.plan
    shape = plan.shape
    decoder_before, decoder_after = _shape_params(plan, widths)
    reports = {r.index: r for r in result.layers}
    layers = []
    for i, w in enumerate(widths):
        r = reports.get(i)
        entry: dict[str, Any] = {
            "index": i,
            "ratio": plan.layer_ratios[i] if i < len(plan.layer_ratios) else None,
            "num_heads": w["num_heads"], "num_kv_heads": w["num_kv_heads"],
            "intermediate_size": w["intermediate_size"],
        }
        if r is not None:
            entry.update(heads_kept=list(r.heads_kept), kv_heads_kept=list(r.kv_heads_kept),
                         kv_index=list(r.kv_index), channels_kept=list(r.channels_kept),
                         attn_error=r.attn_error, ffn_error=r.ffn_error,
                         attn_error_uncompensated=r.attn_error_uncompensated,
                         ffn_error_uncompensated=r.ffn_error_uncompensated)
            if r.expert_channels_kept is not None:
                entry.update(expert_channels_kept=[list(c) for c in r.expert_channels_kept],
                             expert_tokens=list(r.expert_tokens or []),
                             expert_pooled_share=list(r.expert_pooled_share or []))
        layers.append(entry)
    return {
        "method": "slimgpt",
        "paper": "arXiv:2412.18110",
        "library": "slimgpt_core",
        "library_version": slimgpt_core.__version__,
        "profile": profile,
        "architecture": architecture,
        "base_model": {"id": base_model_id, "revision": base_revision,
                       "model_type": shape.model_type, "license": license},
        "target_ratio": plan.target_ratio,
        "achieved_ratio": round(1.0 - decoder_after / decoder_before, 6),
        "achieved_ratio_total": round(1.0 - result.params_after / result.params_before, 6),
        "params_before": result.params_before,
        "params_after": result.params_after,
        "decoder_params_before": decoder_before,
        "decoder_params_after": decoder_after,
        "schedule": plan.schedule,
        "gqa_policy": plan.gqa_policy,
        "settings": dict(getattr(result, "settings", {}) or {}),
        "layer_ratios": list(plan.layer_ratios),
        "r_first": plan.r_first,
        "r_last": plan.r_last,
        "dense": {"num_layers": shape.num_layers, "hidden_size": shape.hidden_size,
                  "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
                  "head_dim": shape.head_dim, "intermediate_size": shape.intermediate_size,
                  **({"num_experts": shape.num_experts} if shape.num_experts else {})},
        "layers": layers,
        "calibration": dict(calibration_info),
        "evaluation": dict(eval_metrics) if eval_metrics else None,
        "prune_seconds": dict(result.seconds),
        **({"allocation_search": dict(result.allocation_search)}
           if getattr(result, "allocation_search", None) else {}),
        "versions": _versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "verification": None,
    }


# -- writing --------------------------------------------------------------------------------
def _save_weights(model: nn.Module, folder: Path, max_shard_size: str | int) -> None:
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # older transformers; 5.x writes safetensors only
    # save_pretrained stamps architectures/dtype onto the live config; put them back after.
    saved = {k: model.config.__dict__.get(k) for k in ("architectures",)}
    try:
        model.save_pretrained(folder, **kwargs)
    finally:
        for k, v in saved.items():
            setattr(model.config, k, v)


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _link_or_copy(src: Path, dst: Path) -> None:
    # A hard link costs nothing and keeps the checkpoint for a retry of the export; across
    # file systems fall back to a copy.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _save_streamed_weights(result: Any, folder: Path, max_shard_size: str | int) -> None:
    """Shards of a streamed result: what lies outside the decoder layers (held by the
    skeleton) in shards of at most ``max_shard_size``, then one shard per pruned layer, the
    very files the pruner wrote (hard-linked), and the index over all of them."""
    from safetensors.torch import save_file

    from slimgpt_core.layer_io import layers_prefix
    from slimgpt_core.shards import group_by_size, shard_name, write_index

    model = result.model
    prefix = layers_prefix(model) + "."
    outside: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(prefix) or id(tensor) in seen:
            continue  # layers come from their files; a tied alias is stored once
        seen.add(id(tensor))
        if tensor.is_meta:
            raise ExportError(f"{name} was never loaded (still on the meta device)")
        outside[name] = tensor.detach()
    if len(result.layer_files) != len(_layers(model)):
        raise ExportError(f"the streamed result has {len(result.layer_files)} layer files for "
                          f"{len(_layers(model))} layers")
    groups = group_by_size({k: v.numel() * v.element_size() for k, v in outside.items()},
                           _parse_size(max_shard_size))
    total = len(groups) + len(result.layer_files)
    files = []
    for n, names in enumerate(groups, start=1):
        path = folder / shard_name(n, total)
        save_file({k: outside[k].contiguous().cpu() for k in names}, str(path),
                  metadata={"format": "pt"})
        files.append(path)
    for n, src in enumerate(result.layer_files, start=len(groups) + 1):
        path = folder / shard_name(n, total)
        _link_or_copy(Path(src), path)
        files.append(path)
    write_index(folder, files)


def _write_generation_config(model: nn.Module, folder: Path) -> None:
    if (folder / "generation_config.json").exists():
        return
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(
        model.config)
    gen.save_pretrained(folder)


def _check_no_pickles(folder: Path) -> None:
    bad = [p.name for p in folder.rglob("*") if p.suffix in _PICKLE_SUFFIXES]
    if bad:
        raise ExportError(f"export wrote pickle-format files {bad}; only safetensors may ship")
    if not list(folder.glob("*.safetensors")):
        raise ExportError(f"export wrote no safetensors weights into {folder}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def export_pruned(
    result: Any,
    out_dir: str | Path,
    *,
    tokenizer: Any,
    profile: str = "hetero",
    base_model_id: str,
    base_revision: str | None = None,
    calibration_info: dict[str, Any],
    eval_metrics: dict[str, Any] | None = None,
    max_shard_size: str | int = "2GB",
    verify: bool = True,
    license: str | None = None,
    verify_ids: torch.Tensor | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    verify_logits: torch.Tensor | None = None,
    heal: dict[str, Any] | None = None,
) -> ExportReport:
    """Write ``result.model`` (a :class:`~slimgpt_core.pruner.PruneResult`) to ``out_dir``.

    ``calibration_info``: see :func:`describe_calibration`. ``eval_metrics``: optional
    ``ppl_before``/``ppl_after``/``dataset``. ``license``: the base model's licence (``other``
    when unknown). ``verify_ids``: token windows for the fresh-process check (default: two
    random windows of 32 tokens). ``repo_id``: the name the loading snippet in the card uses.

    A streamed result (``result.placement == "stream"``: the model is a skeleton whose pruned
    layers are files) is written from those files, and verified against ``verify_logits``,
    the logits the pruner computed for ``verify_ids`` (a pruned :class:`Probe`), by a fresh
    process that loads the folder one layer at a time.

    ``heal``: the settings of a healing step run after pruning
    (:func:`slimgpt_core.heal.heal_settings`), part of the recipe the card records.

    The folder is written under a staging name and renamed into place only when complete (and
    verified, when ``verify``); a failed verification raises :class:`ExportVerificationError`
    and leaves the staged folder, with the failed check in its ``pruning_config.json``.
    """
    t0 = time.perf_counter()
    model = result.model
    if profile not in PROFILES:
        raise ExportError(f"unknown export profile {profile!r}; choose one of {PROFILES}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty (pass overwrite=True)")
    license = license or "other"
    config = export_config(model, profile)  # validates the profile before anything is written
    widths = layer_widths(model)
    for r in result.layers:
        w = widths[r.index]
        if (len(r.heads_kept), len(r.kv_heads_kept), len(r.channels_kept)) != (
                w["num_heads"], w["num_kv_heads"], w["intermediate_size"]):
            raise ExportError(f"layer {r.index}: the pruning report and the model's modules "
                              "disagree on the kept widths (was the model changed after pruning?)")
    architecture = config.architectures[0]
    streamed = getattr(result, "placement", None) == "stream"
    if streamed and verify and (verify_ids is None or verify_logits is None):
        raise ExportError("verifying a streamed result needs verify_ids and verify_logits "
                          "(the pruned model is not in memory to compute them)")

    staging = out_dir.parent / f".{out_dir.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    was_training = model.training
    model.eval()
    try:
        if streamed:
            _save_streamed_weights(result, staging, max_shard_size)
        else:
            _save_weights(model, staging, max_shard_size)
        config.save_pretrained(staging)  # replaces the dense config save_pretrained wrote
        _write_generation_config(model, staging)
        if profile == "hetero":
            shutil.copyfile(modeling_slimgpt.__file__, staging / MODELING_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        pcfg = _pruning_config(result, widths, profile, base_model_id, base_revision, license,
                               calibration_info, eval_metrics, architecture)
        pcfg["dtype"] = _compute_dtype(model)
        pcfg["heal"] = dict(heal) if heal else None
        # Everything that decides the weights, in one place (the card shows the same).
        pcfg["recipe"] = pruning_recipe(pcfg)
        plot_layer_widths(widths, pcfg["dense"], staging / CHART_FILE)

        def write_docs() -> None:
            _write_json(staging / PRUNING_CONFIG_FILE, pcfg)
            card = render_model_card(
                base_model_id=base_model_id, base_revision=base_revision, license=license,
                profile=profile, pruning=pcfg, calibration=calibration_info,
                eval_metrics=eval_metrics, library_version=slimgpt_core.__version__,
                repo_or_path=repo_id or str(out_dir))
            (staging / "README.md").write_text(card)

        write_docs()
        _check_no_pickles(staging)
        verification = None
        if verify:
            ids = verify_ids if verify_ids is not None else default_windows(
                model.config.vocab_size)
            try:
                verification = verify_export(staging, model, ids,
                                             trust_remote_code=(profile == "hetero"),
                                             reference_logits=verify_logits if streamed else None,
                                             streamed=streamed)
            except ExportVerificationError as err:
                pcfg["verification"] = {"passed": False, "error": str(err)}
                write_docs()
                raise ExportVerificationError(
                    f"export to {out_dir} failed verification; the folder is kept at "
                    f"{staging} for inspection. {err}") from None
            pcfg["verification"] = verification
            write_docs()
    finally:
        model.train(was_training)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return ExportReport(
        out_dir=out_dir, profile=profile, files=sorted(p.name for p in out_dir.iterdir()),
        params_before=result.params_before, params_after=result.params_after,
        achieved_ratio=pcfg["achieved_ratio"], verification=verification,
        pruning_config=pcfg, seconds=round(time.perf_counter() - t0, 3),
    )
