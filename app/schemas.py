"""Request and response models of the /v1 API. Unknown fields are rejected (422)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from slimgpt_core.schedule import default_gqa_policy  # torch-free

#: Hub repo id syntax: ``owner/name``; letters, digits, '-', '_', '.'; no '--' or '..';
#: neither part starts or ends with '-' or '.'; at most 96 characters per part.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?"
HUB_REPO_RE = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")
BUILTIN_DATASETS = ("c4", "wikitext2")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def iso_datetime(value: Any) -> Any:
    """A date-time query parameter is ISO 8601 text, not a bare number (pydantic would take
    `0.5` as a Unix time; the OpenAPI says `date-time`)."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value
        raise ValueError("expected an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(iso_datetime)]


def is_hub_repo_id(value: str) -> bool:
    return bool(HUB_REPO_RE.match(value)) and "--" not in value and ".." not in value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Ratio = Annotated[float, Field(ge=0.0, le=0.95)]


class CalibrationSpec(Strict):
    source: str = Field(
        "c4",
        description="`c4`, `wikitext2`, or the id of a file uploaded with POST /v1/files",
        examples=["c4"],
    )
    num_samples: int = Field(128, ge=1, le=4096)
    seq_len: int = Field(2048, ge=16, le=32768)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v in BUILTIN_DATASETS or UUID_RE.match(v):
            return v
        raise ValueError(
            f"must be one of {', '.join(BUILTIN_DATASETS)} or an uploaded file id (a UUID)"
        )


class PruningSpec(Strict):
    percdamp: float = Field(0.01, gt=0.0, le=1.0, description="Hessian damping, share of mean diag")
    min_group: int = Field(64, ge=1, le=65536, description="smallest FFN channel group")
    gqa_policy: Literal["balanced", "group", "free"] | None = Field(
        None,
        description="`free`: any query heads (KV heads kept unless a group must empty; needs "
        "the `hetero` profile); `balanced`: the same number of query heads leaves every KV "
        "group; `group`: whole KV groups are dropped. Default: `free` with the `hetero` "
        "profile (the better model at equal size, docs/BENCHMARKS.md), `balanced` with "
        "`uniform`",
    )
    alpha: float = Field(0.25, ge=0.0, le=1.0, description="first-layer ratio = alpha * last")
    heads: Ratio | None = Field(None, description="explicit attention-head ratio per layer")
    ffn: Ratio | None = Field(None, description="explicit FFN-channel ratio per layer")
    preset: Literal["standard", "quality", "thorough"] = Field(
        "standard",
        description="`standard`: SlimGPT as published, with the pieces measured at least as "
        "good, for every model, placement and GPU count. `quality`: + Fisher selection (labels "
        "drawn from the model, 8 per token), the dense model's stream as the compensation "
        "target and per-layer widths from measured sensitivity: on SmolLM2-135M at equal size "
        "1.132x / 1.729x dense perplexity at 20% / 50% against 1.196x / 2.173x, for ~15x the "
        "pruning time (docs/BENCHMARKS.md). It needs the model resident on one GPU "
        "(`resources.gpus` 1, not streamed) and is not available for mixture-of-experts "
        "models or families that normalise a branch's output (Gemma 2/3, OLMo-2): such a job "
        "fails at once with `setting_unavailable`. `thorough`: `quality` with its per-layer "
        "widths refined by search on the whole model's divergence from the dense one, the "
        "best few allocations pruned for real: 1.699x dense perplexity at 50% (mean of eight "
        "calibration seeds) for ~5x `quality`'s time; the same limits, and the GPU must hold "
        "every layer's pruned weights at many widths (not an 8B model on one H200: such a job "
        "fails at once with `setting_unavailable`, suggesting `quality`)",
    )


class ExportSpec(Strict):
    profile: Literal["hetero", "uniform"] = Field(
        "hetero",
        description="`hetero`: exact per-layer widths (loads with trust_remote_code); `uniform`: "
        "the same widths in every layer, a plain Llama config (needs schedule `uniform`)",
    )


class HealSpec(Strict):
    """Optional recovery: distil the dense model into the pruned one on calibration text."""

    tokens: int = Field(1_000_000, ge=1_000, le=1_000_000_000,
                        description="training-token budget (bounds the healing time)")
    mode: Literal["lora", "full"] = Field(
        "lora", description="`lora`: low-rank adapters merged into the weights afterwards; "
        "`full`: the decoder layers' own weights")


class DestinationSpec(Strict):
    hub_repo_id: str | None = Field(
        None, description="publish to this Hub repo; absent = local artifacts only",
        examples=["my-org/smollm2-135m-slim20"],
    )
    private: bool = True
    create_pr: bool = False

    @field_validator("hub_repo_id")
    @classmethod
    def _repo(cls, v: str | None) -> str | None:
        if v is not None and not is_hub_repo_id(v):
            raise ValueError("is not a valid Hub repo id (expected `owner/name`)")
        return v


ZeroShotTask = Annotated[str, Field(min_length=1, max_length=100,
                                     pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]


class EvaluateSpec(Strict):
    perplexity: bool = Field(True, description="measure perplexity before and after pruning")
    eval_source: str | None = Field(
        None, description="`wikitext2` (default: the test split of Salesforce/wikitext, "
        "wikitext-2-raw-v1), `c4` (the validation shard 0 of allenai/c4) or the id of a file "
        "uploaded with POST /v1/files; fetched and cached like calibration data",
        examples=["wikitext2"],
    )
    num_windows: int = Field(16, ge=1, le=4096,
                             description="evaluation windows (consecutive, non-overlapping)")
    seq_len: int = Field(512, ge=16, le=32768,
                         description="tokens per evaluation window (capped at the model's "
                         "context length)")
    zero_shot_tasks: list[ZeroShotTask] | None = Field(
        None, max_length=16, description="lm-evaluation-harness tasks to measure the pruned "
        "model's zero-shot accuracy on (e.g. `arc_easy`, `hellaswag`, `piqa`); needs the "
        "`zeroshot` extra on the worker, and the tasks' datasets from the Hub or its cache",
        examples=[["arc_easy", "piqa"]])
    zero_shot_limit: int | None = Field(
        None, ge=1, le=100_000, description="at most this many examples per zero-shot task "
        "(the first ones; default: all)")

    @field_validator("eval_source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is None or v in BUILTIN_DATASETS or UUID_RE.match(v):
            return v
        raise ValueError(
            f"must be one of {', '.join(BUILTIN_DATASETS)} or an uploaded file id (a UUID)"
        )


class ResourcesSpec(Strict):
    gpus: int = Field(1, ge=1, le=8, description="GPUs of one host the job runs on (one job, "
                      "calibration windows split across them)")
    min_gpu_memory_gb: float | None = Field(
        None, gt=0, le=1024, description="only run on workers whose GPUs have at least this "
        "much memory")


ScheduleSpec = (
    Literal["log", "linear", "uniform"]
    | Annotated[list[Ratio], Field(min_length=1, max_length=1024)]
)


def _resolve_gqa_policy(pruning: PruningSpec, profile: str) -> None:
    """Fill the profile's default GQA policy; a plain (`uniform`) config cannot carry `free`."""
    if pruning.gqa_policy is None:
        pruning.gqa_policy = default_gqa_policy(plain_heads=profile == "uniform")
    elif pruning.gqa_policy == "free" and profile == "uniform":
        raise ValueError(
            "pruning.gqa_policy 'free' gives layers uneven head groups, which a plain config "
            "cannot describe: use export.profile 'hetero', or gqa_policy 'balanced' or 'group'")


def _check_preset(pruning: PruningSpec, resources: ResourcesSpec | None) -> None:
    """What the request alone shows a preset cannot have (the model's family and placement
    are checked by the worker, before it reads calibration text)."""
    from slimgpt_core.availability import unavailable  # torch-free
    from slimgpt_core.presets import preset_settings

    why = unavailable(preset_settings(pruning.preset), None,
                      world_size=resources.gpus if resources is not None else 1)
    if why is not None:
        raise ValueError(f"pruning.preset {pruning.preset!r}: {why}")


def _check_schedule_profile(schedule: Any, profile: str, explicit: bool) -> Any:
    """Profile `uniform` needs every layer equally wide: schedule `uniform` (set when no schedule
    was given), or an explicit list of equal ratios; another explicit schedule is a 422."""
    if profile != "uniform":
        return schedule
    if not explicit:
        return "uniform"
    if schedule == "uniform":
        return schedule
    if isinstance(schedule, list) and len(set(schedule)) == 1:
        return schedule
    raise ValueError(
        "export.profile 'uniform' needs the same width in every layer: use schedule 'uniform' "
        f"(or leave schedule out), not {schedule!r}"
    )


class JobCreate(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "HuggingFaceTB/SmolLM2-135M",
                    "revision": "main",
                    "target_ratio": 0.2,
                    "schedule": "log",
                    "calibration": {"source": "c4", "num_samples": 128, "seq_len": 2048,
                                    "seed": 0},
                    "pruning": {"percdamp": 0.01, "min_group": 64, "gqa_policy": "free"},
                    "export": {"profile": "hetero"},
                    "evaluate": {"perplexity": True, "eval_source": "wikitext2",
                                 "num_windows": 16, "seq_len": 512},
                }
            ]
        },
    )

    model_id: str = Field(
        ..., min_length=1, max_length=512,
        description="Hub repo id `owner/name`, or a folder relative to SLIMGPT_LOCAL_MODELS_DIR",
    )
    revision: str = Field("main", min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._/\-]+$")
    target_ratio: float = Field(..., gt=0.0, le=0.9,
                                description="share of decoder parameters to remove, in (0, 0.9]")
    schedule: ScheduleSpec = Field("log", description="`log`, `linear`, `uniform` or per-layer list")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    destination: DestinationSpec = Field(default_factory=DestinationSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    heal: HealSpec | None = Field(
        None, description="distil the dense model into the pruned one after pruning; absent = "
        "no healing")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        description="what the job needs; it is routed to a worker pool that has it, or refused "
        "at submission with the estimate that says why")

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str) -> str:
        if ".." in v or v.startswith("/") or v.endswith("/"):
            raise ValueError("is not a valid git revision")
        return v

    @model_validator(mode="after")
    def _profile(self) -> JobCreate:
        self.schedule = _check_schedule_profile(
            self.schedule, self.export.profile, "schedule" in self.model_fields_set
        )
        _resolve_gqa_policy(self.pruning, self.export.profile)
        _check_preset(self.pruning, self.resources)
        return self


class EstimateRequest(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "config": {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                               "num_attention_heads": 9, "num_key_value_heads": 3,
                               "intermediate_size": 1536, "vocab_size": 49152,
                               "tie_word_embeddings": True},
                    "target_ratio": 0.2,
                    "schedule": "log",
                }
            ]
        },
    )

    config: dict[str, Any] | None = Field(None, description="the model's config.json")
    model_id: str | None = Field(
        None, description="a local model folder (under SLIMGPT_LOCAL_MODELS_DIR) to read "
        "config.json from; Hub models need `config` (the API does not download)",
    )
    target_ratio: float = Field(..., gt=0.0, le=0.9)
    schedule: ScheduleSpec = "log"
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    resources: ResourcesSpec | None = Field(
        None, description="also say which worker pool would run a job with these resources")

    @model_validator(mode="after")
    def _one_source(self) -> EstimateRequest:
        if (self.config is None) == (self.model_id is None):
            raise ValueError("give exactly one of `config` or `model_id`")
        self.schedule = _check_schedule_profile(
            self.schedule, self.export.profile, "schedule" in self.model_fields_set
        )
        _resolve_gqa_policy(self.pruning, self.export.profile)
        _check_preset(self.pruning, self.resources)
        return self


class Progress(BaseModel):
    phase: str | None = None
    layer: int | None = None
    num_layers: int | None = None
    percent: float | None = None
    eta_s: float | None = None


class Open(BaseModel):
    """A response object whose listed fields are guaranteed; more may appear (forward
    compatible: a newer worker may add measurements)."""

    model_config = ConfigDict(extra="allow")


class EvaluationInfo(Open):
    source: str = Field(..., description="`wikitext2`, `c4` or `upload`")
    windows: int = Field(..., description="evaluation windows measured")
    seq_len: int = Field(..., description="tokens per window")
    tokens: int = Field(..., description="tokens measured (windows x seq_len)")
    dataset: str | None = Field(None, description="Hub dataset id, e.g. `Salesforce/wikitext`")
    config: str | None = Field(None, description="dataset configuration, e.g. "
                               "`wikitext-2-raw-v1`")
    split: str | None = Field(None, description="dataset split, e.g. `test`")
    file: str | None = Field(None, description="the dataset file read")
    revision: str | None = None
    sha256: str | None = Field(None, description="an uploaded file's content hash")
    file_id: str | None = Field(None, description="the uploaded file's id")
    perplexity_before: float | None = None
    perplexity_after: float | None = None


class ZeroShotResult(Open):
    acc: float | None = Field(None, description="accuracy")
    acc_stderr: float | None = None
    acc_norm: float | None = Field(None, description="length-normalized accuracy")
    acc_norm_stderr: float | None = None
    samples: int = Field(..., description="examples measured")
    dataset: str | None = Field(None, description="the task's Hub dataset id")
    config: str | None = None
    split: str | None = None
    num_fewshot: int = 0


class JobMetrics(Open):
    params_before: int | None = Field(None, description="parameters of the base model")
    params_after: int | None = Field(None, description="parameters of the pruned model")
    achieved_ratio: float | None = Field(None, description="share of decoder-layer "
                                         "parameters removed")
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    evaluation: EvaluationInfo | None = Field(None, description="what the perplexity was "
                                              "measured on")
    zero_shot: dict[str, ZeroShotResult] | None = Field(
        None, description="the pruned model's zero-shot accuracy per lm-eval task")
    resumed_from: int | None = Field(None, description="first layer pruned in the last "
                                     "attempt (earlier ones came from checkpoints)")
    seconds: dict[str, float] | None = Field(None, description="wall time per phase")
    verification: dict[str, Any] | None = Field(None, description="the reload check of the "
                                                "exported folder")
    error_code: str | None = None


class ResultFile(BaseModel):
    name: str
    size: int
    sha256: str


class JobResult(Open):
    location: str | None = Field(None, description="where the pruned model was published")
    artifact_prefix: str | None = None
    files: list[ResultFile] | None = None
    hub_repo_id: str | None = None
    hub_url: str | None = None
    hub_commit_url: str | None = None
    hub_commit_sha: str | None = None
    hub_pr_url: str | None = None


class JobLinks(BaseModel):
    self: str
    events: str
    artifacts: str
    cancel: str


class JobOut(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    cancel_requested: bool
    model_id: str
    model_source: Literal["hub", "local"]
    revision: str
    model_commit_sha: str | None = None
    progress: Progress
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    attempts: int
    metrics: JobMetrics | None = None
    result: JobResult | None = None
    error: str | None = Field(None, description="why the job failed, for people")
    error_code: str | None = Field(
        None, description="why the job failed, for programs: one of the worker's codes "
        "(`hub_offline`, `model_gated`, `cholesky_failed`, ...; see the API description)",
        examples=["hub_offline"])
    request: dict[str, Any] = Field(..., description="the normalized job request (every "
                                    "default filled in), as POST /v1/jobs takes it")
    links: JobLinks


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")


class EventOut(BaseModel):
    seq: int
    time: datetime
    state: str
    phase: str | None = None
    layer: int | None = None
    percent: float | None = None
    message: str
    metrics: dict[str, Any] | None = None


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    download_url: str


class ArtifactList(BaseModel):
    job_id: str
    items: list[ArtifactOut]


class FileOut(BaseModel):
    id: str
    filename: str
    format: Literal["text", "jsonl"]
    size: int
    sha256: str
    created_at: datetime


class FileList(BaseModel):
    items: list[FileOut]


class HubTokenIn(Strict):
    token: str = Field(..., min_length=8, max_length=1000, pattern=r"^[!-~]+$",
                       description="a Hugging Face access token (write-only)")


class HubTokenStatus(BaseModel):
    configured: bool
    updated_at: datetime | None = None


class ProblemFieldError(BaseModel):
    """One invalid input: where (a JSON pointer into the body, or a parameter or header name)
    and why."""

    pointer: str | None = Field(None, description="JSON pointer (RFC 6901) into the request "
                                "body, as a URI fragment", examples=["#/calibration/source"])
    parameter: str | None = Field(None, description="the query or path parameter")
    header: str | None = Field(None, description="the request header")
    detail: str
    type: str | None = Field(None, description="the kind of error, e.g. `missing`")


class Problem(BaseModel):
    """RFC 9457 problem details: every error answer of the API, as
    `application/problem+json`."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(..., description="`urn:slimgpt:error:<code>`")
    title: str = Field(..., description="the HTTP status phrase")
    status: int
    detail: str = Field(..., description="what went wrong, for people")
    code: str = Field(..., description="what went wrong, for programs (stable)",
                      examples=["invalid_request"])
    errors: list[ProblemFieldError] | None = Field(None, description="invalid inputs "
                                                   "(422), one per field")


ErrorOut = Problem  # the name routes used


class EstimateLayer(BaseModel):
    index: int
    ratio: float
    heads_removed: int
    kv_heads_removed: int
    channels_removed: int
    heads_kept: int
    kv_heads_kept: int
    channels_kept: int
    params_before: int
    params_after: int


class EstimateOut(Open):
    target_ratio: float
    achieved_ratio: float = Field(..., description="decoder-layer parameters removed")
    schedule: Any = Field(..., description="the schedule used (name or per-layer list)")
    gqa_policy: str
    r_first: float | None = None
    r_last: float | None = None
    decoder_params_before: int
    decoder_params_after: int
    total_params_before: int
    total_params_after: int
    uniform_widths: bool
    shape: dict[str, Any] = Field(..., description="the dense model's shape")
    layers: list[EstimateLayer]
    notes: list[str] = []
    export_profile: Literal["hetero", "uniform"]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(..., description="database, broker, worker: `ok`, "
                                   "`unreachable: ...`, `unavailable: ...`, ...")
