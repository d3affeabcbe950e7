"""Reading a checkpoint's safetensors shards one tensor at a time, and writing new shards.

A model too large for host memory is never loaded whole: a tensor is read with positioned
reads straight into the buffer that will carry it to the GPU (a pinned one when there is a
GPU), so host memory holds the tensors of a layer or two, not the model. (Reading through a
memory map would do the same work, but every page touched stays mapped into the process and
its resident size grows to the whole checkpoint, which is what a memory limit looks at.)
The format is simple (an 8-byte header length, a JSON header of dtype / shape /
byte range per tensor, then the bytes), so the reader parses it itself: that is what lets a
tensor land in a caller's buffer with one copy.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class ShardError(ValueError):
    """A checkpoint folder's safetensors files are missing, malformed or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file (name -> where its bytes are)."""
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ShardError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise ShardError(f"{path} has an implausible header length {length}")
        header = json.loads(fh.read(length))
    base = 8 + length
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ShardError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        out[name] = TensorInfo(path, dtype, tuple(meta["shape"]), base + begin, end - begin)
    return out


class ShardedCheckpoint:
    """Every tensor of a Hugging Face folder's ``*.safetensors`` files, read on demand."""

    def __init__(self, folder: str | os.PathLike[str],
                 files: list[Path] | None = None) -> None:
        self.folder = Path(folder)
        if files is not None:
            self._open([self.folder / f for f in files])
            return
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise ShardError(f"{self.folder} holds no safetensors weights")
        self._open([self.folder / name for name in files])

    @classmethod
    def from_files(cls, paths: list[Path]) -> ShardedCheckpoint:
        """The tensors of exactly these safetensors files."""
        paths = [Path(p) for p in paths]
        return cls(paths[0].parent if paths else Path("."), files=paths)

    def _open(self, paths: list[Path]) -> None:
        self.tensors: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        for path in paths:
            if not path.is_file():
                raise ShardError(f"{self.folder}: weights file {path.name} is missing")
            self.tensors.update(read_header(path))

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor ``key`` into ``out`` (a contiguous CPU tensor of its dtype and shape)."""
        info = self.tensors[key]
        if out.dtype != info.dtype or tuple(out.shape) != info.shape or not out.is_contiguous():
            raise ShardError(f"{key}: buffer {tuple(out.shape)} {out.dtype} does not fit "
                             f"{info.shape} {info.dtype}")
        dest = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd, done = self._fd(info.file), 0
        while done < info.nbytes:
            n = os.preadv(fd, [dest[done:]], info.start + done)
            if n <= 0:
                raise ShardError(f"{info.file} ends inside tensor {key}")
            done += n
        return out

    def read(self, key: str, *, pin: bool = False) -> torch.Tensor:
        info = self.tensors[key]
        out = torch.empty(info.shape, dtype=info.dtype, pin_memory=pin)
        return self.read_into(key, out)

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self.__dict__.get("_fds", {}).clear()

    def __del__(self) -> None:
        self.close()


def shard_name(index: int, total: int) -> str:
    """Hugging Face's shard file naming: ``model-00001-of-00004.safetensors``."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def group_by_size(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Split tensor names (in order) into runs of at most ``max_bytes`` (one tensor may exceed)."""
    groups: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name, size in sizes.items():
        if current and total + size > max_bytes:
            groups.append(current)
            current, total = [], 0
        current.append(name)
        total += size
    if current:
        groups.append(current)
    return groups


def write_index(folder: Path, files: Iterator[Path] | list[Path]) -> dict[str, str]:
    """Write ``model.safetensors.index.json`` for ``files`` (inside ``folder``)."""
    weight_map: dict[str, str] = {}
    total = 0
    for path in files:
        for name, info in read_header(path).items():
            if name in weight_map:
                raise ShardError(f"tensor {name} is in both {weight_map[name]} and {path.name}")
            weight_map[name] = path.name
            total += info.nbytes
    doc = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return weight_map
