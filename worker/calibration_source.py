"""Calibration and evaluation text for a job, and a cache of its tokenized windows.

Calibration sources: ``c4`` (train shard 0 of allenai/c4, as in SparseGPT/SlimGPT),
``wikitext2`` (the train split of Salesforce/wikitext, wikitext-2-raw-v1), or an uploaded
``.txt`` / ``.jsonl`` file. Evaluation sources are the held-out splits of the same datasets
(WikiText-2 test, C4 validation shard 0, as in the GPTQ/SparseGPT perplexity protocol) or an
uploaded file. The windowing itself is a plug-in (``slimgpt_core.calibration.sample_windows`` /
``consecutive_windows`` in production), so this module owns only fetching, reading and caching.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

from worker.errors import (
    CalibrationSourceError,
    EvaluationSourceError,
    HubOfflineError,
    WorkerError,
    call_hub_with_retries,
    hub_error_to_worker_error,
    hub_offline,
)
from worker.retry import RetryPolicy
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

#: ``make_windows(text, tokenizer, num_samples, seq_len, seed) -> LongTensor[num_samples, seq_len]``
MakeWindows = Callable[[str, Any, int, int, int], torch.Tensor]
HubDownload = Callable[..., str]

# Bump when the text a source yields changes, so stale cached windows are not reused.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class HubTextDataset:
    repo_id: str
    filename: str
    revision: str | None = None
    config: str | None = None
    split: str = "train"


C4 = HubTextDataset("allenai/c4", "en/c4-train.00000-of-01024.json.gz", config="en")
WIKITEXT2 = HubTextDataset("Salesforce/wikitext", "wikitext-2-raw-v1/train-00000-of-00001.parquet",
                           config="wikitext-2-raw-v1")
HUB_SOURCES: dict[str, HubTextDataset] = {"c4": C4, "wikitext2": WIKITEXT2}
C4_VALIDATION = HubTextDataset("allenai/c4", "en/c4-validation.00000-of-00008.json.gz",
                               config="en", split="validation")
WIKITEXT2_TEST = HubTextDataset("Salesforce/wikitext",
                                "wikitext-2-raw-v1/test-00000-of-00001.parquet",
                                config="wikitext-2-raw-v1", split="test")
EVAL_SOURCES: dict[str, HubTextDataset] = {"c4": C4_VALIDATION, "wikitext2": WIKITEXT2_TEST}
#: ``make_windows(text, tokenizer, seq_len, max_windows) -> LongTensor[<=max_windows, seq_len]``
MakeEvalWindows = Callable[[str, Any, int, int], torch.Tensor]
UPLOAD_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class CalibrationWindows:
    input_ids: torch.Tensor
    cache_path: Path
    cache_hit: bool


@dataclass(frozen=True)
class EvalWindows:
    """Evaluation windows and what they were measured on (stated in the job's result)."""

    input_ids: torch.Tensor
    cache_path: Path
    cache_hit: bool
    source: str  # `c4`, `wikitext2` or `upload`
    dataset: HubTextDataset | None  # the Hub dataset file, for a Hub source
    sha256: str | None  # an upload's content hash

    def describe(self) -> dict[str, Any]:
        windows, seq_len = (int(n) for n in self.input_ids.shape)
        out: dict[str, Any] = {"source": self.source, "windows": windows, "seq_len": seq_len,
                               "tokens": windows * seq_len}
        if self.dataset is not None:
            out.update(dataset=self.dataset.repo_id, config=self.dataset.config,
                       split=self.dataset.split, file=self.dataset.filename,
                       revision=self.dataset.revision or "main")
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable id of a tokenizer's behaviour, not just its name (a fine-tune may change it)."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    elif hasattr(tokenizer, "get_vocab"):
        for token, index in sorted(tokenizer.get_vocab().items()):
            h.update(f"{token}\0{index}\n".encode())
    return h.hexdigest()[:32]


def read_uploaded_text(path: Path) -> str:
    """Text of an uploaded ``.txt`` file, or the ``text`` fields of a ``.jsonl`` file."""
    if path.suffix not in UPLOAD_SUFFIXES:
        raise CalibrationSourceError(
            f"{path.name}: calibration files must be .txt or .jsonl (one JSON object with a "
            "'text' field per line)"
        )
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationSourceError(f"{path.name} is not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise CalibrationSourceError(f"cannot read calibration file {path.name}: {exc}") from exc
    if path.suffix == ".txt":
        text = raw
    else:
        texts: list[str] = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise CalibrationSourceError(
                    f"{path.name} line {lineno} is not valid JSON ({exc})"
                ) from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationSourceError(
                    f"{path.name} line {lineno} has no string 'text' field; each line must be "
                    'like {"text": "..."}'
                )
            texts.append(record["text"])
        text = "\n\n".join(texts)
    if not text.strip():
        raise CalibrationSourceError(f"calibration file {path.name} contains no text")
    return text


def read_c4_shard(path: Path, *, num_docs: int, seed: int) -> str:
    """``num_docs`` documents drawn uniformly (seeded reservoir) from a C4 ``.json.gz`` shard.

    A shard holds ~356k documents (~800 MB of text); sampling keeps memory bounded while still
    drawing from the whole shard, like SparseGPT's random-document C4 sampler.
    """
    rng = random.Random(seed)
    reservoir: list[bytes] = []
    with gzip.open(path, "rb") as lines:
        for index, line in enumerate(lines):
            if index < num_docs:
                reservoir.append(line)
            else:
                slot = rng.randrange(index + 1)
                if slot < num_docs:
                    reservoir[slot] = line
    texts = []
    for line in reservoir:
        record = json.loads(line)
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
    return "\n\n".join(texts)


def read_c4_head(path: Path, *, num_docs: int) -> str:
    """The first ``num_docs`` documents of a C4 shard joined with spaces (the GPTQ/SparseGPT C4
    perplexity text: deterministic, from the start of validation shard 0)."""
    texts: list[str] = []
    with gzip.open(path, "rb") as lines:
        for line in lines:
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                texts.append(record["text"])
                if len(texts) >= num_docs:
                    break
    return " ".join(texts)


def read_wikitext_parquet(path: Path, separator: str = " ") -> str:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is in the worker extra
        raise CalibrationSourceError("reading WikiText-2 needs pyarrow (pip install pyarrow)") from exc
    rows = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    # Joined like the GPTQ/SparseGPT WikiText-2 loaders: " " for calibration, "\n\n" for the
    # test split's perplexity.
    return separator.join(r for r in rows if isinstance(r, str))


def c4_docs_for(num_samples: int, seq_len: int) -> int:
    # A C4 document averages roughly 500 tokens; draw about twice the tokens the windows need.
    return max(32, num_samples * max(1, math.ceil(seq_len / 256)) * 2)


class CalibrationSource:
    """Fetches calibration text and caches tokenized windows as safetensors."""

    def __init__(
        self,
        *,
        cache_dir: Path,
        hf_cache_dir: Path | None = None,
        endpoint: str | None = None,
        retry_policy: RetryPolicy | None = None,
        hub_download: HubDownload = hf_hub_download,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cache_dir = cache_dir
        self.hf_cache_dir = hf_cache_dir
        self.endpoint = endpoint
        self.retry_policy = retry_policy or RetryPolicy()
        self._hub_download = hub_download
        self._sleep = sleep

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> CalibrationSource:
        return cls(
            cache_dir=settings.cache_dir,
            hf_cache_dir=settings.hf_cache_dir,
            endpoint=settings.hub_endpoint,
            retry_policy=settings.hub_retry_policy(),
        )

    # text ---------------------------------------------------------------------------------

    def load_text(
        self, source: str | Path, *, num_samples: int, seq_len: int, seed: int,
        token: str | None = None,
    ) -> str:
        """The calibration text of ``source`` (a Hub dataset name or an uploaded file path)."""
        if isinstance(source, str) and source in HUB_SOURCES:
            dataset = HUB_SOURCES[source]
            path = self._download(dataset, token=token)
            if dataset is C4:
                return read_c4_shard(path, num_docs=c4_docs_for(num_samples, seq_len), seed=seed)
            return read_wikitext_parquet(path)
        path = Path(source)
        if path.suffix in UPLOAD_SUFFIXES:
            if not path.is_file():
                raise CalibrationSourceError(f"calibration file {path.name} does not exist")
            return read_uploaded_text(path)
        raise CalibrationSourceError(
            f"unknown calibration source {str(source)!r}: use 'c4', 'wikitext2', or an uploaded "
            ".txt/.jsonl file"
        )

    def eval_windows(self, name: str | Path, tokenizer: Any, **kw: Any) -> EvalWindows:
        """See :func:`eval_windows`."""
        return eval_windows(self, name, tokenizer, **kw)

    def _download(self, dataset: HubTextDataset, *, token: str | None,
                  purpose: str = "calibration") -> Path:
        error = EvaluationSourceError if purpose == "evaluation" else CalibrationSourceError
        def fetch() -> str:
            return self._hub_download(
                dataset.repo_id,
                dataset.filename,
                repo_type="dataset",
                revision=dataset.revision,
                token=token or False,  # never the machine's own token on a tenant's behalf
                cache_dir=self.hf_cache_dir,
                endpoint=self.endpoint,
            )

        try:
            return Path(
                call_hub_with_retries(
                    fetch, policy=self.retry_policy, sleep=self._sleep,
                    what=f"downloading {dataset.repo_id}/{dataset.filename}",
                )
            )
        except WorkerError:
            raise
        except LocalEntryNotFoundError as exc:
            if hub_offline():
                raise HubOfflineError(
                    f"{purpose} dataset {dataset.repo_id} ({dataset.filename}) is not in the "
                    "local Hub cache and HF_HUB_OFFLINE is set, so it cannot be downloaded"
                ) from exc
            raise error(
                f"{purpose} dataset {dataset.repo_id} is not in the local cache and the Hub "
                "cannot be reached (no network)"
            ) from exc
        except Exception as exc:
            mapped = hub_error_to_worker_error(
                exc, repo_id=dataset.repo_id, has_token=bool(token), kind="dataset"
            )
            if mapped is None:
                raise
            if mapped.retryable or isinstance(mapped, HubOfflineError):
                raise mapped from exc
            raise error(f"{purpose} dataset: {mapped.message}") from exc

    # windows ------------------------------------------------------------------------------

    def source_id(self, source: str | Path) -> str:
        """What the text depends on: dataset + revision, or an upload's content hash."""
        if isinstance(source, str) and source in HUB_SOURCES:
            d = HUB_SOURCES[source]
            return f"hub:{d.repo_id}/{d.filename}@{d.revision or 'main'}"
        path = Path(source)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise CalibrationSourceError(f"cannot read calibration file {path.name}: {exc}") from exc
        return f"file:{digest}"

    def cache_path(
        self, source: str | Path, tokenizer_id: str, *, num_samples: int, seq_len: int, seed: int
    ) -> Path:
        key = json.dumps(
            {
                "format": CACHE_FORMAT,
                "source": self.source_id(source),
                "tokenizer": tokenizer_id,
                "num_samples": num_samples,
                "seq_len": seq_len,
                "seed": seed,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:40]
        return self.cache_dir / "calibration" / f"{digest}.safetensors"

    def windows(
        self,
        source: str | Path,
        tokenizer: Any,
        *,
        num_samples: int,
        seq_len: int,
        seed: int,
        make_windows: MakeWindows,
        token: str | None = None,
        tokenizer_id: str | None = None,
    ) -> CalibrationWindows:
        """``[num_samples, seq_len]`` token ids, from the cache or built and cached."""
        if num_samples <= 0 or seq_len <= 0:
            raise CalibrationSourceError("calibration.num_samples and seq_len must be positive")
        tok_id = tokenizer_id or tokenizer_fingerprint(tokenizer)
        path = self.cache_path(source, tok_id, num_samples=num_samples, seq_len=seq_len, seed=seed)
        cached = _load_cached(path, num_samples, seq_len)
        if cached is not None:
            logger.info("calibration windows from cache %s", path.name)
            return CalibrationWindows(cached, path, cache_hit=True)

        text = self.load_text(source, num_samples=num_samples, seq_len=seq_len, seed=seed,
                              token=token)
        try:
            ids = make_windows(text, tokenizer, num_samples, seq_len, seed)
        except ValueError as exc:  # e.g. "text too short for windows of seq_len"
            raise CalibrationSourceError(f"calibration data: {exc}") from exc
        if ids.dtype != torch.long or tuple(ids.shape) != (num_samples, seq_len):
            raise ValueError(
                f"make_windows returned {ids.dtype} {tuple(ids.shape)}, expected "
                f"torch.int64 {(num_samples, seq_len)}"
            )
        _save_atomically(path, ids, {"source": self.source_id(source), "tokenizer": tok_id,
                                     "num_samples": str(num_samples), "seq_len": str(seq_len),
                                     "seed": str(seed)})
        return CalibrationWindows(ids, path, cache_hit=False)


# -- evaluation -------------------------------------------------------------------------------
def c4_eval_docs_for(num_windows: int, seq_len: int) -> int:
    # ~400 tokens per C4 document; twice what the windows need, at least GPTQ's 1100-doc text
    # when that is enough.
    return max(64, math.ceil(num_windows * seq_len / 200))


def _eval_text(source: CalibrationSource, name: str | Path, *, num_windows: int, seq_len: int,
               token: str | None) -> str:
    if isinstance(name, str) and name in EVAL_SOURCES:
        dataset = EVAL_SOURCES[name]
        path = source._download(dataset, token=token, purpose="evaluation")
        if dataset.repo_id == C4.repo_id:
            return read_c4_head(path, num_docs=c4_eval_docs_for(num_windows, seq_len))
        return read_wikitext_parquet(path, separator="\n\n")
    path = Path(name)
    if path.suffix in UPLOAD_SUFFIXES and path.is_file():
        try:
            return read_uploaded_text(path)
        except CalibrationSourceError as exc:
            raise EvaluationSourceError(exc.message.replace("calibration", "evaluation")) from exc
    raise EvaluationSourceError(
        f"unknown evaluation source {str(name)!r}: use 'c4', 'wikitext2', or an uploaded "
        ".txt/.jsonl file"
    )


def eval_windows(
    source: CalibrationSource,
    name: str | Path,
    tokenizer: Any,
    *,
    num_windows: int,
    seq_len: int,
    make_windows: MakeEvalWindows,
    token: str | None = None,
    tokenizer_id: str | None = None,
) -> EvalWindows:
    """Up to ``num_windows`` consecutive windows of ``seq_len`` tokens of evaluation text, from
    the cache or fetched, built and cached (like calibration windows)."""
    if num_windows <= 0 or seq_len <= 0:
        raise EvaluationSourceError("evaluate.num_windows and seq_len must be positive")
    is_hub = isinstance(name, str) and name in EVAL_SOURCES
    label = str(name) if is_hub else "upload"
    dataset = EVAL_SOURCES[str(name)] if is_hub else None
    if not is_hub and not Path(name).is_file():
        raise EvaluationSourceError(f"evaluation file {Path(name).name} does not exist")
    sha = None if is_hub else hashlib.sha256(Path(name).read_bytes()).hexdigest()
    tok_id = tokenizer_id or tokenizer_fingerprint(tokenizer)
    sid = (f"hub:{dataset.repo_id}/{dataset.filename}@{dataset.revision or 'main'}"
           if dataset is not None else f"file:{sha}")
    key = json.dumps({"format": CACHE_FORMAT, "purpose": "evaluation", "source": sid,
                      "tokenizer": tok_id, "num_windows": num_windows, "seq_len": seq_len},
                     sort_keys=True)
    path = source.cache_dir / "evaluation" / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.safetensors"
    cached = _load_cached(path, None, seq_len, max_rows=num_windows)
    if cached is not None:
        logger.info("evaluation windows from cache %s", path.name)
        return EvalWindows(cached, path, True, label, dataset, sha)
    text = _eval_text(source, name, num_windows=num_windows, seq_len=seq_len, token=token)
    try:
        ids = make_windows(text, tokenizer, seq_len, num_windows)
    except ValueError as exc:  # e.g. "fewer tokens than one window"
        raise EvaluationSourceError(f"evaluation data: {exc}") from exc
    _save_atomically(path, ids, {"source": sid, "tokenizer": tok_id, "purpose": "evaluation",
                                 "num_windows": str(num_windows), "seq_len": str(seq_len)})
    return EvalWindows(ids, path, False, label, dataset, sha)


def _load_cached(path: Path, num_samples: int | None, seq_len: int, *,
                 max_rows: int | None = None) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        ids = load_file(path)["input_ids"]
    except Exception:  # noqa: BLE001 - a truncated or foreign file: rebuild, do not fail the job
        logger.warning("ignoring unreadable calibration cache %s", path.name)
        return None
    if ids.dtype != torch.long or ids.dim() != 2 or ids.shape[1] != seq_len:
        return None
    if num_samples is not None and ids.shape[0] != num_samples:
        return None
    if max_rows is not None and not 0 < ids.shape[0] <= max_rows:
        return None
    return ids


def _save_atomically(path: Path, ids: torch.Tensor, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, then rename: concurrent workers never read a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({"input_ids": ids.contiguous()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
