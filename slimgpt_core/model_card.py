"""The model card (``README.md``) and the per-layer width chart of an exported pruned model."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slimgpt_core.presets import preset_named

CHART_FILE = "pruning_chart.png"


def plot_layer_widths(widths: Sequence[Mapping[str, int]], dense: Mapping[str, int],
                      path: str | Path) -> Path:
    """Bar chart of kept query heads, KV heads and FFN channels per layer against the dense
    widths. ``widths[i]`` has ``num_heads``, ``num_kv_heads``, ``intermediate_size``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    n = len(widths)
    xs = list(range(n))
    fig = Figure(figsize=(max(6.0, 0.28 * n + 3), 5.5), dpi=100)
    ax_h, ax_c = fig.subplots(2, 1, sharex=True)
    bar = 0.4
    ax_h.bar([x - bar / 2 for x in xs], [w["num_heads"] for w in widths], bar,
             label="query heads kept", color="#3b75af")
    ax_h.bar([x + bar / 2 for x in xs], [w["num_kv_heads"] for w in widths], bar,
             label="KV heads kept", color="#ef8636")
    ax_h.axhline(dense["num_heads"], color="#3b75af", ls="--", lw=1, label="dense query heads")
    ax_h.axhline(dense["num_kv_heads"], color="#ef8636", ls=":", lw=1, label="dense KV heads")
    ax_h.set_ylabel("heads")
    ax_h.legend(fontsize=7, loc="lower left", ncol=2)
    ax_c.bar(xs, [w["intermediate_size"] for w in widths], 0.7, color="#519e3e",
             label="FFN channels kept")
    ax_c.axhline(dense["intermediate_size"], color="#519e3e", ls="--", lw=1,
                 label="dense FFN channels")
    ax_c.set_ylabel("FFN channels")
    ax_c.set_xlabel("layer")
    ax_c.legend(fontsize=7, loc="lower left")
    ax_c.set_xticks(xs)
    ax_c.tick_params(axis="x", labelsize=7)
    fig.suptitle("SlimGPT: kept widths per layer")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def loading_snippet(profile: str, repo_or_path: str) -> str:
    """The exact Python that loads an export of ``profile``."""
    remote = ", trust_remote_code=True" if profile == "hetero" else ""
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_or_path}"{remote})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_or_path}")\n'
    )


def _vllm_hetero_refusal(architecture: str | None) -> str | None:
    """The family adapter's reason the vLLM plugin refuses its ``hetero`` exports, if any."""
    from slimgpt_core.families import all_families  # torch-free

    for family in all_families():
        if architecture in (family.stock_model, f"SlimGPT{family.stock_model}"):
            return family.vllm_hetero_refusal
    return None


def serving_text(profile: str, repo_or_path: str, architecture: str | None = None) -> str:
    """How to serve an export of ``profile`` with vLLM (markdown)."""
    if profile != "hetero" and architecture == "Qwen2ForCausalLM":
        # vLLM's Qwen2 layer derives head_dim from hidden_size / heads (checked in 0.32),
        # which pruning heads breaks; the plugin's layers read head_dim from the config.
        return ("vLLM's own Qwen2 model derives the head size from `hidden_size` / heads, "
                "which pruned heads break, so vLLM cannot load this folder as it is; export "
                "the `hetero` profile and serve it with the SlimGPT plugin "
                '(`pip install "slimgpt-service[vllm]"`).\n')
    if profile == "hetero":
        refusal = _vllm_hetero_refusal(architecture)
        if refusal:
            return f"The SlimGPT vLLM plugin does not serve this folder: {refusal}\n"
        return (
            "vLLM serves this folder through the SlimGPT plugin, which builds each layer from "
            "vLLM's own layers for the family with that layer's widths (paged attention, CUDA "
            "graphs, tensor parallelism where the widths split):\n\n"
            "```bash\n"
            'pip install "slimgpt-service[vllm]"   # the plugin; installs vLLM too\n'
            f"vllm serve {repo_or_path}\n"
            "```\n")
    return ("This is a plain checkpoint: vLLM serves it as it is, no plugin needed.\n\n"
            f"```bash\nvllm serve {repo_or_path}\n```\n")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n:,} ({n / 1e6:.1f} M)"


def _fmt_ppl(value: Any) -> str:
    return "–" if value is None else f"{float(value):.3f}"


#: Calibration/evaluation source names -> Hub dataset ids (older pruning configs have names).
_DATASET_IDS = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext"}
_DATASET_CONFIGS = {"c4": "en", "wikitext2": "wikitext-2-raw-v1"}


def _dataset_id(info: Mapping[str, Any]) -> str | None:
    dataset = info.get("dataset")
    if isinstance(dataset, str) and _HUB_ID.match(dataset):
        return dataset
    return _DATASET_IDS.get(str(info.get("source") or dataset or ""))


def card_data(
    *,
    base_model_id: str,
    license: str,
    profile: str,
    calibration: Mapping[str, Any],
    eval_metrics: Mapping[str, Any] | None,
    model_name: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    zero_shot: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    """The card's metadata (``huggingface_hub.ModelCardData``): the base model and how this one
    relates to it (``pruned``), the Hub datasets used for calibration and evaluation, and the
    measured perplexity as a ``model-index`` result (a Hub-dataset evaluation only: an
    uploaded file has no id others could evaluate on)."""
    from huggingface_hub import EvalResult, ModelCardData

    ev = eval_metrics or {}
    datasets = [d for d in (_dataset_id(calibration), _dataset_id(ev)) if d]
    eval_results = []
    eval_dataset = _dataset_id(ev)
    ppl = ev.get("ppl_after", ev.get("perplexity_after"))
    if eval_dataset and ppl is not None:
        source = str(ev.get("source") or "")
        windows, seq_len = ev.get("windows") or ev.get("num_windows"), ev.get("seq_len")
        eval_results.append(EvalResult(
            task_type="text-generation", task_name="Language modelling",
            dataset_type=eval_dataset, dataset_name=eval_dataset.split("/")[-1],
            dataset_config=ev.get("config") or _DATASET_CONFIGS.get(source),
            dataset_split=ev.get("split") or ("test" if source == "wikitext2" else
                                               "validation"),
            dataset_revision=ev.get("revision"),
            metric_type="perplexity", metric_value=round(float(ppl), 4),
            metric_name=f"perplexity ({windows} windows of {seq_len} tokens)"
            if windows and seq_len else "perplexity"))
    for task, res in (zero_shot or {}).items():
        dataset_id = res.get("dataset")
        if not (isinstance(dataset_id, str) and _HUB_ID.match(dataset_id)):
            continue  # a local task file has no id others could evaluate on
        for metric in ("acc", "acc_norm"):
            if res.get(metric) is None:
                continue
            eval_results.append(EvalResult(
                task_type="multiple-choice", task_name=f"{task} (zero-shot, lm-eval)",
                dataset_type=dataset_id, dataset_name=task, dataset_config=res.get("config"),
                dataset_split=res.get("split"), metric_type=metric,
                metric_value=round(float(res[metric]), 4),
                metric_name=f"{metric} ({res.get('samples')} examples, 0-shot)"))
            datasets.append(dataset_id)
    return ModelCardData(
        language=None,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["pruned", "slimgpt", "structured-pruning", f"profile-{profile}"],
        base_model=base_model_id if _HUB_ID.match(base_model_id) else None,
        base_model_relation="pruned" if _HUB_ID.match(base_model_id) else None,
        datasets=list(dict.fromkeys(datasets)) or None,
        model_name=model_name,
        eval_results=eval_results or None,
        slimgpt_recipe=dict(recipe) if recipe else None,
    )


#: The settings that decide the weights, in the order the card lists them, with the default a
#: pruning config of an older release leaves implicit. Device, batch size, offloading and
#: checkpoint paths only change speed and memory, and are left out.
RECIPE_DEFAULTS: dict[str, Any] = {
    "target_ratio": None, "schedule": "log", "alpha": 0.25, "gqa_policy": None,
    "head_ratio": None, "ffn_ratio": None, "percdamp": 0.01, "min_group": 64,
    "max_group": 1024, "method": "slimgpt", "target": "layer", "local_search": 0,
    "allocation": "schedule", "plain_heads": False, "compact": True, "seed": 0,
    "expert_min_tokens": None,  # mixture of experts only (None: each expert's width)
    "selection": "output", "fisher_windows": None,  # None: every calibration window
    "fisher_samples": 0,  # 0: the text's own next tokens
    "search_generations": 100,  # allocation "search" only
}
_CALIBRATION_KEYS = ("source", "dataset", "config", "split", "file", "num_samples", "seqlen",
                     "seed", "sha256")
#: `slimgpt prune` flag of each pruning setting; `submit` shares the names (not the last three).
_PRUNE_FLAGS = {"schedule": "--schedule", "alpha": "--alpha", "gqa_policy": "--gqa-policy",
                "head_ratio": "--head-ratio", "ffn_ratio": "--ffn-ratio",
                "percdamp": "--percdamp", "min_group": "--min-group", "target": "--target",
                "local_search": "--local-search", "allocation": "--allocation",
                "expert_min_tokens": "--expert-min-tokens", "selection": "--selection",
                "fisher_windows": "--fisher-windows", "fisher_samples": "--fisher-samples",
                "search_generations": "--search-generations"}
_LOCAL_ONLY = ("target", "local_search", "allocation", "expert_min_tokens", "selection",
               "fisher_windows", "fisher_samples", "search_generations")


def pruning_recipe(pruning: Mapping[str, Any],
                   calibration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything that decides the pruned weights, as one plain mapping: the base model and
    revision, every pruning setting (explicit, defaults included), the calibration windows
    (source, count, length, seed and the sha256 of their token ids, to check a re-run used
    the same), the compute dtype, the healing step and the profile. It is the card's
    ``slimgpt_recipe`` metadata and ``pruning_config.json``'s ``recipe``."""
    settings = dict(pruning.get("settings") or {})
    base = pruning.get("base_model") or {}
    cal = calibration if calibration is not None else (pruning.get("calibration") or {})
    prune = {}
    for key, default in RECIPE_DEFAULTS.items():
        value = settings.get(key, pruning.get(key, default))
        prune[key] = list(value) if isinstance(value, (list, tuple)) else value
    if prune["gqa_policy"] is None:  # PruneConfig's own resolution
        from slimgpt_core.schedule import default_gqa_policy  # torch-free

        prune["gqa_policy"] = default_gqa_policy(bool(prune["plain_heads"]))
    recipe: dict[str, Any] = {
        "base_model": base.get("id"),
        "base_revision": base.get("revision"),
        "profile": pruning.get("profile"),
        "pruning": prune,
        "calibration": {k: cal[k] for k in _CALIBRATION_KEYS if cal.get(k) is not None},
        "dtype": pruning.get("dtype"),
        "heal": dict(pruning["heal"]) if pruning.get("heal") else None,
    }
    versions = pruning.get("versions") or {}
    if versions:
        recipe["versions"] = {k: versions[k] for k in ("slimgpt_core", "torch", "transformers")
                              if k in versions}
    # Plain JSON types only (torch.__version__ is a str subclass that YAML would tag).
    return dict(json.loads(json.dumps(recipe, default=str)))


def _flag_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def recipe_commands(recipe: Mapping[str, Any]) -> dict[str, str | None]:
    """The `slimgpt prune` (local) and `slimgpt submit` (service) command lines that repeat
    ``recipe``; ``submit`` is None when the service cannot express a setting."""
    prune, cal, heal = recipe["pruning"], recipe.get("calibration") or {}, recipe.get("heal")
    common = [f"--ratio {prune['target_ratio']}"]
    if recipe.get("base_revision"):
        common.insert(0, f"--revision {recipe['base_revision']}")
    for key, flag in _PRUNE_FLAGS.items():
        if prune.get(key) is not None and key not in _LOCAL_ONLY:
            common.append(f"{flag} {_flag_value(prune[key])}")
    common.append(f"--profile {recipe.get('profile') or 'hetero'}")
    for key, flag in (("num_samples", "--nsamples"), ("seqlen", "--seqlen"), ("seed", "--seed")):
        if cal.get(key) is not None:
            common.append(f"{flag} {cal[key]}")
    if heal:
        common += ["--heal", f"--heal-tokens {heal.get('tokens')}",
                   f"--heal-mode {heal.get('mode', 'lora')}"]
    changed = {key: prune.get(key) for key in _LOCAL_ONLY
               if prune.get(key) != RECIPE_DEFAULTS[key]}
    local = [f"{flag} {prune[key]}" for key, flag in _PRUNE_FLAGS.items() if key in changed]
    # The service takes these settings only as a whole named preset.
    named = preset_named(changed) if changed else None
    source = str(cal.get("source") or "")
    calib = (f"--calib {source}" if source and not source.startswith(("bundled:", "upload"))
             and source not in ("c4", "wikitext2") else "--calib CALIBRATION_TEXT")
    dtype = f" --dtype {recipe['dtype']}" if recipe.get("dtype") else ""
    commands: dict[str, str | None] = {
        "prune": (f"slimgpt prune --model {recipe.get('base_model') or 'BASE'} --out DIR "
                  f"{' '.join(common + local)} {calib}{dtype}")}
    service_ok = ((not changed or named is not None) and prune.get("method") == "slimgpt"
                  and prune.get("max_group") == max(1024, int(prune.get("min_group") or 64)))
    calib_source = (f"--calib-source {source}" if source in ("c4", "wikitext2")
                    else "--calib CALIBRATION_TEXT")
    service = common + ([f"--preset {named}"] if changed else [])
    commands["submit"] = (f"slimgpt submit --model {recipe.get('base_model') or 'BASE'} "
                          f"{' '.join(service)} {calib_source}") if service_ok else None
    return commands


def _recipe(pruning: Mapping[str, Any], recipe: Mapping[str, Any]) -> str:
    """The recipe as text: every setting that decides the weights, and the commands that
    repeat it."""
    ratios = [r for r in pruning.get("layer_ratios") or [] if r is not None]
    spread = f" (per layer {min(ratios):.3f} .. {max(ratios):.3f})" if ratios else ""
    prune = recipe["pruning"]
    lines = [(f"- Target: {prune['target_ratio']} of the decoder-layer parameters, schedule "
              f"`{_flag_value(prune['schedule'])}`{spread}; GQA policy "
              f"`{prune['gqa_policy']}`."),
             ("- Every setting that decides the weights (also this card's `slimgpt_recipe` "
              "metadata and `pruning_config.json`'s `recipe`):")]
    lines += [f"  - `{key}`: `{_flag_value(value)}`" for key, value in prune.items()]
    lines.append(f"  - compute dtype: `{recipe.get('dtype') or 'not recorded'}`")
    heal = recipe.get("heal")
    if heal:
        detail = ", ".join(f"{k} {v}" for k, v in heal.items())
        lines.append(f"  - healing (distillation of the base model, after pruning): {detail}")
    else:
        lines.append("  - healing: none")
    commands = recipe_commands(recipe)
    lines.append(f"- Equivalent local run: `{commands['prune']}`")
    if "CALIBRATION_TEXT" in (commands["prune"] or ""):
        lines.append("  (CALIBRATION_TEXT: a file with the calibration text described below; "
                     "the windows' sha256 tells whether a re-run sampled the same ones)")
    if commands["submit"]:
        lines.append(f"- Equivalent service job: `{commands['submit']}`")
    else:
        lines.append("- The service cannot run this recipe (settings only the local "
                     "`slimgpt prune` or the library take).")
    lines.append("- A re-run with the same recipe, calibration windows (same sha256), dtype and "
                 "versions on the same kind of device gives the same kept heads and channels.")
    return "\n".join(lines)


def render_model_card(
    *,
    base_model_id: str,
    base_revision: str | None,
    license: str,
    profile: str,
    pruning: Mapping[str, Any],
    calibration: Mapping[str, Any],
    eval_metrics: Mapping[str, Any] | None,
    library_version: str,
    repo_or_path: str = "path/to/this/folder",
) -> str:
    """``README.md`` text (a ``huggingface_hub.ModelCard``): metadata with ``model-index``,
    results table, chart, loading and serving, the recipe, provenance."""
    from huggingface_hub import ModelCard

    name = repo_or_path.rstrip("/").split("/")[-1] if _HUB_ID.match(repo_or_path) else None
    recipe = pruning_recipe({**pruning, "profile": profile,
                             "base_model": {**(pruning.get("base_model") or {}),
                                            "id": base_model_id, "revision": base_revision}},
                            calibration)
    zero_shot = pruning.get("zero_shot") or {}
    data = card_data(base_model_id=base_model_id, license=license, profile=profile,
                     calibration=calibration, eval_metrics=eval_metrics,
                     model_name=name or f"{base_model_id.split('/')[-1]}-slimgpt", recipe=recipe,
                     zero_shot=zero_shot)
    dataset = _dataset_id(calibration)
    ev = dict(eval_metrics or {})
    before, after = pruning["params_before"], pruning["params_after"]
    measured_on = _dataset_id(ev) or ("an uploaded file" if ev.get("source") == "upload"
                                      else ev.get("dataset"))
    if measured_on and ev.get("windows") and ev.get("seq_len"):
        measured_on = f"{measured_on}, {ev['windows']} x {ev['seq_len']} tokens"
    ev["dataset"] = measured_on
    removed = 1.0 - after / before if before else 0.0
    rows = [
        "| | base | pruned |",
        "|---|---|---|",
        f"| parameters | {_fmt_params(before)} | {_fmt_params(after)} |",
        (f"| perplexity{' (' + ev['dataset'] + ')' if ev.get('dataset') else ''} | "
         f"{_fmt_ppl(ev.get('ppl_before'))} | {_fmt_ppl(ev.get('ppl_after'))} |"),
    ]
    for task, res in zero_shot.items():
        for metric in ("acc", "acc_norm"):
            if res.get(metric) is not None:
                where = res.get("dataset") or "a local task file"
                rows.append(f"| zero-shot {task} {metric} ({where}, {res.get('samples')} "
                            f"examples; lm-eval) | – | {float(res[metric]):.4f} |")
    speed = pruning.get("speed") or {}
    if speed.get("prefill_speedup") is not None:
        where = f"{speed.get('device')}, {speed.get('dtype')}, {speed.get('runtime')}"
        rows.append(f"| prefill tokens/s ({speed.get('prefill_tokens')} tokens; {where}) | "
                    f"{speed['dense_prefill_tok_s']:,.0f} | {speed['pruned_prefill_tok_s']:,.0f} "
                    f"({speed['prefill_speedup']:.2f}x) |")
        rows.append(f"| decode tokens/s (batch 1) | {speed['dense_decode_tok_s']:,.1f} | "
                    f"{speed['pruned_decode_tok_s']:,.1f} ({speed['decode_speedup']:.2f}x) |")
    revision = f" (revision `{base_revision}`)" if base_revision else ""
    ver = pruning.get("verification") or {}
    if ver:
        ver_line = (f"Verified before publishing: the folder was loaded in a fresh process and its "
                    f"logits on {ver.get('windows')} windows matched the in-memory pruned model "
                    f"(max |diff| {ver.get('max_abs_diff', float('nan')):.3g}, tolerance "
                    f"{ver.get('tolerance', float('nan')):.3g}).")
    else:
        ver_line = "This folder was not verified after writing."
    cal_bits = [f"`{dataset}`" if dataset else str(calibration.get("source") or
                                                      "unknown source")]
    if calibration.get("config"):
        cal_bits[0] += f" ({calibration['config']}, {calibration.get('split', 'train')})"
    if calibration.get("num_samples") is not None:
        cal_bits.append(f"{calibration['num_samples']} windows")
    if calibration.get("seqlen") is not None:
        cal_bits.append(f"of {calibration['seqlen']} tokens")
    if calibration.get("seed") is not None:
        cal_bits.append(f"seed {calibration['seed']}")
    if calibration.get("sha256"):
        cal_bits.append(f"sha256 `{str(calibration['sha256'])[:16]}…`")
    experts = (pruning.get("dense") or {}).get("num_experts")
    moe_line = (f"\n- Mixture of experts ({experts} per layer, router unchanged): every expert's "
                "channels were pruned on the Hessian of the calibration tokens routed to it "
                "(blended with its all-token one when it saw fewer than `expert_min_tokens`, "
                "by default its width); "
                "the experts of a layer keep as many channels each, each expert its own."
                if experts else "")
    profile_text = (
        "`hetero`: every layer keeps its own number of heads and FFN channels; `config.json` "
        "lists the per-layer widths and points (`auto_map`) to `modeling_slimgpt.py` in this "
        "folder, so loading needs `trust_remote_code=True`."
        if profile == "hetero" else
        "`uniform`: every layer has the same widths, so this is a plain "
        f"`{pruning.get('architecture', 'LlamaForCausalLM')}` checkpoint with an explicit "
        "`head_dim`; it loads with no remote code (transformers, vLLM, llama.cpp conversion)."
    )
    body = f"""
# {base_model_id.split('/')[-1]} — SlimGPT pruned ({removed:.0%} fewer parameters)

A structurally pruned version of `{base_model_id}`{revision}: whole attention heads and FFN
channels were removed with SlimGPT (layer-wise Optimal Brain Surgeon pruning with weight
compensation, arXiv 2412.18110). Embeddings, norms and the LM head are unchanged.

## Results

{chr(10).join(rows)}

Target pruning ratio {pruning.get('target_ratio')}, achieved {pruning.get('achieved_ratio', 0):.4f}
of the decoder-layer parameters.

![kept heads and channels per layer]({CHART_FILE})

## Loading

Profile {profile_text}

```python
{loading_snippet(profile, repo_or_path)}```

## Serving with vLLM

{serving_text(profile, repo_or_path, pruning.get("architecture"))}

## How it was produced

- Method: SlimGPT (`slimgpt_core` {library_version}): batched greedy head pruning on `o_proj`,
  dynamic-group FFN channel pruning on `down_proj`, layer by layer on the outputs of the
  already-pruned layers.{moe_line}
{_recipe(pruning, recipe)}
- Calibration: {', '.join(cal_bits)}.
- {ver_line}
- Per-layer kept head / KV head / channel indices and all settings: `pruning_config.json`.

Pruned models usually lose some quality; a short LoRA fine-tune (the paper's recovery step)
recovers part of it. Check the perplexity above against your use.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
