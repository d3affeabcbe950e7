"""Client subcommands of `slimgpt` (submit, batch, status, list, cancel, logs, download) that talk
to a running service through :mod:`app.client`. Torch-free; only httpx and PyYAML are needed."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

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
     conflict (409), server error (5xx)
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
submitted; at most `concurrency` jobs are queued or running at once."""


class UsageError(Exception):
    """Bad input found by the CLI itself (exit 2)."""


# -- connection ---------------------------------------------------------------------------------
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


def _client(args: argparse.Namespace) -> Any:
    from app.client import DEFAULT_URL, SlimGPTClient

    url = getattr(args, "url", None) or os.environ.get("SLIMGPT_URL") or DEFAULT_URL
    return SlimGPTClient(url, _resolve_api_key(getattr(args, "api_key", None)),
                         timeout=getattr(args, "timeout_s", None) or 30.0,
                         retries=int(os.environ.get("SLIMGPT_CLIENT_RETRIES", "2")))


def _guard(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map exceptions to the documented exit codes, with a one-line message on stderr."""

    def run(args: argparse.Namespace) -> int:
        from app.client import ApiError, ConnectionFailed

        try:
            return handler(args)
        except UsageError as err:
            print(f"slimgpt: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except ConnectionFailed as err:
            print(f"slimgpt: {err}", file=sys.stderr)
            return EXIT_API
        except ApiError as err:
            print(f"slimgpt: API error: {err}", file=sys.stderr)
            return EXIT_USAGE if err.status in (400, 413, 422) else EXIT_API
        except TimeoutError as err:
            print(f"slimgpt: {err}", file=sys.stderr)
            return EXIT_API
        except KeyboardInterrupt:
            print("\nslimgpt: interrupted (jobs keep running on the server)", file=sys.stderr)
            return 130

    run.__name__ = handler.__name__
    return run


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


class ProgressBar:
    """A one-line progress bar on stderr (a line per phase/layer change when not a terminal)."""

    def __init__(self, label: str, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_key: tuple[Any, ...] | None = None
        self._drawn = False

    def update(self, job: dict[str, Any]) -> None:
        if not self.enabled:
            return
        p = job.get("progress") or {}
        pct = float(p.get("percent") or 0.0)
        phase = p.get("phase") or job["state"]
        where = ""
        if phase == "pruning" and p.get("layer") is not None and p.get("num_layers"):
            where = f" layer {int(p['layer']) + 1}/{p['num_layers']}"
        text = f"{self.label} {job['state']}: {phase}{where}"
        if self.tty:
            filled = round(pct / 100 * 24)
            bar = "#" * filled + "-" * (24 - filled)
            line = f"\r[{bar}] {pct:5.1f}% {text}{_fmt_eta(p.get('eta_s'))}"
            self.stream.write(line[:160].ljust(100))
            self.stream.flush()
            self._drawn = True
        else:
            key = (job["state"], phase, p.get("layer"))
            if key != self._last_key:
                self._last_key = key
                self.stream.write(f"{pct:5.1f}% {text}\n")
                self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


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
    for key in ("hub_url", "artifact_dir", "path", "location"):
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
        lines.append(f"perplexity {_ppl(job)}")
    if _result_location(job):
        lines.append(f"result     {_result_location(job)}")
    if job.get("error"):
        lines.append(f"error      {job['error']}")
    return "\n".join(lines)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in out)


def _event_line(ev: dict[str, Any]) -> str:
    where = f" layer {ev['layer']}" if ev.get("layer") is not None else ""
    pct = f" {ev['percent']:5.1f}%" if ev.get("percent") is not None else ""
    return (f"{ev['seq']:>5} {str(ev['time'])[:19]} {ev['state']:<9} "
            f"{ev.get('phase') or '-'}{where}{pct} {ev['message']}")


# -- request building -----------------------------------------------------------------------------
def _parse_schedule(value: str | None) -> Any:
    if value is None:
        return None
    if value in ("log", "linear", "uniform"):
        return value
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--schedule: expected log, linear, uniform or comma-separated ratios, "
                         f"not {value!r}") from None


def _validate(body: dict[str, Any], where: str) -> None:
    """Check a job body against the API's own schema before sending anything."""
    from pydantic import ValidationError

    from app.schemas import JobCreate

    try:
        JobCreate.model_validate(body)
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                         for e in err.errors())
        raise UsageError(f"{where}: {msgs}") from None


def _submit_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model_id": args.model, "target_ratio": args.ratio}
    if args.revision:
        body["revision"] = args.revision
    schedule = _parse_schedule(args.schedule)
    if schedule is not None:
        body["schedule"] = schedule
    if args.profile:
        body["export"] = {"profile": args.profile}
    calibration: dict[str, Any] = {}
    if args.calib_source:
        calibration["source"] = args.calib_source
    if args.calib_samples is not None:
        calibration["num_samples"] = args.calib_samples
    if args.seq_len is not None:
        calibration["seq_len"] = args.seq_len
    if args.seed is not None:
        calibration["seed"] = args.seed
    if calibration:
        body["calibration"] = calibration
    if args.hub_repo:
        body["destination"] = {"hub_repo_id": args.hub_repo, "private": not args.public}
    if args.no_eval:
        body["evaluate"] = {"perplexity": False}
    return body


# -- commands -------------------------------------------------------------------------------------
def _wait_with_progress(client: Any, job: dict[str, Any], args: argparse.Namespace,
                        label: str | None = None) -> dict[str, Any]:
    bar = ProgressBar(label or job["id"][:8], enabled=not args.json and not args.quiet)
    try:
        return client.wait(job["id"], poll_s=args.poll, timeout=args.wait_timeout,
                           on_update=bar.update)
    finally:
        bar.close()


@_guard
def cmd_submit(args: argparse.Namespace) -> int:
    body = _submit_body(args)
    if args.calib and args.calib_source:
        raise UsageError("give --calib FILE or --calib-source, not both")
    if args.calib and not Path(args.calib).is_file():
        raise UsageError(f"--calib: no such file {args.calib}")
    _validate({**body, "calibration": {**body.get("calibration", {}),
                                       **({"source": "c4"} if args.calib else {})}}, "request")
    with _client(args) as client:
        if args.calib:
            uploaded = client.upload_file(args.calib)
            body.setdefault("calibration", {})["source"] = uploaded["id"]
            if not args.json:
                print(f"uploaded {args.calib} as {uploaded['id']}", file=sys.stderr)
        job = client.submit_job(body, idempotency_key=args.idempotency_key)
        if not args.json:
            print(f"submitted job {job['id']} ({job['state']})", file=sys.stderr)
        if not args.wait:
            if args.json:
                _emit_json(job)
            else:
                print(job["id"])
            return EXIT_OK
        job = _wait_with_progress(client, job, args)
    if args.json:
        _emit_json(job)
    else:
        print(_describe(job))
    return _job_exit(job)


@_guard
def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.job_id)
    if args.json:
        _emit_json(job)
    else:
        print(_describe(job))
    return EXIT_OK


@_guard
def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = list(client.list_jobs(state=args.state, model_id=args.model, limit=args.limit))
    if args.json:
        _emit_json(jobs)
        return EXIT_OK
    rows = [[j["id"], j["state"], j["model_id"], str(j.get("request", {}).get("target_ratio", "")),
             f"{(j.get('progress') or {}).get('percent') or 0:.0f}%",
             str(j.get("created_at", ""))[:19]] for j in jobs]
    print(_table(["job", "state", "model", "ratio", "progress", "created"], rows))
    return EXIT_OK


@_guard
def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel_job(args.job_id)
    if args.json:
        _emit_json(job)
    elif job["state"] == "cancelled":
        print(f"job {job['id']} cancelled")
    else:
        print(f"cancel requested for job {job['id']} ({job['state']}); it stops at the next layer")
    return EXIT_OK


@_guard
def cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if not args.follow:
            events = client.list_events(args.job_id, after=args.since or 0)
            for ev in events:
                print(json.dumps(ev, default=str) if args.json else _event_line(ev))
            return EXIT_OK
        for event in client.stream_events(args.job_id, last_event_id=args.since):
            print(json.dumps(event.data, default=str) if args.json else _event_line(event.data),
                  flush=True)
        job = client.get_job(args.job_id)
    return _job_exit(job)


@_guard
def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.job_id)
        if job["state"] != "succeeded":
            print(f"slimgpt: job {args.job_id} is {job['state']}, not succeeded; downloading "
                  "whatever artifacts it has", file=sys.stderr)

        def report(name: str, size: int) -> None:
            if not args.json and not args.quiet:
                print(f"  {name} ({size:,} bytes)", file=sys.stderr)

        paths = client.download_artifacts(args.job_id, args.dest, on_file=report)
    if args.json:
        _emit_json({"job_id": args.job_id, "dest": str(Path(args.dest)),
                    "files": [str(p) for p in paths]})
    else:
        print(f"downloaded {len(paths)} files to {args.dest}")
    return EXIT_OK if paths else EXIT_JOB_FAILED


# -- batch ----------------------------------------------------------------------------------------
def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_batch(path: str | Path) -> tuple[list[dict[str, Any]], int | None]:
    """Read a batch file: ``(items, concurrency)``; each item is ``{"body", "calib_file"}``.
    Raises :class:`UsageError` with the offending entry for anything invalid."""
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
        body = _deep_merge(defaults, entry)
        calib_file = body.pop("calib_file", None)
        if calib_file is not None:
            calib_path = (p.parent / str(calib_file)).resolve()
            if not calib_path.is_file():
                raise UsageError(f"{path}: {where}: calib_file {calib_file} does not exist")
            calib_file = str(calib_path)
        dest = body.get("destination")
        if isinstance(dest, dict) and isinstance(dest.get("hub_repo_id"), str):
            ratio = body.get("target_ratio")
            try:
                dest["hub_repo_id"] = dest["hub_repo_id"].format(
                    model=str(body.get("model_id", "")).rstrip("/").split("/")[-1],
                    ratio_pct=round(float(ratio) * 100) if ratio is not None else "")
            except (KeyError, ValueError, IndexError) as err:
                raise UsageError(f"{path}: {where}: bad placeholder in hub_repo_id ({err})") from None
        check = body if calib_file is None else _deep_merge(body, {"calibration": {"source": "c4"}})
        _validate(check, f"{path}: {where}")
        items.append({"body": body, "calib_file": calib_file})
    return items, concurrency


@_guard
def cmd_batch(args: argparse.Namespace) -> int:
    items, file_concurrency = load_batch(args.file)
    concurrency = args.concurrency or file_concurrency or 2
    if concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if args.dry_run:
        if args.json:
            _emit_json([i["body"] for i in items])
        else:
            for i in items:
                print(json.dumps(i["body"], sort_keys=True))
        return EXIT_OK
    from app.client import TERMINAL_STATES, ApiError, ConnectionFailed

    log = (lambda msg: None) if args.json or args.quiet else (
        lambda msg: print(msg, file=sys.stderr, flush=True))
    results: list[dict[str, Any]] = [{"model_id": i["body"].get("model_id"),
                                      "target_ratio": i["body"].get("target_ratio"),
                                      "job_id": None, "state": "pending", "job": None,
                                      "error": None} for i in items]
    pending = deque(range(len(items)))
    active: dict[str, int] = {}
    uploaded: dict[str, str] = {}
    max_active = 0
    start = time.monotonic()
    with _client(args) as client:
        while pending or active:
            while pending and len(active) < concurrency:
                idx = pending.popleft()
                item, res = items[idx], results[idx]
                body = copy.deepcopy(item["body"])
                try:
                    if item["calib_file"]:
                        if item["calib_file"] not in uploaded:
                            uploaded[item["calib_file"]] = client.upload_file(item["calib_file"])["id"]
                        body.setdefault("calibration", {})["source"] = uploaded[item["calib_file"]]
                    job = client.submit_job(body)
                except ConnectionFailed:
                    raise
                except ApiError as err:
                    res.update(state="rejected", error=str(err.detail))
                    log(f"[{idx + 1}/{len(items)}] {res['model_id']} @ {res['target_ratio']}: "
                        f"rejected: {err.detail}")
                    continue
                res.update(job_id=job["id"], state=job["state"], job=job)
                active[job["id"]] = idx
                max_active = max(max_active, len(active))
                log(f"[{idx + 1}/{len(items)}] {res['model_id']} @ {res['target_ratio']}: "
                    f"submitted {job['id']}")
            if not active:
                continue
            time.sleep(args.poll)
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
    if args.json:
        _emit_json({"jobs": [{k: v for k, v in r.items() if k != "job"}
                             | {"metrics": (r["job"] or {}).get("metrics"),
                                "result": (r["job"] or {}).get("result"),
                                "duration_s": (r["job"] or {}).get("duration_s")}
                             for r in results],
                    "counts": counts, "concurrency": concurrency, "max_active": max_active,
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
        print(_table(["model", "ratio", "state", "job", "params", "perplexity", "time", "error"],
                     rows))
        print(f"\n{len(results)} jobs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
              + f" in {elapsed:.0f} s (concurrency {concurrency})")
    return EXIT_OK if ok else EXIT_JOB_FAILED


# -- worker ---------------------------------------------------------------------------------------
# -- parser ---------------------------------------------------------------------------------------
def _connection_parent() -> argparse.ArgumentParser:
    # SUPPRESS: a value given before the subcommand is not overwritten by the sub-parser default.
    parent = argparse.ArgumentParser(add_help=False)
    g = parent.add_argument_group("connection and output")
    g.add_argument("--url", default=argparse.SUPPRESS,
                   help="API base URL (env SLIMGPT_URL; default http://127.0.0.1:8000)")
    g.add_argument("--api-key", default=argparse.SUPPRESS,
                   help="API key (env SLIMGPT_API_KEY; default <SLIMGPT_DATA_DIR>/api_key)")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="machine-readable JSON on stdout")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress output on stderr")
    g.add_argument("--timeout", dest="timeout_s", type=float, default=argparse.SUPPRESS,
                   help="HTTP timeout in seconds (default 30)")
    return parent


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--api-key", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", default=False, help=argparse.SUPPRESS)
    parser.add_argument("-q", "--quiet", action="store_true", default=False,
                        help=argparse.SUPPRESS)
    parser.add_argument("--timeout", dest="timeout_s", type=float, default=None,
                        help=argparse.SUPPRESS)


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _ratio(value: str) -> float:
    try:
        r = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 < r <= 0.9:
        raise argparse.ArgumentTypeError(f"{r} is outside (0, 0.9]")
    return r


def _waiting_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--poll", type=float, default=1.0, help="seconds between status polls")


def add_client_commands(sub: Any) -> None:
    """Register the client subcommands on the `slimgpt` sub-parsers."""
    parent = _connection_parent()
    fmt = argparse.RawDescriptionHelpFormatter

    submit = sub.add_parser("submit", parents=[parent], formatter_class=fmt,
                            help="submit a pruning job to a running service",
                            epilog=EXIT_CODES_HELP)
    submit.add_argument("--model", required=True, help="Hub repo id or local model folder")
    submit.add_argument("--ratio", required=True, type=_ratio,
                        help="share of decoder parameters to remove, in (0, 0.9]")
    submit.add_argument("--revision", default=None, help="Hub revision (default main)")
    submit.add_argument("--schedule", default=None,
                        help="log (default), linear, uniform, or comma-separated per-layer ratios")
    submit.add_argument("--profile", choices=["hetero", "uniform"], default=None,
                        help="artifact format (default hetero)")
    submit.add_argument("--hub-repo", default=None, help="publish to this Hub repo (owner/name)")
    submit.add_argument("--public", action="store_true", help="make the Hub repo public")
    submit.add_argument("--calib", default=None, metavar="FILE",
                        help="upload this text/jsonl file and calibrate on it")
    submit.add_argument("--calib-source", default=None,
                        help="c4, wikitext2 or an uploaded file id (default c4)")
    submit.add_argument("--calib-samples", type=_positive_int, default=None)
    submit.add_argument("--seq-len", type=_positive_int, default=None)
    submit.add_argument("--seed", type=int, default=None)
    submit.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    submit.add_argument("--idempotency-key", default=None,
                        help="resubmitting with the same key returns the same job")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the job to end, showing progress; exit 1 unless it succeeds")
    submit.add_argument("--wait-timeout", type=float, default=None,
                        help="give up waiting after this many seconds (exit 3)")
    _waiting_options(submit)
    submit.set_defaults(handler=cmd_submit)

    batch = sub.add_parser("batch", parents=[parent], formatter_class=fmt,
                           help="run many models x ratios from a YAML file",
                           description=BATCH_HELP, epilog=EXIT_CODES_HELP)
    batch.add_argument("file", help="the batch YAML file")
    batch.add_argument("--concurrency", type=_positive_int, default=None,
                       help="jobs queued or running at once (default: file's, else 2)")
    batch.add_argument("--dry-run", action="store_true",
                       help="validate and print the job bodies without submitting")
    _waiting_options(batch)
    batch.set_defaults(handler=cmd_batch)

    status = sub.add_parser("status", parents=[parent], formatter_class=fmt,
                            help="show a job", epilog=EXIT_CODES_HELP)
    status.add_argument("job_id")
    status.set_defaults(handler=cmd_status)

    lst = sub.add_parser("list", parents=[parent], formatter_class=fmt,
                         help="list jobs, newest first", epilog=EXIT_CODES_HELP)
    lst.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    lst.add_argument("--model", default=None, help="only jobs of this model id")
    lst.add_argument("--limit", type=_positive_int, default=50, help="at most this many (50)")
    lst.set_defaults(handler=cmd_list)

    cancel = sub.add_parser("cancel", parents=[parent], formatter_class=fmt,
                            help="cancel a job", epilog=EXIT_CODES_HELP)
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=cmd_cancel)

    logs = sub.add_parser("logs", parents=[parent], formatter_class=fmt,
                          help="a job's events; --follow streams them live (SSE)",
                          epilog=EXIT_CODES_HELP)
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="stream until the job ends (resumes after disconnects); "
                      "exit 1 unless it succeeded")
    logs.add_argument("--since", type=int, default=None, metavar="SEQ",
                      help="only events after this sequence number")
    logs.set_defaults(handler=cmd_logs)

    download = sub.add_parser("download", parents=[parent], formatter_class=fmt,
                              help="download a job's artifacts (checksums verified)",
                              epilog=EXIT_CODES_HELP)
    download.add_argument("job_id")
    download.add_argument("dest", help="destination folder")
    download.set_defaults(handler=cmd_download)

