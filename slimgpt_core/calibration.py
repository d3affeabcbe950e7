"""Token windows for calibration and evaluation, cut from plain text."""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path
from typing import Any

import torch

BUNDLED_CALIBRATION = "calib_excerpt.txt"
BUNDLED_EVALUATION = "eval_excerpt.txt"


def bundled_text(name: str) -> str:
    """A text excerpt shipped with the package (see ``slimgpt_core/data/README.md``)."""
    return resources.files("slimgpt_core").joinpath("data", name).read_text(encoding="utf-8")


def read_text_source(path: str | Path) -> str:
    """Text of a ``.txt`` file, or the ``text`` fields of a ``.jsonl`` file joined by blank lines."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{lineno}: each line needs a string field 'text'")  # noqa: TRY004 - a bad file, not a bad argument
        texts.append(record["text"])
    return "\n\n".join(texts)


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(text: str, tokenizer: Any, num_samples: int, seq_len: int,
                   seed: int = 0) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens (as SparseGPT samples C4)."""
    if num_samples <= 0 or seq_len <= 0:
        raise ValueError("num_samples and seq_len must be positive")
    ids = tokenize(text, tokenizer)
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens; windows of {seq_len} "
                         "need more text")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seq_len) for _ in range(num_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def consecutive_windows(text: str, tokenizer: Any, seq_len: int,
                        max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start of ``text`` (the usual perplexity protocol)."""
    ids = tokenize(text, tokenizer)
    count = ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window "
                         f"of {seq_len}")
    return ids[: count * seq_len].view(count, seq_len)
