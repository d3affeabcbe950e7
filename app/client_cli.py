"""Client commands of `slimgpt` (typer + rich) that talk to a running service through
:mod:`app.client`: submit, batch, status, list, cancel, logs, download, artifacts, estimate,
files, hub-token, ready. Torch-free; the base install (httpx, typer, rich, PyYAML) is enough.

Connection options (``--url``, ``--api-key``, ``--json``, ``-q``, ``--timeout``) are accepted
before the subcommand and after it. Request options are named like `slimgpt prune`'s (shared
definitions in :mod:`slimgpt_core.cli_args`); ``--body FILE.json`` and ``--set key=value``
reach every request field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from slimgpt_core.cli_args import (
    AlphaOpt,
    CalibOpt,
    EvalOpt,
    EvalWindowsOpt,
    FfnRatioOpt,
    GpusOpt,
    GqaPolicyOpt,
    HeadRatioOpt,
    HealModeOpt,
    HealOpt,
    HealTokensOpt,
    MinGroupOpt,
    NsamplesOpt,
    PercdampOpt,
    PresetOpt,
    ProfileOpt,
    RevisionOpt,
    ScheduleOpt,
    SeedOpt,
    SeqlenOpt,
)

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_API = 3

EXIT_CODES_HELP = """\
exit codes:
  0  success (with --wait / batch: every job succeeded)
  1  a job failed or was cancelled (or, for batch, was rejected)
  2  usage error: bad arguments, unreadable or invalid input file, or a request the API
     rejected as invalid (HTTP 400/413/422)
  3  API or connection error: server unreachable, bad API key (401), not found (404),
     conflict (409), rate limited (429), server error or unavailable (5xx)
  130 interrupted (Ctrl-C; jobs keep running on the server)

connection: --url (env SLIMGPT_URL, default http://127.0.0.1:8000) and --api-key (env
SLIMGPT_API_KEY; else <SLIMGPT_DATA_DIR or ./.slimgpt>/api_key, which `slimgpt serve` writes
in embedded mode)."""

BATCH_HELP = """\
batch file (YAML):

  concurrency: 2              # optional; --concurrency overrides it
  defaults:                   # deep-merged into every job: any POST /v1/jobs field
    schedule: log
    calibration: {source: wikitext2, num_samples: 128, seq_len: 2048}
    export: {profile: hetero}
    calib_file: calib.txt     # optional: uploaded once (path relative to this file),
                              # used as calibration.source
  matrix:                     # every model x every ratio
    models: [HuggingFaceTB/SmolLM2-135M, HuggingFaceTB/SmolLM2-360M]
    ratios: [0.2, 0.3]
  jobs:                       # and/or explicit jobs, each deep-merged over defaults
    - model_id: my-local-model
      target_ratio: 0.25
      destination: {hub_repo_id: "my-org/{model}-slim{ratio_pct}"}

At least one of `matrix` or `jobs` is needed. In destination.hub_repo_id, {model} is the last
part of the model id and {ratio_pct} the ratio in percent. Every job is validated before any is
submitted; at most `concurrency` jobs are queued or running at once.

Re-running a batch resumes it: each row's Idempotency-Key is derived from the batch file and
the row, so rows already submitted return their existing jobs (an edited row is a new job), and
a calib_file already uploaded is reused."""


class UsageError(Exception):
    """Bad input found by the CLI itself (exit 2)."""


# -- connection and output ----------------------------------------------------------------------
@dataclass
class Conn:
    url: str | None = None
    api_key: str | None = None
    json: bool = False
    quiet: bool = False
    timeout_s: float | None = None

    def merged(self, **local: Any) -> Conn:
        """This (the options before the subcommand) overridden by the subcommand's own."""
        out = copy.copy(self)
        for key, value in local.items():
            if value not in (None, False):
                setattr(out, key, value)
        return out


UrlOpt = Annotated[str | None, typer.Option(
    "--url", help="API base URL (env SLIMGPT_URL; default http://127.0.0.1:8000)",
    rich_help_panel="Connection and output")]
ApiKeyOpt = Annotated[str | None, typer.Option(
    "--api-key", help="API key (env SLIMGPT_API_KEY; default <SLIMGPT_DATA_DIR>/api_key)",
    rich_help_panel="Connection and output", show_default=False)]
JsonOut = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout",
                                       rich_help_panel="Connection and output")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="no progress output on stderr",
                                        rich_help_panel="Connection and output")]
TimeoutOpt = Annotated[float | None, typer.Option(
    "--timeout", help="HTTP timeout in seconds (default 30)",
    rich_help_panel="Connection and output")]
PollOpt = Annotated[float, typer.Option("--poll", help="seconds between status polls")]
BodyOpt = Annotated[Path | None, typer.Option(
    "--body", metavar="FILE.json", help="the request body (JSON); options and --set apply "
    "on top", rich_help_panel="Request")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", help="set any request field, e.g. --set "
    "pruning.percdamp=0.05 (VALUE is JSON, else a string); repeatable",
    rich_help_panel="Request")]


def _conn(ctx: typer.Context, **local: Any) -> Conn:
    base = ctx.find_root().obj if isinstance(ctx.find_root().obj, Conn) else Conn()
    return base.merged(**local)


def _resolve_api_key(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    env = os.environ.get("SLIMGPT_API_KEY")
    if env:
        return env.strip()
    path = Path(os.environ.get("SLIMGPT_DATA_DIR", ".slimgpt")) / "api_key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _client(conn: Conn) -> Any:
    from app.client import DEFAULT_URL, SlimGPTClient

    url = conn.url or os.environ.get("SLIMGPT_URL") or DEFAULT_URL
    return SlimGPTClient(url, _resolve_api_key(conn.api_key), timeout=conn.timeout_s or 30.0,
                         retries=int(os.environ.get("SLIMGPT_CLIENT_RETRIES", "2")))


def _stdout() -> Any:
    from rich.console import Console

    # Not a terminal (a pipe, a test): wide enough that a table row never wraps.
    tty = sys.stdout.isatty()
    return Console(file=sys.stdout, width=None if tty else 250, highlight=False,
                   soft_wrap=not tty)


def _stderr() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def _note(conn: Conn, message: str) -> None:
    if not conn.json and not conn.quiet:
        print(message, file=sys.stderr, flush=True)


@contextmanager
def _guarded() -> Iterator[None]:
    """Map exceptions to the documented exit codes, with a one-line message on stderr."""
    from app.client import ApiError, ConnectionFailed

    try:
        yield
    except UsageError as err:
        print(f"slimgpt: error: {err}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    except ConnectionFailed as err:
        print(f"slimgpt: {err}", file=sys.stderr)
        raise typer.Exit(EXIT_API) from None
    except ApiError as err:
        code = f" [{err.code}]" if err.code else ""
        print(f"slimgpt: API error{code}: {err}", file=sys.stderr)
        for e in err.errors:
            print(f"  {e.get('pointer') or e.get('loc') or ''}: {e.get('detail') or e.get('msg')}",
                  file=sys.stderr)
        raise typer.Exit(EXIT_USAGE if err.status in (400, 413, 422) else EXIT_API) from None
    except TimeoutError as err:
        print(f"slimgpt: {err}", file=sys.stderr)
        raise typer.Exit(EXIT_API) from None
    except KeyboardInterrupt:
        print("\nslimgpt: interrupted (jobs keep running on the server)", file=sys.stderr)
        raise typer.Exit(130) from None


def _emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _job_exit(job: dict[str, Any]) -> int:
    return EXIT_OK if job["state"] == "succeeded" else EXIT_JOB_FAILED


# -- progress -------------------------------------------------------------------------------------
def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f" eta {seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f" eta {seconds}s"


def _phase_text(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    phase = p.get("phase") or job["state"]
    where = ""
    if phase == "pruning" and p.get("layer") is not None and p.get("num_layers"):
        where = f" layer {int(p['layer']) + 1}/{p['num_layers']}"
    return f"{job['state']}: {phase}{where}"


class ProgressBar:
    """A rich progress bar on stderr; where stderr is not a terminal, one line per phase or
    layer change instead (logs stay readable)."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last_key: tuple[Any, ...] | None = None
        self._progress: Any = None
        self._task: Any = None

    def update(self, job: dict[str, Any]) -> None:
        if not self.enabled:
            return
        p = job.get("progress") or {}
        pct = float(p.get("percent") or 0.0)
        text = f"{self.label} {_phase_text(job)}"
        if self.tty:
            if self._progress is None:
                from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

                self._progress = Progress(BarColumn(), TaskProgressColumn(),
                                          TextColumn("{task.description}"),
                                          console=_stderr(), transient=False)
                self._progress.start()
                self._task = self._progress.add_task(text, total=100.0)
            self._progress.update(self._task, completed=pct,
                                  description=text + _fmt_eta(p.get("eta_s")))
        else:
            key = (job["state"], p.get("phase"), p.get("layer"))
            if key != self._last_key:
                self._last_key = key
                print(f"{pct:5.1f}% {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# -- formatting -----------------------------------------------------------------------------------
def _metric(job: dict[str, Any], *names: str) -> Any:
    metrics = job.get("metrics") or {}
    for name in names:
        if metrics.get(name) is not None:
            return metrics[name]
    return None


def _params(job: dict[str, Any]) -> str:
    before, after = _metric(job, "params_before"), _metric(job, "params_after")
    if before is None or after is None:
        return ""
    return f"{before / 1e6:.1f}M->{after / 1e6:.1f}M"


def _ppl(job: dict[str, Any]) -> str:
    before = _metric(job, "perplexity_before", "ppl_before")
    after = _metric(job, "perplexity_after", "ppl_after")
    if before is None or after is None:
        return ""
    return f"{float(before):.2f}->{float(after):.2f}"


def _result_location(job: dict[str, Any]) -> str:
    result = job.get("result") or {}
    for key in ("hub_url", "artifact_dir", "location", "path"):
        if result.get(key):
            return str(result[key])
    return ""


def _describe(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    lines = [
        f"job        {job['id']}",
        f"state      {job['state']}" + (" (cancel requested)" if job.get("cancel_requested") else ""),
        f"model      {job['model_id']} @ {job.get('revision', 'main')}",
        f"ratio      {job.get('request', {}).get('target_ratio')}",
        f"phase      {p.get('phase') or ''}"
        + (f" layer {int(p['layer']) + 1}/{p['num_layers']}"
           if p.get("layer") is not None and p.get("num_layers") else "")
        + (f" ({p['percent']:.1f}%)" if p.get("percent") is not None else ""),
        f"created    {job.get('created_at')}",
    ]
    if job.get("duration_s") is not None:
        lines.append(f"duration   {job['duration_s']:.1f} s")
    if _params(job):
        lines.append(f"params     {_params(job)}")
    if _ppl(job):
        evaluation = _metric(job, "evaluation") or {}
        on = f" ({evaluation['source']})" if isinstance(evaluation, dict) and \
            evaluation.get("source") else ""
        lines.append(f"perplexity {_ppl(job)}{on}")
    if _result_location(job):
        lines.append(f"result     {_result_location(job)}")
    if job.get("error"):
        lines.append(f"error      {job['error']}")
    return "\n".join(lines)


def _print_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    from rich import box
    from rich.table import Table

    table = Table(*headers, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title,
                  header_style="bold")
    for row in rows:
        table.add_row(*row)
    _stdout().print(table)


def _event_line(ev: dict[str, Any]) -> str:
    where = f" layer {ev['layer']}" if ev.get("layer") is not None else ""
    pct = f" {ev['percent']:5.1f}%" if ev.get("percent") is not None else ""
    return (f"{ev['seq']:>5} {str(ev['time'])[:19]} {ev['state']:<9} "
            f"{ev.get('phase') or '-'}{where}{pct} {ev['message']}")


# -- request building -----------------------------------------------------------------------------
def parse_schedule(value: str | None) -> Any:
    if value is None:
        return None
    if value in ("log", "linear", "uniform"):
        return value
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--schedule: expected log, linear, uniform or comma-separated ratios, "
                         f"not {value!r}") from None


def read_body(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"--body {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--body {path}: not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise UsageError(f"--body {path}: expected a JSON object")
    return body


def apply_sets(body: dict[str, Any], assignments: list[str] | None) -> dict[str, Any]:
    """``--set a.b=value``: the dotted path is created as needed; the value is parsed as JSON
    (numbers, true/false/null, lists, objects) and taken as a plain string otherwise."""
    out = copy.deepcopy(body)
    for item in assignments or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. pruning.percdamp=0.05")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UsageError(f"--set {item!r}: {part} is not an object")
            node = child
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    """Drop unset (None) options and the sections they leave empty."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            value = _prune(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def _errors_text(err: Any) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                     for e in err.errors())


def validate_job(body: dict[str, Any], where: str) -> None:
    """Check a job body against the API's own schema before sending anything."""
    from pydantic import ValidationError

    from app.schemas import JobCreate

    try:
        JobCreate.model_validate(body)
    except ValidationError as err:
        raise UsageError(f"{where}: {_errors_text(err)}") from None


def _ratio_in_range(value: float | None, flag: str = "--ratio") -> None:
    if value is not None and not 0.0 < value <= 0.9:
        raise typer.BadParameter(f"{value} is outside (0, 0.9]", param_hint=f"'{flag}'")


# -- commands -------------------------------------------------------------------------------------
def _wait_with_progress(client: Any, job: dict[str, Any], conn: Conn, poll: float,
                        timeout: float | None, label: str | None = None) -> dict[str, Any]:
    bar = ProgressBar(label or job["id"][:8], enabled=not conn.json and not conn.quiet)
    try:
        return client.wait(job["id"], poll_s=poll, timeout=timeout, on_update=bar.update)
    finally:
        bar.close()


def submit(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(
        "--model", help="Hub repo id `owner/name`, or a folder under the server's "
        "SLIMGPT_LOCAL_MODELS_DIR")] = None,
    ratio: Annotated[float | None, typer.Option(
        "--ratio", help="share of decoder-layer parameters to remove, in (0, 0.9]")] = None,
    revision: RevisionOpt = None,
    schedule: ScheduleOpt = None,
    alpha: AlphaOpt = None,
    gqa_policy: GqaPolicyOpt = None,
    head_ratio: HeadRatioOpt = None,
    ffn_ratio: FfnRatioOpt = None,
    percdamp: PercdampOpt = None,
    min_group: MinGroupOpt = None,
    preset: PresetOpt = None,
    profile: ProfileOpt = None,
    calib: CalibOpt = None,
    calib_source: Annotated[str | None, typer.Option(
        "--calib-source", help="c4, wikitext2 or an uploaded file id (default c4)",
        rich_help_panel="Calibration and evaluation")] = None,
    nsamples: NsamplesOpt = None,
    seqlen: SeqlenOpt = None,
    seed: SeedOpt = None,
    eval_file: EvalOpt = None,
    eval_source: Annotated[str | None, typer.Option(
        "--eval-source", help="c4, wikitext2 or an uploaded file id (default wikitext2)",
        rich_help_panel="Calibration and evaluation")] = None,
    eval_windows: EvalWindowsOpt = None,
    eval_seqlen: Annotated[int | None, typer.Option(
        "--eval-seqlen", min=16, help="tokens per evaluation window",
        rich_help_panel="Calibration and evaluation")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="skip the perplexity evaluation",
                                          rich_help_panel="Calibration and evaluation")] = False,
    hub_repo: Annotated[str | None, typer.Option(
        "--hub-repo", help="publish to this Hub repo (owner/name)",
        rich_help_panel="Destination")] = None,
    private: Annotated[bool | None, typer.Option(
        "--private/--public", help="visibility of a Hub repo the job creates (default private)",
        rich_help_panel="Destination")] = None,
    create_pr: Annotated[bool | None, typer.Option(
        "--create-pr", help="open a pull request on the Hub repo instead of pushing to main",
        rich_help_panel="Destination")] = None,
    gpus: GpusOpt = None,
    min_gpu_memory_gb: Annotated[float | None, typer.Option(
        "--min-gpu-memory-gb", help="only workers whose GPUs have at least this much memory",
        rich_help_panel="Scale")] = None,
    heal: HealOpt = False,
    heal_tokens: HealTokensOpt = None,
    heal_mode: HealModeOpt = None,
    body_file: BodyOpt = None,
    sets: SetOpt = None,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", help="resubmitting with the same key returns the same job")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="wait for the job to end, showing progress; exit 1 unless it "
        "succeeds")] = False,
    wait_timeout: Annotated[float | None, typer.Option(
        "--wait-timeout", help="give up waiting after this many seconds (exit 3)")] = None,
    poll: PollOpt = 1.0,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """Submit a pruning job to a running service."""
    _ratio_in_range(ratio)
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded():
        if calib and calib_source:
            raise UsageError("give --calib FILE or --calib-source, not both")
        if eval_file and eval_source:
            raise UsageError("give --eval FILE or --eval-source, not both")
        for flag, path in (("--calib", calib), ("--eval", eval_file)):
            if path and not Path(path).is_file():
                raise UsageError(f"{flag}: no such file {path}")
        flags = _prune({
            "model_id": model, "target_ratio": ratio, "revision": revision,
            "schedule": parse_schedule(schedule),
            "pruning": {"alpha": alpha, "gqa_policy": gqa_policy.value if gqa_policy else None,
                        "heads": head_ratio, "ffn": ffn_ratio, "percdamp": percdamp,
                        "min_group": min_group, "preset": preset.value if preset else None},
            "export": {"profile": profile.value if profile else None},
            "calibration": {"source": calib_source, "num_samples": nsamples,
                            "seq_len": seqlen, "seed": seed},
            "evaluate": {"perplexity": False if no_eval else None, "eval_source": eval_source,
                         "num_windows": eval_windows, "seq_len": eval_seqlen},
            "destination": {"hub_repo_id": hub_repo, "private": private,
                            "create_pr": create_pr},
            "resources": {"gpus": gpus, "min_gpu_memory_gb": min_gpu_memory_gb},
            # `mode` always set, so that a bare --heal survives the dropping of unset options.
            "heal": ({"tokens": heal_tokens, "mode": heal_mode.value if heal_mode else "lora"}
                     if heal or heal_tokens or heal_mode else None),
        })
        body = apply_sets(deep_merge(read_body(body_file), flags), sets)
        for field, flag in (("model_id", "--model"), ("target_ratio", "--ratio")):
            if field not in body:
                raise UsageError(f"missing {flag} (or `{field}` in --body / --set)")
        placeholder = "00000000-0000-0000-0000-000000000000"  # stands in for a file to upload
        check = copy.deepcopy(body)
        if calib:
            check.setdefault("calibration", {})["source"] = placeholder
        if eval_file:
            check.setdefault("evaluate", {})["eval_source"] = placeholder
        validate_job(check, "request")
        with _client(conn) as client:
            for path, section, field in ((calib, "calibration", "source"),
                                         (eval_file, "evaluate", "eval_source")):
                if path:
                    uploaded = client.ensure_file(path)
                    body.setdefault(section, {})[field] = uploaded["id"]
                    _note(conn, f"uploaded {path} as {uploaded['id']}")
            job = client.submit_job(body, idempotency_key=idempotency_key)
            _note(conn, f"submitted job {job['id']} ({job['state']})")
            if not wait:
                if conn.json:
                    _emit_json(job)
                else:
                    print(job["id"])
                return EXIT_OK
            job = _wait_with_progress(client, job, conn, poll, wait_timeout)
        if conn.json:
            _emit_json(job)
        else:
            print(_describe(job))
        return _job_exit(job)


def status(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="the job's id")],
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """Show a job."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded(), _client(conn) as client:
        job = client.get_job(job_id)
    if conn.json:
        _emit_json(job)
    else:
        print(_describe(job))
    return EXIT_OK


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


def list_jobs(
    ctx: typer.Context,
    state: Annotated[JobState | None, typer.Option("--state", help="only jobs in this "
                                                      "state")] = None,
    model: Annotated[str | None, typer.Option("--model", help="only jobs of this model "
                                                 "id")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many")] = 50,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """List jobs, newest first."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded(), _client(conn) as client:
        jobs = list(client.list_jobs(state=state.value if state else None, model_id=model,
                                     limit=limit))
    if conn.json:
        _emit_json(jobs)
        return EXIT_OK
    _print_table(["job", "state", "model", "ratio", "progress", "created"], [
        [j["id"], j["state"], j["model_id"], str(j.get("request", {}).get("target_ratio", "")),
         f"{(j.get('progress') or {}).get('percent') or 0:.0f}%",
         str(j.get("created_at", ""))[:19]] for j in jobs])
    return EXIT_OK


def cancel(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="the job's id")],
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """Cancel a job (it stops at the next layer boundary)."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded(), _client(conn) as client:
        job = client.cancel_job(job_id)
    if conn.json:
        _emit_json(job)
    elif job["state"] == "cancelled":
        print(f"job {job['id']} cancelled")
    else:
        print(f"cancel requested for job {job['id']} ({job['state']}); it stops at the next layer")
    return EXIT_OK


def logs(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="the job's id")],
    follow: Annotated[bool, typer.Option(
        "-f", "--follow", help="stream until the job ends (SSE; resumes after disconnects); "
        "exit 1 unless it succeeded")] = False,
    since: Annotated[int | None, typer.Option(
        "--since", metavar="SEQ", min=0, help="only events after this sequence number")] = None,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """A job's events; --follow streams them live."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded(), _client(conn) as client:
        if not follow:
            for ev in client.list_events(job_id, after=since or 0):
                print(json.dumps(ev, default=str) if conn.json else _event_line(ev))
            return EXIT_OK
        for event in client.stream_events(job_id, last_event_id=since):
            print(json.dumps(event.data, default=str) if conn.json else _event_line(event.data),
                  flush=True)
        job = client.get_job(job_id)
    return _job_exit(job)


def download(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="the job's id")],
    dest: Annotated[Path, typer.Argument(help="destination folder")],
    names: Annotated[list[str] | None, typer.Option(
        "--name", help="only this artifact (repeatable); see `slimgpt artifacts JOB`")] = None,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """Download a job's artifacts (streamed, SHA-256 checked)."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded(), _client(conn) as client:
        job = client.get_job(job_id)
        if job["state"] != "succeeded":
            _note(conn, f"slimgpt: job {job_id} is {job['state']}, not succeeded; downloading "
                  "whatever artifacts it has")
        paths = client.download_artifacts(
            job_id, dest, names=names,
            on_file=lambda name, size: _note(conn, f"  {name} ({size:,} bytes)"))
    if conn.json:
        _emit_json({"job_id": job_id, "dest": str(dest), "files": [str(p) for p in paths]})
    else:
        print(f"downloaded {len(paths)} files to {dest}")
    return EXIT_OK if paths else EXIT_JOB_FAILED


def artifacts(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(help="the job's id")],
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """List the files a job produced (name, size, SHA-256)."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded(), _client(conn) as client:
        items = client.list_artifacts(job_id)
    if conn.json:
        _emit_json(items)
    else:
        _print_table(["name", "size", "sha256"],
                     [[i["name"], f"{i['size']:,}", i["sha256"][:16]] for i in items])
    return EXIT_OK


def estimate(
    ctx: typer.Context,
    ratio: Annotated[float | None, typer.Option(
        "--ratio", help="share of decoder-layer parameters to remove, in (0, 0.9]")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", metavar="CONFIG.json", help="the model's config.json")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="a model folder under the server's SLIMGPT_LOCAL_MODELS_DIR")] = None,
    schedule: ScheduleOpt = None,
    alpha: AlphaOpt = None,
    gqa_policy: GqaPolicyOpt = None,
    head_ratio: HeadRatioOpt = None,
    ffn_ratio: FfnRatioOpt = None,
    profile: ProfileOpt = None,
    body_file: BodyOpt = None,
    sets: SetOpt = None,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """Dry run: the per-layer widths and parameter counts a job would produce."""
    _ratio_in_range(ratio)
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded():
        cfg = None
        if config is not None:
            cfg = read_body(config) if config.is_file() else None
            if cfg is None:
                raise UsageError(f"--config: no such file {config}")
        body = apply_sets(deep_merge(read_body(body_file), _prune({
            "config": cfg, "model_id": model, "target_ratio": ratio,
            "schedule": parse_schedule(schedule),
            "pruning": {"alpha": alpha, "gqa_policy": gqa_policy.value if gqa_policy else None,
                        "heads": head_ratio, "ffn": ffn_ratio},
            "export": {"profile": profile.value if profile else None},
        })), sets)
        with _client(conn) as client:
            plan = client.estimate(body)
    if conn.json:
        _emit_json(plan)
        return EXIT_OK
    before, after = plan["total_params_before"], plan["total_params_after"]
    print(f"parameters: {before:,} -> {after:,} ({1 - after / before:.1%} fewer); decoder "
          f"layers {plan['achieved_ratio']:.2%} removed (target {plan['target_ratio']:.2%}), "
          f"schedule {plan['schedule']}")
    keys = ["index", "ratio", "heads_kept", "kv_heads_kept", "channels_kept", "params_after"]
    _print_table(["layer", "ratio", "heads", "kv heads", "FFN channels", "params"], [
        [str(row[k]) if k != "ratio" else f"{row[k]:.3f}" for k in keys]
        for row in plan["layers"]])
    for note in plan.get("notes") or []:
        print(f"note: {note}")
    return EXIT_OK


# -- files and the Hub token ---------------------------------------------------------------------
files_app = typer.Typer(help="uploaded calibration/evaluation files", no_args_is_help=True)


def _file_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    return [[f["id"], f["filename"], f["format"], f"{f['size']:,}", str(f["created_at"])[:19]]
            for f in items]


@files_app.command("upload")
def files_upload(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="a .txt file, or .jsonl with a 'text' field")],
    reuse: Annotated[bool, typer.Option(
        "--reuse/--no-reuse", help="return an earlier upload with the same content")] = True,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """Upload a text or jsonl file; prints its id (use it as calibration.source or
    evaluate.eval_source)."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded():
        if not path.is_file():
            raise UsageError(f"no such file {path}")
        with _client(conn) as client:
            record = client.ensure_file(path) if reuse else client.upload_file(path)
    if conn.json:
        _emit_json(record)
    else:
        print(record["id"])
    return EXIT_OK


@files_app.command("list")
def files_list(
    ctx: typer.Context,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """List uploaded files, newest first."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded(), _client(conn) as client:
        items = client.list_files()
    if conn.json:
        _emit_json(items)
    else:
        _print_table(["id", "filename", "format", "size", "created"], _file_rows(items))
    return EXIT_OK


@files_app.command("show")
def files_show(
    ctx: typer.Context, file_id: Annotated[str, typer.Argument(help="the file's id")],
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """An uploaded file's metadata."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded(), _client(conn) as client:
        record = client.get_file(file_id)
    if conn.json:
        _emit_json(record)
    else:
        _print_table(["id", "filename", "format", "size", "created"], _file_rows([record]))
    return EXIT_OK


hub_token_app = typer.Typer(help="the tenant's Hugging Face token (write-only)",
                            no_args_is_help=True)


@hub_token_app.command("set")
def hub_token_set(
    ctx: typer.Context,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="HF_TOKEN", help="the token (env HF_TOKEN; prompted for when "
        "absent, never echoed)", show_default=False)] = None,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """Store (or replace) the Hub token jobs use to read gated models and publish."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    if token is None:
        token = typer.prompt("Hugging Face token", hide_input=True)
    with _guarded(), _client(conn) as client:
        client.set_hub_token(token.strip())
        state = client.hub_token_status()
    _emit_json(state) if conn.json else print("Hub token stored")
    return EXIT_OK


@hub_token_app.command("status")
def hub_token_status(
    ctx: typer.Context,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """Whether a Hub token is stored (the token itself is never shown)."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded(), _client(conn) as client:
        state = client.hub_token_status()
    if conn.json:
        _emit_json(state)
    else:
        print(f"configured (updated {state['updated_at']})" if state["configured"]
              else "not configured")
    return EXIT_OK


@hub_token_app.command("delete")
def hub_token_delete(
    ctx: typer.Context,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """Forget the stored Hub token."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded(), _client(conn) as client:
        client.delete_hub_token()
    _emit_json({"configured": False}) if conn.json else print("Hub token deleted")
    return EXIT_OK


def ready(
    ctx: typer.Context,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """Whether the service can take jobs (database, broker, worker); exit 3 if not."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded(), _client(conn) as client:
        state = client.ready()
    if conn.json:
        _emit_json(state)
    else:
        print(state.get("status"))
        for name, value in (state.get("checks") or {}).items():
            print(f"  {name:<9} {value}")
    return EXIT_OK if state.get("status") == "ready" else EXIT_API


# -- batch ----------------------------------------------------------------------------------------
def load_batch(path: str | Path) -> tuple[list[dict[str, Any]], int | None]:
    """Read a batch file: ``(items, concurrency)``; each item is ``{"body", "calib_file",
    "where", "key"}``. Raises :class:`UsageError` with the offending entry for anything
    invalid."""
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: expected a mapping with `defaults`, `matrix` and/or `jobs`")
    unknown = set(doc) - {"defaults", "matrix", "jobs", "concurrency"}
    if unknown:
        raise UsageError(f"{path}: unknown top-level keys {sorted(unknown)}")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UsageError(f"{path}: `defaults` must be a mapping")
    concurrency = doc.get("concurrency")
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise UsageError(f"{path}: `concurrency` must be a positive integer")

    raw: list[tuple[str, dict[str, Any]]] = []
    matrix = doc.get("matrix")
    if matrix is not None:
        if not isinstance(matrix, dict) or set(matrix) != {"models", "ratios"}:
            raise UsageError(f"{path}: `matrix` needs exactly `models` and `ratios` lists")
        models, ratios = matrix["models"], matrix["ratios"]
        if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
            raise UsageError(f"{path}: matrix.models must be a non-empty list of model ids")
        if not isinstance(ratios, list) or not ratios:
            raise UsageError(f"{path}: matrix.ratios must be a non-empty list of numbers")
        for m in models:
            for r in ratios:
                raw.append((f"matrix[{m}, {r}]", {"model_id": m, "target_ratio": r}))
    jobs = doc.get("jobs")
    if jobs is not None:
        if not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
            raise UsageError(f"{path}: `jobs` must be a list of mappings")
        raw += [(f"jobs[{i}]", j) for i, j in enumerate(jobs)]
    if not raw:
        raise UsageError(f"{path}: no jobs (give `matrix` and/or `jobs`)")

    items = []
    for where, entry in raw:
        body = deep_merge(defaults, entry)
        calib_file = body.pop("calib_file", None)
        calib_sha = None
        if calib_file is not None:
            calib_path = (p.parent / str(calib_file)).resolve()
            if not calib_path.is_file():
                raise UsageError(f"{path}: {where}: calib_file {calib_file} does not exist")
            calib_file = str(calib_path)
            calib_sha = hashlib.sha256(calib_path.read_bytes()).hexdigest()
        dest = body.get("destination")
        if isinstance(dest, dict) and isinstance(dest.get("hub_repo_id"), str):
            ratio = body.get("target_ratio")
            try:
                dest["hub_repo_id"] = dest["hub_repo_id"].format(
                    model=str(body.get("model_id", "")).rstrip("/").split("/")[-1],
                    ratio_pct=round(float(ratio) * 100) if ratio is not None else "")
            except (KeyError, ValueError, IndexError) as err:
                raise UsageError(f"{path}: {where}: bad placeholder in hub_repo_id ({err})") from None
        check = body if calib_file is None else deep_merge(body, {"calibration": {"source": "c4"}})
        validate_job(check, f"{path}: {where}")
        items.append({"body": body, "calib_file": calib_file, "where": where,
                      "key": batch_key(p, where, body, calib_sha)})
    return items, concurrency


def batch_key(path: Path, where: str, body: dict[str, Any], calib_sha: str | None) -> str:
    """The row's Idempotency-Key: the batch file (resolved path), the row, and what the row asks
    for (a calib_file by its content). Re-running the file gives the same keys; an edited row a
    new one (a new job rather than a 409)."""
    material = json.dumps({"file": str(path.resolve()), "row": where, "body": body,
                           "calib_sha256": calib_sha}, sort_keys=True, default=str)
    return "batch-" + hashlib.sha256(material.encode()).hexdigest()[:40]


def batch(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="the batch YAML file")],
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", min=1, help="jobs queued or running at once (default: the file's, "
        "else 2)")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="validate and print the job bodies without submitting")] = False,
    poll: PollOpt = 1.0,
    url: UrlOpt = None, api_key: ApiKeyOpt = None, json_out: JsonOut = False,
    quiet: QuietOpt = False, timeout: TimeoutOpt = None,
) -> int:
    """Run many models x ratios from a YAML file (re-running it resumes)."""
    conn = _conn(ctx, url=url, api_key=api_key, json=json_out, quiet=quiet, timeout_s=timeout)
    with _guarded():
        return _run_batch(conn, file, concurrency, dry_run, poll)


def _run_batch(conn: Conn, file: Path, concurrency_opt: int | None, dry_run: bool,
               poll: float) -> int:
    from app.client import TERMINAL_STATES, ApiError, ConnectionFailed

    items, file_concurrency = load_batch(file)
    concurrency = concurrency_opt or file_concurrency or 2
    if dry_run:
        if conn.json:
            _emit_json([i["body"] for i in items])
        else:
            for i in items:
                print(json.dumps(i["body"], sort_keys=True))
        return EXIT_OK

    def log(msg: str) -> None:
        _note(conn, msg)

    results: list[dict[str, Any]] = [{"model_id": i["body"].get("model_id"),
                                      "target_ratio": i["body"].get("target_ratio"),
                                      "job_id": None, "state": "pending", "job": None,
                                      "error": None, "resumed": False} for i in items]
    pending = deque(range(len(items)))
    active: dict[str, int] = {}
    uploaded: dict[str, str] = {}
    max_active = 0
    start = time.monotonic()
    with _client(conn) as client:
        while pending or active:
            while pending and len(active) < concurrency:
                idx = pending.popleft()
                item, res = items[idx], results[idx]
                body = copy.deepcopy(item["body"])
                label = f"[{idx + 1}/{len(items)}] {res['model_id']} @ {res['target_ratio']}"
                try:
                    if item["calib_file"]:
                        if item["calib_file"] not in uploaded:
                            uploaded[item["calib_file"]] = client.ensure_file(
                                item["calib_file"])["id"]
                        body.setdefault("calibration", {})["source"] = uploaded[item["calib_file"]]
                    job, resumed = client.submit_job_or_replay(body, idempotency_key=item["key"])
                except ConnectionFailed:
                    raise
                except ApiError as err:
                    res.update(state="rejected", error=str(err.detail))
                    log(f"{label}: rejected: {err.detail}")
                    continue
                res.update(job_id=job["id"], state=job["state"], job=job, resumed=resumed)
                log(f"{label}: {'resumed' if resumed else 'submitted'} {job['id']}"
                    + (f" ({job['state']})" if resumed else ""))
                if job["state"] in TERMINAL_STATES:
                    res["error"] = job.get("error")
                    continue
                active[job["id"]] = idx
                max_active = max(max_active, len(active))
            if not active:
                continue
            time.sleep(poll)
            for job_id, idx in list(active.items()):
                job = client.get_job(job_id)
                res = results[idx]
                if job["state"] != res["state"]:
                    p = job.get("progress") or {}
                    log(f"[{idx + 1}/{len(items)}] {res['model_id']} @ {res['target_ratio']}: "
                        f"{job['state']}" + (f" ({p.get('phase')})" if p.get("phase") else ""))
                res.update(state=job["state"], job=job, error=job.get("error"))
                if job["state"] in TERMINAL_STATES:
                    del active[job_id]
    elapsed = time.monotonic() - start
    counts: dict[str, int] = {}
    for res in results:
        counts[res["state"]] = counts.get(res["state"], 0) + 1
    ok = all(r["state"] == "succeeded" for r in results)
    if conn.json:
        _emit_json({"jobs": [{k: v for k, v in r.items() if k != "job"}
                             | {"metrics": (r["job"] or {}).get("metrics"),
                                "result": (r["job"] or {}).get("result"),
                                "duration_s": (r["job"] or {}).get("duration_s")}
                             for r in results],
                    "counts": counts, "concurrency": concurrency, "max_active": max_active,
                    "resumed": sum(r["resumed"] for r in results),
                    "elapsed_s": round(elapsed, 3)})
    else:
        rows = []
        for r in results:
            job = r["job"] or {}
            dur = job.get("duration_s")
            rows.append([r["model_id"] or "", str(r["target_ratio"]), r["state"],
                         r["job_id"] or "-", _params(job), _ppl(job),
                         f"{dur:.0f}s" if dur is not None else "",
                         (r["error"] or "")[:60]])
        _print_table(["model", "ratio", "state", "job", "params", "perplexity", "time", "error"],
                     rows)
        print(f"\n{len(results)} jobs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
              + f" in {elapsed:.0f} s (concurrency {concurrency})")
    return EXIT_OK if ok else EXIT_JOB_FAILED


# -- registration ---------------------------------------------------------------------------------
def add_client_commands(app: typer.Typer) -> None:
    """Register the client subcommands on the `slimgpt` app."""
    epilog = EXIT_CODES_HELP.replace("\n", "\n\n")
    for name, fn, extra in (
        ("submit", submit, {}),
        ("batch", batch, {"help": f"{batch.__doc__}\n\n{BATCH_HELP}"}),
        ("status", status, {}),
        ("list", list_jobs, {}),
        ("cancel", cancel, {}),
        ("logs", logs, {}),
        ("download", download, {}),
        ("artifacts", artifacts, {}),
        ("estimate", estimate, {}),
        ("ready", ready, {}),
    ):
        app.command(name, epilog=epilog, rich_help_panel="Client (talks to a running "
                    "service)", **extra)(fn)
    app.add_typer(files_app, name="files", rich_help_panel="Client (talks to a running service)")
    app.add_typer(hub_token_app, name="hub-token",
                  rich_help_panel="Client (talks to a running service)")


__all__ = [
    "EXIT_API", "EXIT_JOB_FAILED", "EXIT_OK", "EXIT_USAGE", "ProgressBar", "UsageError",
    "add_client_commands", "apply_sets", "batch_key", "load_batch",
]
