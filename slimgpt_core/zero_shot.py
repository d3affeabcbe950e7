"""Zero-shot task accuracy of a (pruned) model through lm-evaluation-harness (``lm-eval``), the
optional ``zeroshot`` extra: ``pip install 'slimgpt-service[zeroshot]'``.

The model is evaluated in memory (``HFLM(pretrained=<the model>)``): nothing is reloaded. Task
names are lm-eval's (``arc_easy``, ``hellaswag``, ``piqa``, ...), whose datasets come from the
Hub (or its cache, with ``HF_HUB_OFFLINE``); ``include_path`` adds task YAML files of one's own,
e.g. an offline copy of a task on local JSON files (``dataset_path: json``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: A Hub dataset id (``owner/name``); anything else (``json``, a path) is a local dataset.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Metrics reported per task when the task has them (lm-eval names them ``metric,filter``).
METRICS = ("acc", "acc_norm", "exact_match")


class ZeroShotUnavailable(RuntimeError):
    """lm-eval is not installed (the ``zeroshot`` extra)."""


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | Path | None) -> Any:
    # Indexing lm-eval's task files takes seconds: once per process and folder.
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ZeroShotUnavailable(
            "zero-shot evaluation needs lm-evaluation-harness: install the `zeroshot` extra "
            "(pip install 'slimgpt-service[zeroshot]')") from err
    return TaskManager(include_path=str(include_path) if include_path else None)


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None) -> None:
    """Raise :class:`ZeroShotUnavailable` (no lm-eval) or ``ValueError`` (a task lm-eval does
    not know) before anything expensive runs."""
    known = _task_manager(include_path).all_tasks
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")


def zero_shot(model: Any, tokenizer: Any, tasks: Sequence[str], *, limit: int | None = None,
              include_path: str | Path | None = None, batch_size: int = 8,
              seed: int = 0) -> dict[str, dict[str, Any]]:
    """Accuracy of ``model`` on each of ``tasks``: ``{task: {"acc": 0.61, "acc_stderr": ...,
    "acc_norm": ..., "samples": n, "dataset": "allenai/ai2_arc", "config": "ARC-Easy",
    "split": "test", "num_fewshot": 0}}``. ``limit``: at most this many examples per task
    (the first ones; None: all)."""
    manager = _task_manager(include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    was_training = model.training
    model.eval()
    try:
        out = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=manager,
            log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        scores = out["results"].get(task, {})
        config = (out.get("configs") or {}).get(task, {})
        entry: dict[str, Any] = {}
        for metric in METRICS:
            for key, value in scores.items():
                name, _, _filter = key.partition(",")
                if name == metric:
                    entry[metric] = round(float(value), 6)
                elif name == f"{metric}_stderr" and isinstance(value, (int, float)):
                    entry[f"{metric}_stderr"] = round(float(value), 6)
        dataset = config.get("dataset_path")
        entry.update(
            samples=int((out.get("n-samples") or {}).get(task, {}).get("effective", 0)),
            dataset=dataset if isinstance(dataset, str) and _HUB_ID.match(dataset) else None,
            config=config.get("dataset_name"), split=config.get("test_split"),
            num_fewshot=0, limit=limit)
        results[task] = entry
    return results
