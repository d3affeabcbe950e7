"""The model a job prunes, in memory or streamed from its shards: one interface for the runner.

* :class:`InMemoryModel`: the whole model is loaded (into host memory; the pruner moves it to
  the GPU when it fits there). Perplexities run on the model before and after pruning.
* :class:`StreamedModel`: only a skeleton is in memory; layers are read from the checkpoint's
  safetensors shards one at a time and the pruned layers are written to the job's checkpoint
  folder, whose files become the output shards. Perplexities before/after and the export's
  reference logits come from windows that ride along the single pruning pass (probes), so no
  second pass over a model that fits nowhere is needed. ``gpus > 1`` runs the job on that many
  GPUs of this host (helper processes, torch.distributed).

:func:`open_model` picks one from ``SLIMGPT_STREAM_MODELS``, the job's ``resources`` and what
fits in host memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from worker.errors import WorkerError

logger = logging.getLogger(__name__)


class ResourcesUnavailable(WorkerError):
    """The job asks for more GPUs than this worker has (or a layout it cannot stream)."""

    code = "resources_unavailable"
    retryable = False


class InMemoryModel:
    streamed = False

    def __init__(self, path: Path) -> None:
        from slimgpt_core.loading import load_base_model

        self.model, self.tokenizer, self.info = load_base_model(str(path))
        self.config = self.model.config

    def perplexity_before(self, eval_windows: Any) -> float | None:
        from slimgpt_core.evaluate import perplexity

        return perplexity(self.model, eval_windows)

    def prune(self, model: Any, windows: Any, config: Any, **kw: Any) -> Any:
        from slimgpt_core.pruner import prune_model

        return prune_model(model, windows, config, **kw)

    def export_kwargs(self, result: Any) -> dict[str, Any]:
        return {}

    def perplexity_after(self, eval_windows: Any, result: Any) -> float:
        import torch

        from slimgpt_core.evaluate import perplexity

        with torch.no_grad():
            return perplexity(self.model, eval_windows)


class StreamedModel:
    streamed = True

    def __init__(self, path: Path, gpus: int, work_dir: Path) -> None:
        from transformers import AutoTokenizer

        from slimgpt_core.loading import folder_source_info
        from slimgpt_core.streaming import open_streamed

        self.gpus, self.work_dir = gpus, work_dir
        self.streamed_model = open_streamed(path)
        self.model = self.streamed_model.model
        self.config = self.model.config
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.info = folder_source_info(path)
        self.eval_windows: Any = None

    def perplexity_before(self, eval_windows: Any) -> float | None:
        self.eval_windows = eval_windows  # measured along the pruning pass
        return None

    def prune(self, model: Any, windows: Any, config: Any, progress: Any = None,
              should_cancel: Any = None) -> Any:
        from slimgpt_core.multi_gpu import prune_streamed
        from slimgpt_core.pruner import Probe
        from slimgpt_core.verify import default_windows

        self.verify_ids = default_windows(self.config.vocab_size)
        probes = {"verify": Probe(self.verify_ids)}
        if self.eval_windows is not None:
            probes["eval_before"] = Probe(self.eval_windows, dense=True)
            probes["eval_after"] = Probe(self.eval_windows)
        return prune_streamed(self.streamed_model, windows, config, gpus=self.gpus,
                              work_dir=self.work_dir, progress=progress,
                              should_cancel=should_cancel, probes=probes)

    def probe_perplexity(self, result: Any, name: str) -> float:
        from slimgpt_core.streaming import perplexity_from_hidden

        return perplexity_from_hidden(self.model, result.probe_outputs[name], self.eval_windows,
                                      _device())

    def export_kwargs(self, result: Any) -> dict[str, Any]:
        from slimgpt_core.streaming import logits_from_hidden

        return {"verify_ids": self.verify_ids,
                "verify_logits": logits_from_hidden(self.model, result.probe_outputs["verify"],
                                                    _device())}

    def perplexity_after(self, eval_windows: Any, result: Any) -> float:
        return self.probe_perplexity(result, "eval_after")


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def requested_gpus(request: dict[str, Any], worker_gpus: int) -> int:
    """The job's ``resources.gpus``, checked against what this worker may use."""
    gpus = int((request.get("resources") or {}).get("gpus", 1))
    if gpus > worker_gpus:
        raise ResourcesUnavailable(
            f"the job asks for {gpus} GPUs; this worker may use {worker_gpus} "
            "(SLIMGPT_WORKER_GPUS); route it to a pool with more (SLIMGPT_GPU_POOLS)")
    if gpus > 1:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() < gpus:
            raise ResourcesUnavailable(f"the job asks for {gpus} GPUs; this host has "
                                       f"{torch.cuda.device_count()}")
    return gpus


def open_model(path: Path, kind: str, *, stream_setting: str, gpus: int,
               work_dir: Path) -> InMemoryModel | StreamedModel:
    """Open the job's model the way it will be pruned (see the module docstring)."""
    from slimgpt_core.streaming import should_stream

    has_shards = kind != "gguf" and any(Path(path).glob("*.safetensors"))
    if gpus > 1 and not has_shards:
        raise ResourcesUnavailable("a multi-GPU job streams the model's safetensors shards; "
                                   f"{path.name} has none (GGUF or pickled weights)")
    stream = has_shards and (gpus > 1 or stream_setting == "always" or (
        stream_setting == "auto" and should_stream(path)))
    if stream:
        logger.info("streaming %s from its shards on %d GPU(s)", path, gpus)
        return StreamedModel(path, gpus, work_dir)
    return InMemoryModel(path)
