"""``run_job(job_id)``: the one job pipeline, run by the Celery task and the embedded worker.

load -> calibrate -> prune -> verify (export) -> evaluate -> publish, with an event row per phase
and per pruned layer, all read from and written to the job database by job id.

Reliability rules (DESIGN.md, "Jobs"):

* A job runs only under its lease (``try_claim``; ``worker.lifecycle``), renewed by a background
  thread. A delivery that cannot claim the job returns at once: a terminal job (a succeeded job
  is never redone, a cancelled one never restarts), one in its retry backoff, or one that
  another worker holds (if that worker is dead, the dispatcher's sweeper brings the job back
  when its lease expires). Lost attempts are counted and bounded there
  (``SLIMGPT_JOB_MAX_ATTEMPTS``), so a poison job fails after that many crashes.
* SIGTERM (or the embedded worker's stop) ends the attempt at the next layer or phase boundary
  and hands the job back at once; it resumes on the next worker from its checkpoints.
* Pruning checkpoints every finished layer into ``<artifacts>/<job_id>/checkpoints``; a
  redelivered job continues from its last finished layer, and layer events already written are
  not written again.
* Errors become a user-facing ``code: message`` (``worker.errors.describe_exception``); retryable
  ones (Cholesky trouble: with 10x damping; Hub 5xx/rate limits) are retried in place while
  attempts remain.
* Cancellation (the job's ``cancel_requested`` flag, checked between layers and between phases)
  ends the job ``cancelled`` and deletes its partial files.

Test-only hook: ``SLIMGPT_TEST_LAYER_DELAY_S`` sleeps that long inside each layer, after its
pruning started and before anything of it is checkpointed, so a test can kill, stop or cancel a
job in the middle of a known layer. It is not a setting; production never sets it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from app.core.config import Settings
from app.crud import jobs as crud
from app.db.models import JobEvent
from app.db.session import session_scope
from worker import fleet
from worker.errors import (
    HealUnavailableError,
    JobCancelled,
    ZeroShotUnavailableError,
    describe_exception,
)
from worker.lifecycle import (
    STOP,
    HandBack,
    JobControl,
    LeaseKeeper,
    LeaseLost,
    new_worker_id,
    retry_db,
)
from worker.publish import HubDestination, HubPublisher, LocalPublisher, Publisher
from worker.redact import install_redaction, register_secret, unregister_secret
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

TEST_LAYER_DELAY_ENV = "SLIMGPT_TEST_LAYER_DELAY_S"
#: Overall percent at the start of each phase (pruning spans 10..85 by layer).
PHASE_PERCENT = {"loading": 0.0, "calibrating": 5.0, "pruning": 10.0, "verifying": 85.0,
                 "evaluating": 92.0, "publishing": 97.0}
PRUNING_SPAN = (10.0, 85.0)
#: Sub-layer progress (attention/ffn of a layer) is written at most this often.
SUBLAYER_EVENT_INTERVAL_S = 10.0
#: Evaluation defaults (the request's `evaluate` section overrides them; app/schemas.py).
DEFAULT_EVAL_SOURCE = "wikitext2"
DEFAULT_EVAL_WINDOWS = 16
DEFAULT_EVAL_SEQ_LEN = 512
#: Without a GPU, the dense-vs-pruned speed measurement runs only for models up to this size
#: (SmolLM2-135M takes seconds on two CPU cores; a 7B model would take minutes).
SPEED_MAX_CPU_PARAMS = 1_000_000_000
#: Healing windows are drawn fresh from the calibration text, at most this many.
HEAL_MAX_WINDOWS = 4096

HubPublisherFactory = Callable[[str], Publisher]


# -- helpers ------------------------------------------------------------------------------------
def as_worker_settings(settings: Settings | None) -> WorkerSettings:
    if settings is None:
        return WorkerSettings()
    if isinstance(settings, WorkerSettings):
        return settings
    return WorkerSettings.model_validate(settings.model_dump())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def job_dir(settings: Settings, job_id: str) -> Path:
    return Path(settings.artifacts_dir) / job_id  # type: ignore[arg-type]


def checkpoint_dir(settings: Settings, job_id: str) -> Path:
    return job_dir(settings, job_id) / "checkpoints"


def staging_dir(settings: Settings, job_id: str) -> Path:
    return job_dir(settings, job_id) / "staging"


def remove_partial_files(settings: Settings, job_id: str) -> None:
    """Checkpoints and the staged export; the published ``model`` folder is never touched."""
    for path in (checkpoint_dir(settings, job_id), staging_dir(settings, job_id)):
        shutil.rmtree(path, ignore_errors=True)
    root = job_dir(settings, job_id)
    try:
        root.rmdir()  # only when empty: nothing was published
    except OSError:
        pass


# -- the pipeline -------------------------------------------------------------------------------
@dataclass
class _State:
    """What one attempt has learned so far (kept across in-place retries)."""

    seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    percdamp_boost: float = 1.0


class JobRunner:
    """Runs one job; the model source, calibration source and Hub publisher are injectable."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        model_source: Any | None = None,
        calibration_source: Any | None = None,
        hub_publisher_factory: HubPublisherFactory | None = None,
        worker_id: str | None = None,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self._model_source = model_source
        self._calibration_source = calibration_source
        self._hub_publisher_factory = hub_publisher_factory
        self.worker_id = worker_id or new_worker_id()
        # Set when this worker stops (SIGTERM in a Celery child, shutdown of the embedded one).
        self.stop_event = stop_event if stop_event is not None else STOP

    # db ---------------------------------------------------------------------------------------
    @contextmanager
    def db(self) -> Iterator[Any]:
        with session_scope(self.settings) as s:
            yield s

    def event(self, job_id: str, phase: str, message: str, **kw: Any) -> None:
        def write() -> None:
            with self.db() as s:
                crud.add_event(s, job_id, phase=phase, message=message, **kw)

        # Progress is written many times per job: ride out a short database outage here.
        retry_db(write, budget_s=self.settings.job_lease_s / 2, what="writing progress")

    # entry ------------------------------------------------------------------------------------
    def run(self, job_id: str) -> None:
        install_redaction()
        with self.db() as s:
            job, why = crud.try_claim(s, job_id, self.worker_id, self.settings.job_lease_s)
        if job is None:
            logger.info("job %s not taken: %s", job_id, why)
            return
        max_attempts = self.settings.job_max_attempts
        state = _State()
        token: str | None = None
        fleet.reset_gpu_peak()
        try:
            with self.db() as s:
                token = crud.get_hub_token_for_job(s, job_id, self.settings)
            register_secret(token)
            with LeaseKeeper(self.settings, job_id, self.worker_id) as lease:
                ctl = JobControl(self.settings, job_id, lease, self.stop_event)
                # In-place retries of transient errors share the attempt budget with lost ones.
                retries_left = max_attempts - 1 - int(job.lost_count or 0)
                while True:
                    try:
                        self._pipeline(job_id, token, ctl, state)
                        return
                    except (LeaseLost, HandBack, JobCancelled, OperationalError):
                        raise
                    except Exception as exc:
                        desc = describe_exception(exc)
                        if lease.lost.is_set():
                            raise LeaseLost() from exc
                        if desc.retryable and retries_left > 0:
                            retries_left -= 1
                            self._retry(job_id, exc, desc, state)
                            continue
                        raise
        except LeaseLost:
            logger.warning("job %s: another worker holds the lease now; stopping here", job_id)
        except OperationalError:
            # The database is unreachable: the job cannot be recorded as anything. Its lease
            # expires and the sweeper gives it another attempt, resumed from its checkpoints.
            logger.warning("job %s: database unreachable; it resumes after its lease expires",
                           job_id, exc_info=True)
        except HandBack:
            self._hand_back(job_id)
        except JobCancelled:
            self._finish_cancelled(job_id, state)
        except Exception as exc:
            desc = describe_exception(exc)
            logger.error("job %s failed: %s: %s", job_id, desc.code, desc.message,
                         exc_info=desc.code == "internal_error")
            with self.db() as s:
                failed = crud.finish_job(s, job_id, "failed",
                                         error=f"{desc.code}: {desc.message}",
                                         metrics={"seconds": state.seconds,
                                                  "error_code": desc.code,
                                                  **fleet.gpu_figures()},
                                         worker_id=self.worker_id)
            if failed is not None:
                remove_partial_files(self.settings, job_id)
        finally:
            unregister_secret(token)

    def _hand_back(self, job_id: str) -> None:
        """Stopping: the finished layers are checkpointed; queue the job again at once."""
        with self.db() as s:
            if crud.hand_back(s, job_id, self.worker_id, reason="worker shutting down"):
                logger.info("job %s handed back; it resumes from its checkpoints", job_id)

    def _retry(self, job_id: str, exc: Exception, desc: Any, state: _State) -> None:
        """Start another attempt in this process (counted, recorded once), adjusting what it
        needs (more damping). The lease stays this worker's: this is no takeover."""
        if desc.code == "cholesky_failed":
            state.percdamp_boost *= 10.0
            shutil.rmtree(checkpoint_dir(self.settings, job_id), ignore_errors=True)
        logger.warning("job %s: retrying in place after %s", job_id, desc.code)
        time.sleep(min(5.0, self.settings.hub_backoff_base_s))
        with self.db() as s:
            job = crud.retry_in_place(
                s, job_id, self.worker_id, self.settings.job_lease_s,
                f"retrying after a transient error ({desc.code}): {desc.message}",
                metrics={"error_code": desc.code, "kind": "retry"})
        if job is None:
            raise LeaseLost() from exc

    def _finish_cancelled(self, job_id: str, state: _State) -> None:
        with self.db() as s:
            done = crud.finish_job(s, job_id, "cancelled",
                                   metrics={"seconds": state.seconds, **fleet.gpu_figures()},
                                   message="job cancelled; partial files removed",
                                   worker_id=self.worker_id)
        if done is not None:
            remove_partial_files(self.settings, job_id)
        logger.info("job %s cancelled", job_id)

    # phases -----------------------------------------------------------------------------------
    def _pipeline(self, job_id: str, token: str | None, ctl: JobControl, state: _State) -> None:
        from slimgpt_core.calibration import sample_windows
        from slimgpt_core.export import describe_calibration, export_pruned
        from slimgpt_core.presets import DEFAULT_PRESET, preset_settings
        from slimgpt_core.pruner import PruneConfig, PruningCancelled, check_settings
        from worker.model_handle import open_model, requested_gpus

        with self.db() as s:
            job = crud.get_job(s, job_id)
            assert job is not None
            req: dict[str, Any] = dict(job.request or {})
            model_source, model_id, revision = job.model_source, job.model_id, job.revision
            local_path, calibration_path, eval_path = (job.local_model_path, job.calibration_path,
                                                       job.eval_path)
        calib = req.get("calibration") or {}
        pruning = req.get("pruning") or {}
        export = req.get("export") or {}
        destination = req.get("destination") or {}
        evaluate = req.get("evaluate") or {}

        @contextmanager
        def phase(name: str, message: str) -> Iterator[None]:
            ctl.check()
            self.event(job_id, name, message, percent=PHASE_PERCENT[name])
            t0 = time.perf_counter()
            try:
                yield
            finally:
                state.seconds[name] = round(state.seconds.get(name, 0.0)
                                            + time.perf_counter() - t0, 3)

        # loading ------------------------------------------------------------------------
        with phase("loading", f"resolving model {model_id}"):
            resolved = self._resolve_model(model_source, model_id, local_path, revision, token)
            if resolved.kind == "hub" and resolved.revision:
                with self.db() as s:
                    crud.set_model_commit(s, job_id, resolved.revision)
            gpus = requested_gpus(req, self.settings.worker_gpus)
            handle = open_model(Path(resolved.path), resolved.kind,
                                stream_setting=self.settings.stream_models, gpus=gpus,
                                work_dir=job_dir(self.settings, job_id) / "ranks")
            model, tokenizer, info = handle.model, handle.tokenizer, handle.info
            # pruning works in place: keep the dense shape for the speed comparison
            dense_config = copy.deepcopy(model.config)
            base_model_id = model_id if resolved.kind == "hub" else (
                info.get("base_model_id") or model_id)
            base_revision = resolved.revision if resolved.kind == "hub" else info.get("revision")
            num_layers = int(model.config.num_hidden_layers)
            how = (f"streamed from its shards on {gpus} GPU(s)" if handle.streamed
                   else "in memory")
            self.event(job_id, "loading", f"loaded {model_id} ({num_layers} layers, {how})",
                       num_layers=num_layers, percent=PHASE_PERCENT["loading"] + 4)

        zero_shot_tasks = list(evaluate.get("zero_shot_tasks") or [])
        if zero_shot_tasks:  # fail before the expensive part, not after it
            self._check_zero_shot(zero_shot_tasks, handle.streamed)
        preset = preset_settings(pruning.get("preset") or DEFAULT_PRESET)
        # Likewise: a preset this family, placement or GPU count cannot run fails here.
        check_settings(model, PruneConfig(**preset), streamed=handle.streamed, world_size=gpus)

        # calibrating --------------------------------------------------------------------
        num_samples, seq_len = int(calib.get("num_samples", 128)), int(calib.get("seq_len", 2048))
        seed = int(calib.get("seed", 0))
        calib_source = calibration_path or calib.get("source", "c4")
        with phase("calibrating", f"building {num_samples} calibration windows of {seq_len} "
                   f"tokens from {calib.get('source', 'c4')}"):
            windows = self._calibration().windows(
                calib_source, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed,
                make_windows=sample_windows, token=token,
            ).input_ids
            eval_windows = None
            if evaluate.get("perplexity", True):
                ev = self._eval_windows(eval_path, evaluate, tokenizer, model, token)
                eval_windows = ev.input_ids
                self.event(job_id, "calibrating", f"perplexity of the base model on {ev.source} "
                           f"({eval_windows.shape[0]} windows of {eval_windows.shape[1]} "
                           "tokens)" + (", measured along the pruning pass" if handle.streamed
                                        else ""), percent=PHASE_PERCENT["calibrating"] + 2)
                before = handle.perplexity_before(eval_windows)
                if before is not None:
                    state.metrics["perplexity_before"] = round(before, 4)
                state.metrics["evaluation"] = {
                    **ev.describe(),
                    **({"file_id": evaluate.get("eval_source")} if eval_path else {})}

        # pruning ------------------------------------------------------------------------
        ckpt = checkpoint_dir(self.settings, job_id)
        config = PruneConfig(
            target_ratio=float(req["target_ratio"]),
            schedule=req.get("schedule", "log"),
            alpha=float(pruning.get("alpha", 0.25)),
            # Requests resolve the policy from the profile; this fallback covers older rows.
            gqa_policy=pruning.get("gqa_policy"),  # None: PruneConfig resolves it
            head_ratio=pruning.get("heads"),
            ffn_ratio=pruning.get("ffn"),
            percdamp=float(pruning.get("percdamp", 0.01)) * state.percdamp_boost,
            min_group=int(pruning.get("min_group", 64)),
            max_group=max(1024, int(pruning.get("min_group", 64))),
            checkpoint_dir=ckpt,
            seed=seed,
            # A plain (uniform-profile) config needs head counts that divide hidden_size.
            plain_heads=export.get("profile") == "uniform",
            **preset,
        )
        progress = _PruneProgress(self, job_id, num_layers, ctl)
        heal_spec = req.get("heal")
        if heal_spec and handle.streamed:
            raise HealUnavailableError(
                "heal distils the dense model into the pruned one in memory; this model is "
                "pruned streamed from its shards (larger than host memory), so it cannot be "
                "healed here: submit without `heal`")
        # The dense model, kept as the teacher of the optional healing step.
        teacher = copy.deepcopy(model) if heal_spec else None
        heal_settings: dict[str, Any] | None = None
        with phase("pruning", f"pruning {num_layers} layers to target ratio "
                   f"{config.target_ratio}"):
            try:
                result = _prune_resuming(handle.prune, model, windows, config, progress, ckpt,
                                         self, job_id)
            except PruningCancelled as exc:
                # The finished layers are checkpointed: lease lost, hand back or cancel.
                ctl.raise_reason(throttle=False, cause=exc)
                raise JobCancelled() from exc
        if handle.streamed and eval_windows is not None:
            state.metrics["perplexity_before"] = round(
                handle.probe_perplexity(result, "eval_before"), 4)
        state.metrics.update(params_before=result.params_before, params_after=result.params_after,
                             resumed_from=result.resumed_from,
                             damping_raised=result.damping_raised())
        if heal_spec and teacher is not None:
            # Part of the pruning phase (the API's phases stay as they are), timed on its own.
            ctl.check()
            self.event(job_id, "pruning", "healing: distilling the dense model into the pruned "
                       f"one ({int(heal_spec['tokens']):,} tokens, "
                       f"{heal_spec.get('mode', 'lora')})", percent=PRUNING_SPAN[1])
            t0 = time.perf_counter()
            state.metrics["heal"], heal_settings = self._heal(
                job_id, model, teacher, heal_spec, calib_source, tokenizer, seq_len, seed, token,
                ctl)
            state.seconds["healing"] = round(time.perf_counter() - t0, 3)
            del teacher

        # verifying (export into staging, proven to load in a fresh process) -------------
        stage = staging_dir(self.settings, job_id)
        out = stage / "model"
        with phase("verifying", "exporting the pruned model and verifying it loads"):
            stage.mkdir(parents=True, exist_ok=True)
            report = export_pruned(
                result, out, tokenizer=tokenizer, profile=export.get("profile", "hetero"),
                base_model_id=base_model_id, base_revision=base_revision,
                calibration_info=_calibration_info(describe_calibration, windows,
                                                   calibration_path, calib_source, seed),
                eval_metrics=None, verify=True, license=info.get("license"),
                repo_id=destination.get("hub_repo_id"), overwrite=True, heal=heal_settings,
                **handle.export_kwargs(result),
            )
            state.metrics["achieved_ratio"] = report.achieved_ratio
            state.metrics["verification"] = _small(report.verification)

        # evaluating ---------------------------------------------------------------------
        if eval_windows is not None:
            with phase("evaluating", f"perplexity on {eval_windows.shape[0]} windows"):
                state.metrics["perplexity_after"] = round(
                    handle.perplexity_after(eval_windows, result), 4)
                evaluation = state.metrics["evaluation"]
                evaluation.update(perplexity_before=state.metrics["perplexity_before"],
                                  perplexity_after=state.metrics["perplexity_after"])
                _record_in_export(out, evaluation={
                    "ppl_before": state.metrics["perplexity_before"],
                    "ppl_after": state.metrics["perplexity_after"],
                    **evaluation,
                }, repo_id=destination.get("hub_repo_id"))
        if zero_shot_tasks:
            with phase("evaluating", f"zero-shot accuracy on {', '.join(zero_shot_tasks)}"):
                from slimgpt_core.zero_shot import zero_shot

                state.metrics["zero_shot"] = zero_shot(
                    model, tokenizer, zero_shot_tasks, limit=evaluate.get("zero_shot_limit"),
                    include_path=self.settings.zero_shot_tasks_dir, seed=seed)
                _record_in_export(out, zero_shot=state.metrics["zero_shot"],
                                  repo_id=destination.get("hub_repo_id"))
        if self.settings.speed_benchmark:
            with phase("evaluating", "measuring inference speed, dense vs pruned"):
                state.metrics["speed"] = (
                    {"skipped": "the model was streamed from its shards (larger than memory)"}
                    if handle.streamed else _measure_speed(model, dense_config))
                _record_in_export(out, speed=state.metrics["speed"],
                                  repo_id=destination.get("hub_repo_id"))
        del model, result, handle

        # publishing ---------------------------------------------------------------------
        with phase("publishing", "publishing the model"):
            local = LocalPublisher(Path(self.settings.artifacts_dir), move=True)  # type: ignore[arg-type]
            published = local.publish(out, job_id=job_id)
            target = local.target(job_id)
            files = []
            with self.db() as s:
                for path in sorted(p for p in target.rglob("*") if p.is_file()):
                    size, digest = path.stat().st_size, _sha256(path)
                    crud.add_artifact(s, job_id, path, size, digest)
                    files.append({"name": path.relative_to(target).as_posix(), "size": size,
                                  "sha256": digest})
            result_doc: dict[str, Any] = {"location": published.location,
                                          "artifact_prefix": "model/", "files": files}
            repo_id = destination.get("hub_repo_id")
            if repo_id:
                self.event(job_id, "publishing", f"publishing to the Hub repo {repo_id}",
                           percent=98.0)
                hub = self._hub_publisher(token)
                hub_result = hub.publish(target, job_id=job_id, destination=HubDestination(
                    repo_id=repo_id, private=bool(destination.get("private", True)),
                    create_pr=bool(destination.get("create_pr", False))))
                result_doc.update(hub_repo_id=repo_id, hub_url=hub_result.location,
                                  hub_commit_url=hub_result.url,
                                  hub_commit_sha=hub_result.commit_sha,
                                  hub_pr_url=hub_result.pr_url)

        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)
        with self.db() as s:
            done = crud.finish_job(s, job_id, "succeeded", result=result_doc,
                                   metrics={**state.metrics, "seconds": state.seconds,
                                            **fleet.gpu_figures()},
                                   message="job succeeded", worker_id=self.worker_id)
        if done is None:
            raise LeaseLost()
        logger.info("job %s succeeded", job_id)

    def _heal(self, job_id: str, model: Any, teacher: Any, spec: dict[str, Any],
              calib_source: Any, tokenizer: Any, seq_len: int, seed: int, token: str | None,
              ctl: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Distil ``teacher`` into ``model`` on fresh windows of the calibration text; returns
        the job's heal metrics and the settings the model card's recipe records."""
        import torch

        from slimgpt_core.calibration import sample_windows
        from slimgpt_core.heal import HealConfig, heal, heal_settings

        tokens = int(spec["tokens"])
        count = max(1, min(HEAL_MAX_WINDOWS, tokens // seq_len))
        windows = self._calibration().windows(
            calib_source, tokenizer, num_samples=count, seq_len=seq_len, seed=seed + 1,
            make_windows=sample_windows, token=token).input_ids
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        teacher.to(device)
        last = [0.0]

        def progress(step: int, steps: int, loss: float) -> None:
            now = time.perf_counter()
            if step == steps or now - last[0] >= SUBLAYER_EVENT_INTERVAL_S:
                last[0] = now
                self.event(job_id, "pruning", f"healing: step {step}/{steps}, KL {loss:.4f}",
                           percent=PRUNING_SPAN[1],
                           metrics={"kind": "heal", "step": step, "steps": steps, "kl": loss})

        config = HealConfig(tokens=tokens, mode=spec.get("mode", "lora"), seed=seed)
        report = heal(model, teacher, windows, config, device=device, progress=progress,
                      should_cancel=lambda: ctl.should_stop())
        ctl.raise_reason(throttle=False)
        teacher.to("cpu")
        return ({"mode": report.mode, "steps": report.steps, "tokens": report.tokens,
                 "seconds": round(report.seconds, 2), "kl_first": round(report.loss_first, 5),
                 "kl_last": round(report.loss_last, 5)},
                heal_settings(config, windows=count, window_seed=seed + 1, seqlen=seq_len))

    def _check_zero_shot(self, tasks: list[str], streamed: bool) -> None:
        from slimgpt_core.zero_shot import ZeroShotUnavailable, check_tasks

        if streamed:
            raise ZeroShotUnavailableError(
                "zero-shot tasks run on the pruned model in memory; this model is pruned "
                "streamed from its shards (larger than host memory): submit without "
                "`evaluate.zero_shot_tasks`")
        try:
            check_tasks(tasks, self.settings.zero_shot_tasks_dir)
        except ZeroShotUnavailable as err:
            raise ZeroShotUnavailableError(
                f"{err}; on the worker, or submit without `evaluate.zero_shot_tasks`") from None
        except ValueError as err:
            raise ZeroShotUnavailableError(str(err)) from None

    # components -------------------------------------------------------------------------------
    def _resolve_model(self, source: str, model_id: str, local_path: str | None,
                       revision: str | None, token: str | None) -> Any:
        ms = self._model_source
        if ms is None:
            from worker.model_source import ModelSource

            ms = ModelSource.from_settings(self.settings)
        ref = local_path if source == "local" and local_path else model_id
        return ms.resolve(ref, revision=revision if source == "hub" else None, token=token)

    def _calibration(self) -> Any:
        if self._calibration_source is None:
            from worker.calibration_source import CalibrationSource

            self._calibration_source = CalibrationSource.from_settings(self.settings)
        return self._calibration_source

    def _eval_windows(self, eval_path: str | None, evaluate: dict[str, Any], tokenizer: Any,
                      model: Any, token: str | None) -> Any:
        """The evaluation windows the request asks for (source, count, length), fetched and
        cached like calibration data; the length is capped at the model's context."""
        from slimgpt_core.calibration import consecutive_windows

        max_pos = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        seq_len = int(evaluate.get("seq_len") or DEFAULT_EVAL_SEQ_LEN)
        if max_pos:
            seq_len = min(seq_len, max_pos)
        return self._calibration().eval_windows(
            eval_path or evaluate.get("eval_source") or DEFAULT_EVAL_SOURCE, tokenizer,
            num_windows=int(evaluate.get("num_windows") or DEFAULT_EVAL_WINDOWS),
            seq_len=seq_len, token=token,
            make_windows=lambda text, tok, length, count: consecutive_windows(
                text, tok, length, max_windows=count))

    def _hub_publisher(self, token: str | None) -> Publisher:
        if self._hub_publisher_factory is not None:
            return self._hub_publisher_factory(token or "")
        return HubPublisher(token=token or "", endpoint=self.settings.hub_endpoint,
                            retry_policy=self.settings.hub_retry_policy())


def _calibration_info(describe: Callable[..., dict[str, Any]], windows: Any,
                      calibration_path: str | None, source: Any, seed: int) -> dict[str, Any]:
    """What the export records about calibration: a Hub source by its dataset id (e.g.
    ``allenai/c4``, with config, split and file), an upload as `upload`."""
    from worker.calibration_source import HUB_SOURCES

    hub = None if calibration_path else HUB_SOURCES.get(str(source))
    if hub is None:
        return describe(windows, source="upload" if calibration_path else str(source), seed=seed)
    return describe(windows, source=str(source), dataset=hub.repo_id, seed=seed,
                    config=hub.config, split=hub.split, file=hub.filename)


def _small(doc: Any) -> Any:
    """A JSON-safe, short copy of a verification report for the job's metrics."""
    if not isinstance(doc, dict):
        return doc
    return {k: v for k, v in doc.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _prune_resuming(prune_model: Callable[..., Any], model: Any, windows: Any, config: Any,
                    progress: _PruneProgress, ckpt: Path, runner: JobRunner, job_id: str) -> Any:
    """``prune_model``; checkpoints of another run (changed settings) are discarded once."""
    from slimgpt_core.checkpoint import CheckpointMismatch

    try:
        return prune_model(model, windows, config, progress=progress,
                           should_cancel=progress.should_cancel)
    except CheckpointMismatch:
        shutil.rmtree(ckpt, ignore_errors=True)
        runner.event(job_id, "pruning", "checkpoints of an earlier run do not match this one "
                     "(settings changed); starting the pruning over")
        return prune_model(model, windows, config, progress=progress,
                           should_cancel=progress.should_cancel)


class _PruneProgress:
    """``prune_model``'s progress callback and cancel check, writing throttled event rows."""

    def __init__(self, runner: JobRunner, job_id: str, num_layers: int,
                 ctl: JobControl) -> None:
        self.runner, self.job_id, self.n, self.ctl = runner, job_id, num_layers, ctl
        self.started = time.perf_counter()
        self.first_layer = 0
        self.last_sub_event = 0.0
        self.delay = float(os.environ.get(TEST_LAYER_DELAY_ENV, "0") or 0)
        self.delayed: set[int | None] = set()
        with runner.db() as s:
            rows = s.query(JobEvent.layer, JobEvent.metrics).filter(
                JobEvent.job_id == job_id, JobEvent.phase == "pruning",
                JobEvent.layer.is_not(None)).all()
            s.rollback()
        self.done_layers = {layer for layer, m in rows
                            if isinstance(m, dict) and m.get("kind") == "layer_done"}

    def percent(self, layers_done: int) -> float:
        lo, hi = PRUNING_SPAN
        return round(lo + (hi - lo) * layers_done / max(1, self.n), 2)

    def __call__(self, ev: Any) -> None:
        if ev.phase in ("fisher", "allocation"):
            # Whole-model passes before the first layer (preset quality): minutes at 8B.
            self.runner.event(self.job_id, "pruning", ev.message, layer=None,
                              num_layers=self.n, percent=self.percent(0),
                              metrics={"kind": ev.phase, **dict(ev.metrics)})
            self.started = time.perf_counter()  # the layers' ETA counts from here
            return
        if ev.phase == "resumed":
            self.first_layer = int(ev.layer or 0)
            self.started = time.perf_counter()
            self.runner.event(self.job_id, "pruning",
                              f"resuming from layer {self.first_layer}/{self.n} "
                              f"({self.first_layer} layers restored from checkpoints)",
                              layer=self.first_layer, num_layers=self.n,
                              percent=self.percent(self.first_layer),
                              metrics={"kind": "resumed", "resumed_from": self.first_layer})
            return
        if ev.phase == "layer_done" and ev.layer is not None:
            i = int(ev.layer)
            if i in self.done_layers:
                return
            done = i + 1
            elapsed = time.perf_counter() - self.started
            per_layer = elapsed / max(1, done - self.first_layer)
            eta = round(per_layer * (self.n - done), 1)
            self.runner.event(self.job_id, "pruning", f"layer {done}/{self.n} done",
                              layer=i, num_layers=self.n, percent=self.percent(done), eta_s=eta,
                              metrics={"kind": "layer_done", **dict(ev.metrics)})
            self.done_layers.add(i)
            try:
                self.ctl.lease.renew()
            except OperationalError:
                pass  # the lease keeper keeps trying on its own
            return
        if self.delay and ev.phase == "attention" and ev.layer not in self.delayed:
            self.delayed.add(ev.layer)
            time.sleep(self.delay)  # mid-layer (test hook)
        now = time.perf_counter()
        if ev.phase in ("attention", "ffn") and now - self.last_sub_event >= \
                SUBLAYER_EVENT_INTERVAL_S:
            self.last_sub_event = now
            layers_done = int(ev.layer or 0)
            self.runner.event(self.job_id, "pruning", ev.message, layer=None,
                              num_layers=self.n, percent=self.percent(layers_done),
                              metrics={"kind": ev.phase, **dict(ev.metrics)})

    def should_cancel(self) -> bool:
        return self.ctl.should_stop()


def _measure_speed(model: Any, dense_config: Any) -> dict[str, Any]:
    """Dense vs pruned tokens/s on this worker's device; never fails the job."""
    import torch

    from slimgpt_core.speed import SpeedSkipped, compare_speed

    try:
        if torch.cuda.is_available():
            model.to("cuda")
        elif sum(p.numel() for p in model.parameters()) > SPEED_MAX_CPU_PARAMS:
            raise SpeedSkipped("no GPU on this worker and the model is too large to time on "
                               "its CPU cheaply")
        return compare_speed(model, dense_config)
    except SpeedSkipped as exc:
        return {"skipped": str(exc)}
    except (RuntimeError, ValueError) as exc:  # e.g. out of memory: the model is already made
        logger.warning("speed measurement failed: %s", exc)
        return {"skipped": f"measurement failed: {exc}"[:300]}


def _record_in_export(folder: Path, *, evaluation: dict[str, Any] | None = None,
                      speed: dict[str, Any] | None = None,
                      zero_shot: dict[str, Any] | None = None, repo_id: str | None) -> None:
    """Put perplexities / measured speed into the exported ``pruning_config.json`` and card."""
    import slimgpt_core
    from slimgpt_core.export import PRUNING_CONFIG_FILE
    from slimgpt_core.model_card import render_model_card

    path = folder / PRUNING_CONFIG_FILE
    pcfg = json.loads(path.read_text())
    if evaluation is not None:
        pcfg["evaluation"] = evaluation
    if speed is not None:
        pcfg["speed"] = speed
    if zero_shot is not None:
        pcfg["zero_shot"] = zero_shot
    path.write_text(json.dumps(pcfg, indent=2, default=str) + "\n")
    base = pcfg.get("base_model") or {}
    card = render_model_card(
        base_model_id=str(base.get("id")), base_revision=base.get("revision"),
        license=str(base.get("license") or "other"), profile=str(pcfg.get("profile")),
        pruning=pcfg, calibration=pcfg.get("calibration") or {},
        eval_metrics=pcfg.get("evaluation"), library_version=slimgpt_core.__version__,
        repo_or_path=repo_id or str(folder))
    (folder / "README.md").write_text(card)


def run_job(job_id: str, settings: Settings | None = None, **components: Any) -> None:
    """Run job ``job_id`` to a terminal state, or hand it back when the worker stops (or leave
    it alone when it cannot be claimed).

    ``settings`` default to the environment (``SLIMGPT_*``); ``components`` are ``stop_event``
    (the embedded worker's) and, for tests, ``model_source``, ``calibration_source`` and
    ``hub_publisher_factory``.
    """
    JobRunner(as_worker_settings(settings), **components).run(job_id)
