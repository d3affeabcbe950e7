from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import safe_open

from worker.calibration_source import (
    C4,
    C4_VALIDATION,
    WIKITEXT2,
    WIKITEXT2_TEST,
    CalibrationSource,
    tokenizer_fingerprint,
)
from worker.errors import (
    CalibrationSourceError,
    EvaluationSourceError,
    HubOfflineError,
    HubUnavailableError,
    describe_exception,
)
from worker.retry import RetryPolicy

from .hub_fakes import hub_http_error


class CharTokenizer:
    """One token per character; enough to exercise windowing and fingerprints."""

    name_or_path = "fake/char"

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i + self.offset for i in range(32, 127)}

    def encode(self, text: str) -> list[int]:
        return [ord(c) + self.offset for c in text]


class CountingWindows:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, text: str, tokenizer: Any, num_samples: int, seq_len: int,
                 seed: int) -> torch.Tensor:
        self.calls.append(text)
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        if ids.numel() <= seq_len:
            raise ValueError(f"text has {ids.numel()} tokens; need more than {seq_len}")
        rng = random.Random(seed)
        starts = [rng.randrange(ids.numel() - seq_len) for _ in range(num_samples)]
        return torch.stack([ids[s:s + seq_len] for s in starts])


class FakeDownload:
    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.calls: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []

    def __call__(self, repo_id: str, filename: str, **kwargs: Any) -> str:
        self.calls.append({"repo_id": repo_id, "filename": filename, **kwargs})
        if self.errors:
            raise self.errors.pop(0)
        return str(self.files[filename])


def make_source(tmp_path: Path, download: FakeDownload | None = None) -> CalibrationSource:
    return CalibrationSource(
        cache_dir=tmp_path / "cache",
        retry_policy=RetryPolicy(max_attempts=3, base_delay_s=0),
        hub_download=download or FakeDownload({}),
        sleep=lambda s: None,
    )


TEXT = "The quick brown fox jumps over the lazy dog. " * 20


def test_txt_upload_windows_are_cached_as_safetensors(tmp_path: Path) -> None:
    upload = tmp_path / "calib.txt"
    upload.write_text(TEXT)
    source, make = make_source(tmp_path), CountingWindows()
    first = source.windows(upload, CharTokenizer(), num_samples=4, seq_len=16, seed=1,
                           make_windows=make)
    assert first.input_ids.shape == (4, 16) and first.input_ids.dtype == torch.long
    assert not first.cache_hit and first.cache_path.suffix == ".safetensors"
    second = source.windows(upload, CharTokenizer(), num_samples=4, seq_len=16, seed=1,
                            make_windows=make)
    assert second.cache_hit and len(make.calls) == 1
    assert torch.equal(first.input_ids, second.input_ids)
    with safe_open(str(first.cache_path), framework="pt") as f:  # a real safetensors file
        assert f.metadata()["seed"] == "1" and list(f.keys()) == ["input_ids"]


def test_cache_key_covers_tokenizer_source_samples_length_seed(tmp_path: Path) -> None:
    upload = tmp_path / "calib.txt"
    upload.write_text(TEXT)
    source = make_source(tmp_path)
    tok = tokenizer_fingerprint(CharTokenizer())
    base = source.cache_path(upload, tok, num_samples=4, seq_len=16, seed=1)
    assert tokenizer_fingerprint(CharTokenizer(offset=1)) != tok
    assert base != source.cache_path(upload, "other", num_samples=4, seq_len=16, seed=1)
    assert base != source.cache_path(upload, tok, num_samples=5, seq_len=16, seed=1)
    assert base != source.cache_path(upload, tok, num_samples=4, seq_len=17, seed=1)
    assert base != source.cache_path(upload, tok, num_samples=4, seq_len=16, seed=2)
    assert base != source.cache_path("wikitext2", tok, num_samples=4, seq_len=16, seed=1)
    upload.write_text(TEXT + "changed")  # same file name, new content: a new key
    assert base != source.cache_path(upload, tok, num_samples=4, seq_len=16, seed=1)


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    upload = tmp_path / "calib.txt"
    upload.write_text(TEXT)
    source, make = make_source(tmp_path), CountingWindows()
    first = source.windows(upload, CharTokenizer(), num_samples=2, seq_len=8, seed=0,
                           make_windows=make)
    first.cache_path.write_bytes(b"garbage")
    again = source.windows(upload, CharTokenizer(), num_samples=2, seq_len=8, seed=0,
                           make_windows=make)
    assert not again.cache_hit and torch.equal(first.input_ids, again.input_ids)


def test_jsonl_upload_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "data.jsonl"
    good.write_text('{"text": "alpha"}\n\n{"text": "beta", "id": 2}\n')
    assert make_source(tmp_path).load_text(good, num_samples=1, seq_len=1, seed=0) == "alpha\n\nbeta"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
    with pytest.raises(CalibrationSourceError, match="line 2 has no string 'text' field"):
        make_source(tmp_path).load_text(bad, num_samples=1, seq_len=1, seed=0)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CalibrationSourceError, match="line 2 is not valid JSON"):
        make_source(tmp_path).load_text(broken, num_samples=1, seq_len=1, seed=0)


def test_unknown_and_short_sources(tmp_path: Path) -> None:
    source = make_source(tmp_path)
    with pytest.raises(CalibrationSourceError, match="unknown calibration source"):
        source.load_text("pile", num_samples=1, seq_len=1, seed=0)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(CalibrationSourceError, match="need more"):
        source.windows(short, CharTokenizer(), num_samples=1, seq_len=64, seed=0,
                       make_windows=CountingWindows())


def test_c4_shard_is_sampled_reproducibly(tmp_path: Path) -> None:
    shard = tmp_path / "c4.json.gz"
    with gzip.open(shard, "wt") as f:
        for i in range(500):
            f.write(json.dumps({"text": f"document {i} " * 5, "url": "u"}) + "\n")
    download = FakeDownload({C4.filename: shard})
    source = make_source(tmp_path, download)
    text = source.load_text("c4", num_samples=2, seq_len=16, seed=3)
    assert download.calls[0]["repo_id"] == "allenai/c4"
    assert download.calls[0]["filename"] == "en/c4-train.00000-of-01024.json.gz"
    assert download.calls[0]["repo_type"] == "dataset"
    assert download.calls[0]["token"] is False
    docs = text.split("\n\n")
    assert len(docs) == 32  # c4_docs_for(2, 16), drawn from the whole shard
    assert any(int(d.split()[1]) >= 250 for d in docs)
    assert text == source.load_text("c4", num_samples=2, seq_len=16, seed=3)
    assert text != source.load_text("c4", num_samples=2, seq_len=16, seed=4)


def test_wikitext2_parquet(tmp_path: Path) -> None:
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": [" = Title = \n", "", " Some words here .\n"]}), parquet)
    download = FakeDownload({WIKITEXT2.filename: parquet})
    source = make_source(tmp_path, download)
    text = source.load_text("wikitext2", num_samples=1, seq_len=4, seed=0)
    assert "Title" in text and "Some words here" in text
    assert download.calls[0]["repo_id"] == "Salesforce/wikitext"
    assert download.calls[0]["filename"].startswith("wikitext-2-raw-v1/train-")
    windows = source.windows("wikitext2", CharTokenizer(), num_samples=2, seq_len=8, seed=0,
                             make_windows=CountingWindows())
    assert windows.input_ids.shape == (2, 8)


def test_dataset_download_errors(tmp_path: Path) -> None:
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["hello world"]}), parquet)
    download = FakeDownload({WIKITEXT2.filename: parquet})
    source = make_source(tmp_path, download)
    download.errors = [hub_http_error(503), hub_http_error(429)]
    assert "hello" in source.load_text("wikitext2", num_samples=1, seq_len=1, seed=0)
    download.errors = [hub_http_error(503)] * 3
    with pytest.raises(HubUnavailableError):
        source.load_text("wikitext2", num_samples=1, seq_len=1, seed=0)
    download.errors = [hub_http_error(404, error_code="RepoNotFound")]
    with pytest.raises(CalibrationSourceError, match="dataset repository"):
        source.load_text("wikitext2", num_samples=1, seq_len=1, seed=0)
    download.errors = [LocalEntryNotFoundError("not cached")]  # HF_HUB_OFFLINE (conftest)
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE") as err:
        source.load_text("wikitext2", num_samples=1, seq_len=1, seed=0)
    assert describe_exception(err.value).code == "hub_offline"


def _eval_windows(text: str, tokenizer: Any, seq_len: int, count: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = min(count, ids.numel() // seq_len)
    if n == 0:
        raise ValueError("fewer tokens than one window")
    return ids[: n * seq_len].view(n, seq_len)


def test_wikitext2_evaluation_uses_the_test_split_and_is_cached(tmp_path: Path) -> None:
    parquet = tmp_path / "test.parquet"
    pq.write_table(pa.table({"text": [" = Heading = \n", " held-out words " * 30]}), parquet)
    download = FakeDownload({WIKITEXT2_TEST.filename: parquet})
    source = make_source(tmp_path, download)
    ev = source.eval_windows("wikitext2", CharTokenizer(), num_windows=3, seq_len=16,
                             make_windows=_eval_windows)
    assert download.calls[0]["repo_id"] == "Salesforce/wikitext"
    assert download.calls[0]["filename"].startswith("wikitext-2-raw-v1/test-")
    assert ev.input_ids.shape == (3, 16) and not ev.cache_hit
    assert ev.describe() == {"source": "wikitext2", "windows": 3, "seq_len": 16, "tokens": 48,
                             "dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1",
                             "split": "test", "file": WIKITEXT2_TEST.filename,
                             "revision": "main"}
    again = source.eval_windows("wikitext2", CharTokenizer(), num_windows=3, seq_len=16,
                                make_windows=_eval_windows)
    assert again.cache_hit and len(download.calls) == 1
    assert torch.equal(again.input_ids, ev.input_ids)
    # Calibration windows of the same dataset are another cache entry (train split).
    assert ev.cache_path.parent.name == "evaluation"


def test_c4_evaluation_reads_the_validation_shard_from_its_start(tmp_path: Path) -> None:
    shard = tmp_path / "c4-val.json.gz"
    with gzip.open(shard, "wt") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"validation document {i:03d}."}) + "\n")
    download = FakeDownload({C4_VALIDATION.filename: shard})
    ev = make_source(tmp_path, download).eval_windows(
        "c4", CharTokenizer(), num_windows=2, seq_len=20, make_windows=_eval_windows)
    assert download.calls[0]["filename"] == "en/c4-validation.00000-of-00008.json.gz"
    text = "".join(chr(int(i)) for i in ev.input_ids.flatten())
    assert text == "validation document 000. validation docu"  # 2 x 20, from the start
    assert ev.describe()["split"] == "validation" and ev.describe()["dataset"] == "allenai/c4"


def test_uploaded_evaluation_file_and_its_errors(tmp_path: Path) -> None:
    upload = tmp_path / "eval.jsonl"
    upload.write_text('{"text": "' + "x" * 100 + '"}\n')
    source = make_source(tmp_path)
    ev = source.eval_windows(upload, CharTokenizer(), num_windows=50, seq_len=30,
                             make_windows=_eval_windows)
    assert ev.describe() == {"source": "upload", "windows": 3, "seq_len": 30, "tokens": 90,
                             "sha256": hashlib.sha256(upload.read_bytes()).hexdigest()}
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(EvaluationSourceError, match="evaluation data") as err:
        source.eval_windows(short, CharTokenizer(), num_windows=1, seq_len=64,
                            make_windows=_eval_windows)
    assert describe_exception(err.value).code == "invalid_eval_source"
    download = FakeDownload({})
    download.errors = [LocalEntryNotFoundError("not cached")]
    with pytest.raises(HubOfflineError, match="evaluation dataset allenai/c4"):
        make_source(tmp_path, download).eval_windows(
            "c4", CharTokenizer(), num_windows=1, seq_len=8, make_windows=_eval_windows)
