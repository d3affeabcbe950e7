"""Options of `slimgpt prune`, shared by name with `slimgpt submit` (typer). Torch-free, so
`slimgpt --help` stays instant.

Each option is an ``Annotated`` alias: one flag name, one help text, wherever a command takes
it. A local run (`prune`) gives them the algorithm's defaults; a job submission (`submit`) gives
them ``None`` so that the server's defaults (or ``--body`` / ``--set``) apply.
"""

from __future__ import annotations

from enum import Enum
from types import SimpleNamespace
from typing import Annotated

import typer

from slimgpt_core.schedule import GQA_POLICIES


class GqaPolicy(str, Enum):
    balanced = "balanced"
    group = "group"
    free = "free"


class Profile(str, Enum):
    hetero = "hetero"
    uniform = "uniform"


class Target(str, Enum):
    layer = "layer"
    dense = "dense"


class Preset(str, Enum):
    standard = "standard"
    quality = "quality"
    thorough = "thorough"


class Allocation(str, Enum):
    schedule = "schedule"
    sensitivity = "sensitivity"
    search = "search"


class Selection(str, Enum):
    output = "output"
    fisher = "fisher"


class HealMode(str, Enum):
    lora = "lora"
    full = "full"


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


assert {p.value for p in GqaPolicy} == set(GQA_POLICIES)

PRUNING = "Pruning"
DATA = "Calibration and evaluation"
SCALE = "Scale"
HEAL = "Healing"

ModelOpt = Annotated[str, typer.Option("--model", help="Hub repo id, local model folder, or "
                                       ".gguf file")]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", help="Hub revision (branch, tag or commit; default main)")]
RatioOpt = Annotated[float, typer.Option(
    "--ratio", help="share of decoder-layer parameters to remove, in (0, 0.9]")]
ScheduleOpt = Annotated[str | None, typer.Option(
    "--schedule", help="per-layer ratio schedule: log (default), linear, uniform, or "
    "comma-separated per-layer ratios (submit only); uniform with --profile uniform",
    rich_help_panel=PRUNING)]
AlphaOpt = Annotated[float | None, typer.Option(
    "--alpha", help="first-layer ratio = alpha * last-layer ratio (log/linear; default 0.25)",
    rich_help_panel=PRUNING)]
GqaPolicyOpt = Annotated[GqaPolicy | None, typer.Option(
    "--gqa-policy", help="how grouped-query heads are removed (default: free with the hetero "
    "profile, balanced with uniform)", rich_help_panel=PRUNING)]
HeadRatioOpt = Annotated[float | None, typer.Option(
    "--head-ratio", help="fixed attention-head ratio per layer", rich_help_panel=PRUNING)]
FfnRatioOpt = Annotated[float | None, typer.Option(
    "--ffn-ratio", help="fixed FFN-channel ratio per layer", rich_help_panel=PRUNING)]
PercdampOpt = Annotated[float | None, typer.Option(
    "--percdamp", help="Hessian damping, share of its mean diagonal (default 0.01)",
    rich_help_panel=PRUNING)]
PresetOpt = Annotated[Preset | None, typer.Option(
    "--preset", help="standard (default): the paper's method, for every model and placement; "
    "quality: + Fisher selection, dense target and sensitivity allocation, the best model "
    "measured at equal size for ~15x the pruning time (the model resident on one GPU; no "
    "mixture of experts); thorough: quality + allocation search, better still at 50% for "
    "~5x quality's time (not where every layer's weights at many widths overfill the GPU)",
    rich_help_panel=PRUNING)]
MinGroupOpt = Annotated[int | None, typer.Option(
    "--min-group", help="smallest FFN channel group (1 = exact greedy; default 64)",
    rich_help_panel=PRUNING)]
ProfileOpt = Annotated[Profile | None, typer.Option(
    "--profile", help="artifact profile: hetero (default) or uniform (implies the uniform "
    "schedule)", rich_help_panel=PRUNING)]
CalibOpt = Annotated[str | None, typer.Option(
    "--calib", metavar="FILE", help="calibration text (.txt, or .jsonl with a 'text' field)",
    rich_help_panel=DATA)]
EvalOpt = Annotated[str | None, typer.Option(
    "--eval", metavar="FILE", help="held-out text for the perplexity before/after",
    rich_help_panel=DATA)]
EvalWindowsOpt = Annotated[int | None, typer.Option(
    "--eval-windows", min=1, help="number of evaluation windows", rich_help_panel=DATA)]
NsamplesOpt = Annotated[int | None, typer.Option(
    "--nsamples", "--calib-samples", min=1, help="calibration windows (default 128)",
    rich_help_panel=DATA)]
SeqlenOpt = Annotated[int | None, typer.Option(
    "--seqlen", "--seq-len", min=2, help="tokens per window (default 2048)",
    rich_help_panel=DATA)]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="sampling seed (default 0)",
                                                rich_help_panel=DATA)]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]
GpusOpt = Annotated[int | None, typer.Option(
    "--gpus", min=1, help="GPUs of one host the job runs on, one job (default 1; locally it "
    "implies --stream)", rich_help_panel="Scale")]


HealOpt = Annotated[bool, typer.Option(
    "--heal", help="after pruning, distil the dense model into the pruned one on calibration "
    "text", rich_help_panel=HEAL)]
HealTokensOpt = Annotated[int | None, typer.Option(
    "--heal-tokens", min=1, help="healing budget in training tokens (default 1,000,000)",
    rich_help_panel=HEAL)]
HealModeOpt = Annotated[HealMode | None, typer.Option(
    "--heal-mode", help="lora (adapters merged afterwards; default) or full (the layer "
    "weights)", rich_help_panel=HEAL)]


def prune(
    model: ModelOpt,
    ratio: RatioOpt,
    out: Annotated[str | None, typer.Option("--out", help="output folder (must not exist or "
                                            "be empty); not needed with --dry-run")] = None,
    revision: RevisionOpt = None,
    calib: CalibOpt = None,
    eval_file: EvalOpt = None,
    eval_windows: EvalWindowsOpt = 32,
    schedule: ScheduleOpt = None,
    alpha: AlphaOpt = 0.25,
    gqa_policy: GqaPolicyOpt = None,
    head_ratio: HeadRatioOpt = None,
    ffn_ratio: FfnRatioOpt = None,
    nsamples: NsamplesOpt = 128,
    seqlen: SeqlenOpt = 2048,
    seed: SeedOpt = 0,
    percdamp: PercdampOpt = 0.01,
    min_group: MinGroupOpt = 64,
    batch_size: Annotated[int, typer.Option(help="windows per layer forward")] = 8,
    device: Annotated[str | None, typer.Option(
        help="cuda, cuda:1, cpu (default: cuda if present)")] = None,
    dtype: Annotated[Dtype | None, typer.Option(
        help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")] = None,
    offload_activations: Annotated[bool, typer.Option(
        "--offload-activations", help="keep calibration activations in CPU memory")] = False,
    profile: ProfileOpt = Profile.hetero,
    checkpoint_dir: Annotated[str | None, typer.Option(
        help="per-layer checkpoints; rerunning with the same folder resumes")] = None,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="skip reloading the folder in a fresh process to compare "
        "logits")] = False,
    json: JsonOpt = False,
    stream: Annotated[bool, typer.Option(
        "--stream", help="stream the model layer by layer from its safetensors shards and "
        "write the output shards as it goes (default: only when the model does not fit in "
        "host memory)", rich_help_panel=SCALE)] = False,
    gpus: GpusOpt = 1,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="print the plan and what it needs per GPU type and count (peak "
        "GPU/host memory, disk, time); load no weights", rich_help_panel=SCALE)] = False,
    host_memory_gb: Annotated[float | None, typer.Option(
        "--host-memory-gb", help="host memory to plan with (default: what is available)",
        rich_help_panel=SCALE)] = None,
    target: Annotated[Target | None, typer.Option(
        "--target", help="what the compensation reconstructs: each layer's own output "
        "(layer) or the dense model's stream (dense); default: the library's",
        rich_help_panel=PRUNING)] = None,
    local_search: Annotated[int | None, typer.Option(
        "--local-search", min=0, metavar="SWAPS", help="improving swaps per projection after "
        "the greedy pass (0 = none; default: the library's)", rich_help_panel=PRUNING)] = None,
    allocation: Annotated[Allocation | None, typer.Option(
        "--allocation", help="per-layer widths from the schedule, redistributed by "
        "measured sensitivity, or that refined by search on the model's loss (same size); "
        "default: the library's",
        rich_help_panel=PRUNING)] = None,
    calib_budget: Annotated[float | None, typer.Option(
        "--calib-budget", min=0.001, metavar="SECONDS", help="choose the number of calibration "
        "windows (instead of --nsamples) as the most whose predicted pruning time on this GPU "
        "fits SECONDS (the cost model of --dry-run; an H200 in a dry run without a GPU)",
        rich_help_panel=DATA)] = None,
    preset: PresetOpt = None,
    selection: Annotated[Selection | None, typer.Option(
        "--selection", help="score heads and channels by the error in each projection's "
        "output (output) or in the loss's metric, the dense model's output Fisher (fisher; "
        "the whole model on one device); default: the library's",
        rich_help_panel=PRUNING)] = None,
    fisher_windows: Annotated[int | None, typer.Option(
        "--fisher-windows", min=1, metavar="N", help="calibration windows the output Fisher "
        "is measured on (default: all)", rich_help_panel=PRUNING)] = None,
    fisher_samples: Annotated[int | None, typer.Option(
        "--fisher-samples", min=0, metavar="N", help="labels of the output Fisher drawn from "
        "the model's own predictions, N per token (the true Fisher; N backward passes); 0: "
        "the text's next tokens (default: the library's)", rich_help_panel=PRUNING)] = None,
    search_generations: Annotated[int | None, typer.Option(
        "--search-generations", min=0, metavar="N", help="generations of --allocation "
        "search (default: the library's)", rich_help_panel=PRUNING)] = None,
    expert_min_tokens: Annotated[int | None, typer.Option(
        "--expert-min-tokens", min=0, metavar="TOKENS", help="mixture of experts: an expert "
        "routed fewer calibration tokens has its Hessian blended with its all-token one "
        "(default: the expert's width)", rich_help_panel=PRUNING)] = None,
    heal: HealOpt = False,
    heal_tokens: HealTokensOpt = 1_000_000,
    heal_mode: HealModeOpt = HealMode.lora,
) -> None:
    """Prune a model locally (no service) and write a folder that standard tools load."""
    try:
        from slimgpt_core.cli import run_prune
    except ImportError as err:
        raise MissingExtra("core", "slimgpt prune", err) from None
    args = SimpleNamespace(
        model=model, revision=revision, ratio=ratio, out=out, calib=calib, eval_file=eval_file,
        eval_windows=eval_windows, schedule=schedule, alpha=alpha,
        gqa_policy=gqa_policy.value if gqa_policy else None, head_ratio=head_ratio,
        ffn_ratio=ffn_ratio, nsamples=nsamples, seqlen=seqlen, seed=seed, percdamp=percdamp,
        min_group=min_group, batch_size=batch_size, device=device,
        dtype=dtype.value if dtype else None, offload_activations=offload_activations,
        profile=(profile or Profile.hetero).value, checkpoint_dir=checkpoint_dir,
        no_verify=no_verify, json=json, stream=stream, gpus=gpus or 1, dry_run=dry_run,
        host_memory_gb=host_memory_gb, target=target.value if target else None,
        local_search=local_search, allocation=allocation.value if allocation else None,
        preset=preset.value if preset else None,
        selection=selection.value if selection else None, fisher_windows=fisher_windows,
        fisher_samples=fisher_samples, search_generations=search_generations,
        calib_budget=calib_budget,
        expert_min_tokens=expert_min_tokens, heal=heal, heal_tokens=heal_tokens or 1_000_000,
        heal_mode=(heal_mode or HealMode.lora).value)
    raise typer.Exit(run_prune(args))  # type: ignore[arg-type]


class MissingExtra(Exception):
    """A command needs an optional part of the install (an "extra") that is not there."""

    def __init__(self, extra: str, what: str, cause: BaseException | None = None) -> None:
        missing = getattr(cause, "name", None)
        because = f" (cannot import {missing})" if missing else ""
        super().__init__(
            f"{what} needs the `{extra}` extra{because}: "
            f"pip install 'slimgpt-service[{extra}]'")
        self.extra = extra


def add_prune_command(app: typer.Typer) -> None:
    app.command("prune", rich_help_panel="Local")(prune)
