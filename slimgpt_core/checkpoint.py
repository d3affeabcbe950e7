"""Per-layer checkpoints so an interrupted pruning run resumes from its last finished layer.

A checkpoint directory holds ``manifest.json`` (a fingerprint of model, plan, settings and
calibration data) and, per finished layer ``i``, ``layer_{i:04d}.safetensors`` with the pruned
layer's weights and ``layer_{i:04d}.json`` with its report. Files are written to a temporary
name and renamed, so a crash never leaves a half-written layer that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class CheckpointMismatch(RuntimeError):
    """The checkpoint directory belongs to a different model, plan or calibration set."""


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class LayerCheckpoints:
    def __init__(self, directory: str | os.PathLike[str], fingerprint: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / "manifest.json"
        if manifest.exists():
            existing = json.loads(manifest.read_text())
            if existing != fingerprint:
                raise CheckpointMismatch(
                    f"{self.dir} holds checkpoints of another run (model, plan, settings or "
                    "calibration data differ); use a fresh directory"
                )
        else:
            _atomic_write_bytes(manifest, lambda p: p.write_text(json.dumps(fingerprint, indent=1)))

    def _paths(self, index: int) -> tuple[Path, Path]:
        stem = self.dir / f"layer_{index:04d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def finished_layers(self) -> int:
        """Number of leading layers with a complete checkpoint."""
        count = 0
        while all(p.exists() for p in self._paths(count)):
            count += 1
        return count

    def layer_file(self, index: int) -> Path:
        return self._paths(index)[0]

    def save(self, index: int, layer: nn.Module, report: dict[str, Any],
             prefix: str = "") -> None:
        state = {prefix + k: v.detach().to("cpu").contiguous()
                 for k, v in layer.state_dict().items()}
        self.save_tensors(index, state, report)

    def save_tensors(self, index: int, tensors: dict[str, torch.Tensor],
                     report: dict[str, Any]) -> None:
        """Write layer ``index``'s weights (CPU tensors, any key prefix), then its report.

        The report is written last: its presence marks the layer as finished.
        """
        weights, meta = self._paths(index)
        _atomic_write_bytes(weights, lambda p: save_file(tensors, str(p)))
        _atomic_write_bytes(meta, lambda p: p.write_text(json.dumps(report)))

    def load_report(self, index: int) -> dict[str, Any]:
        return json.loads(self._paths(index)[1].read_text())

    def load_weights(self, index: int, layer: nn.Module, prefix: str = "") -> None:
        """Load layer ``index`` into ``layer`` (whose widths already match), dropping
        ``prefix`` from the stored keys when they carry it."""
        state = load_file(str(self._paths(index)[0]))
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        device = next(layer.parameters()).device
        layer.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)


def tensor_digest(t: torch.Tensor) -> str:
    """Content hash of a tensor (for fingerprinting calibration data)."""
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
