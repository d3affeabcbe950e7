"""Where decoder layers live while the pruner walks through them, and how they move.

Three placements, one interface (``acquire`` a layer on the compute device, ``release`` it):

* ``resident``: the whole model is on the device already; nothing moves (pruned layers are
  copied to the host only when a checkpoint wants them).
* ``host``: the model lives in host memory; each layer's tensors go to the device before it
  is pruned and the pruned tensors come back after.
* ``stream``: the model is a skeleton (parameters on the ``meta`` device); each layer's tensors
  come from a :class:`LayerSource` (the checkpoint's safetensors shards, a finished layer's
  checkpoint on resume, or generated weights in benchmarks), and the pruned layer is handed to
  a writer and returned to ``meta``: host memory holds a layer or two, never the model.

Transfers overlap compute: a reader thread fills pinned host buffers and copies them to the
device on a side CUDA stream while the previous layer is being pruned (prefetch), and a writer
thread copies pruned layers back and writes them out while the next one is pruned. The main
stream only waits on an event when it needs the layer. Without CUDA the same code runs
synchronously-equivalent on the CPU (threads, no streams), which is what CPU tests exercise.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
OnHost = Callable[[dict[str, torch.Tensor]], None]

MODES: tuple[str, ...] = ("resident", "host", "stream")


class LayerSource(Protocol):
    """Host tensors of one layer, keyed relative to the layer (``self_attn.q_proj.weight``)."""

    def read_layer(self, index: int, alloc: Alloc) -> dict[str, torch.Tensor]: ...


class ModuleSource:
    """The tensors of in-memory layers (the ``host`` placement's source)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers

    def read_layer(self, index: int, alloc: Alloc) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in _layer_tensors(self.layers[index]).items():
            buf = alloc(tuple(t.shape), t.dtype)
            buf.copy_(t)
            out[name] = buf
        return out


class ShardSource:
    """Layer ``i`` of a safetensors checkpoint: the keys under ``{prefix}{i}.``."""

    def __init__(self, checkpoint: Any, prefix: str) -> None:
        self.checkpoint, self.prefix = checkpoint, prefix
        self._by_layer: dict[int, list[str]] = {}
        for key in checkpoint.tensors:
            if key.startswith(prefix):
                head, _, _rest = key[len(prefix):].partition(".")
                if head.isdigit():
                    self._by_layer.setdefault(int(head), []).append(key)

    def read_layer(self, index: int, alloc: Alloc) -> dict[str, torch.Tensor]:
        keys = self._by_layer.get(index)
        if not keys:
            raise KeyError(f"the checkpoint has no tensors for layer {index} "
                           f"(expected keys under {self.prefix}{index}.)")
        out = {}
        strip = f"{self.prefix}{index}."
        for key in keys:
            info = self.checkpoint.tensors[key]
            out[key[len(strip):]] = self.checkpoint.read_into(key, alloc(info.shape, info.dtype))
        return out


def _nbytes(tensors: Any) -> int:
    """Bytes of ``tensors`` carved from a slab (each start aligned)."""
    return sum(t.numel() * t.element_size() + PinnedSlab.ALIGN for t in tensors)


def _layer_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    out = {name: p.detach() for name, p in layer.named_parameters()}
    out.update({name: b for name, b in layer.named_buffers()})
    return out


def assign_tensors(layer: nn.Module, tensors: dict[str, torch.Tensor], *, strict: bool) -> None:
    """Make ``tensors`` the layer's parameters/buffers (no copy). ``strict``: every parameter
    and persistent buffer must be given and nothing else."""
    expected = set(layer.state_dict().keys()) if strict else set()
    for name, t in tensors.items():
        path, _, leaf = name.rpartition(".")
        mod = layer.get_submodule(path) if path else layer
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        elif leaf in mod._buffers:
            mod._buffers[leaf] = t
        else:
            raise KeyError(f"unexpected tensor {name} for {type(layer).__name__}")
        expected.discard(name)
    if expected:
        raise KeyError(f"missing tensors for {type(layer).__name__}: {sorted(expected)[:8]}")


class PinnedSlab:
    """One reusable pinned buffer that a whole layer's tensors are carved from.

    Pinned (page-locked) memory is what lets host<->device copies run asynchronously at full
    bus speed, but allocating it is slow and takes a driver lock that stalls the compute
    thread; allocating per tensor and per layer (the widths change after pruning) did that
    every layer. One slab per direction, grown to the largest layer, is allocated once.
    Only one layer at a time may use a slab: its user must be done with the previous layer's
    tensors (the reader and writer threads each handle one layer after the other).
    """

    ALIGN = 512

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self.buffer: torch.Tensor | None = None
        self.offset = 0

    def reset(self, reserve: int = 0) -> None:
        """Start a new layer; make sure ``reserve`` bytes fit without growing."""
        self.offset = 0
        if reserve and (self.buffer is None or self.buffer.numel() < reserve):
            self.buffer = torch.empty(reserve, dtype=torch.uint8, pin_memory=self.pin)

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        start = -(-self.offset // self.ALIGN) * self.ALIGN
        if self.buffer is None or start + nbytes > self.buffer.numel():
            # Tensors already carved from the old buffer keep it alive until they are done.
            size = max(start + nbytes, 2 * (self.buffer.numel() if self.buffer is not None else 0))
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            start = 0
        self.offset = start + nbytes
        return self.buffer[start:start + nbytes].view(dtype).view(shape)


@dataclass
class _Fetched:
    future: Future[tuple[dict[str, torch.Tensor], Any]]


@dataclass
class TransferStats:
    """Seconds the main thread waited for layers to arrive (transfers that overlapped
    compute cost nothing here) and bytes moved each way."""

    wait_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0


class LayerStore:
    def __init__(self, layers: nn.ModuleList, device: torch.device, mode: str, *,
                 source: LayerSource | None = None, dtype: torch.dtype | None = None,
                 prefetch: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown placement {mode!r}; choose one of {MODES}")
        if mode == "stream" and source is None:
            raise ValueError("the stream placement needs a layer source")
        self.layers, self.device, self.mode, self.dtype = layers, device, mode, dtype
        self.source = source if source is not None else ModuleSource(layers)
        self.prefetch_enabled = prefetch and mode != "resident"
        self.cuda = device.type == "cuda"
        # One side stream per direction, so a layer coming in and one going out use both
        # directions of the bus at once.
        self.side_in = torch.cuda.Stream(device) if self.cuda else None
        self.side_out = torch.cuda.Stream(device) if self.cuda else None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="slimgpt-read")
        self._writes: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._write_error: Exception | None = None
        self._writer = threading.Thread(target=self._write_loop, name="slimgpt-write",
                                        daemon=True)
        self._writer.start()
        self._slab_in, self._slab_out = PinnedSlab(), PinnedSlab()
        self._fetched: dict[int, _Fetched] = {}
        self._host_state: dict[int, dict[str, torch.Tensor]] = {}
        self.stats = TransferStats()

    # -- reading ---------------------------------------------------------------------------
    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def _read(self, index: int, source: LayerSource) -> tuple[dict[str, torch.Tensor], Any]:
        if not self.cuda:
            # Without a device the host tensors become the layer's own: fresh memory each time.
            host = source.read_layer(index, self._alloc)
            out = {k: self._cast(v) for k, v in host.items()}
            return out, None
        self._slab_in.reset(_nbytes(_layer_tensors(self.layers[index]).values()))
        host = source.read_layer(index, self._slab_in.alloc)
        assert self.side_in is not None
        with torch.cuda.device(self.device), torch.cuda.stream(self.side_in):
            dev = {k: self._cast(v.to(self.device, non_blocking=True)) for k, v in host.items()}
            event = torch.cuda.Event()
            event.record(self.side_in)
        # The host buffers must outlive the asynchronous copies: wait here, in this thread.
        event.synchronize()
        return dev, event

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            return t.to(self.dtype)
        return t

    def prefetch(self, index: int, source: LayerSource | None = None) -> None:
        """Start bringing layer ``index`` to the device in the background."""
        if not self.prefetch_enabled or index in self._fetched or index >= len(self.layers):
            return
        self._start(index, source)

    def _start(self, index: int, source: LayerSource | None) -> _Fetched:
        src = source if source is not None else self.source
        fetched = _Fetched(self._reader.submit(self._read, index, src))
        self._fetched[index] = fetched
        return fetched

    def acquire(self, index: int, source: LayerSource | None = None) -> nn.Module:
        """Layer ``index`` with its tensors on the device, ready for the main stream."""
        self._raise_write_error()
        layer = self.layers[index]
        if self.mode == "resident":
            return layer
        fetched = self._fetched.pop(index, None) or self._start(index, source)
        self._fetched.pop(index, None)
        t0 = time.perf_counter()
        tensors, event = fetched.future.result()
        if event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            for t in tensors.values():
                t.record_stream(main)
        self.stats.wait_s += time.perf_counter() - t0
        self.stats.bytes_in += sum(t.numel() * t.element_size() for t in tensors.values())
        if self.mode == "host":
            self._host_state[index] = _layer_tensors(layer)
        assign_tensors(layer, tensors, strict=self.mode == "stream")
        return layer

    # -- writing ---------------------------------------------------------------------------
    def release(self, index: int, layer: nn.Module, *, changed: bool = True,
                on_host: OnHost | None = None) -> None:
        """Done with layer ``index`` on the device.

        ``changed``: the layer was pruned (its tensors must go back to host memory in the
        ``host`` placement); ``on_host`` receives its tensors in host memory, on the writer
        thread (checkpoints, output shards). In the ``stream`` placement the layer returns to
        ``meta`` at once; its device memory is reused after the copy has finished.
        """
        self._raise_write_error()
        if self.mode == "host" and not changed:
            original = self._host_state.pop(index)
            assign_tensors(layer, original, strict=False)
            if on_host is not None:
                self._writes.put(lambda: on_host(original))
            return
        self._host_state.pop(index, None)
        needs_host = on_host is not None or (self.mode == "host" and changed)
        if not needs_host:
            if self.mode == "stream":
                layer.to("meta")
            return
        tensors = _layer_tensors(layer)
        event = None
        if self.cuda and any(t.is_cuda for t in tensors.values()):
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        if self.mode == "stream":
            layer.to("meta")
        self.stats.bytes_out += sum(t.numel() * t.element_size() for t in tensors.values())

        def write() -> None:
            host = self._to_host(tensors, event)
            if self.mode == "host":
                assign_tensors(layer, host, strict=False)
            if on_host is not None:
                on_host(host)

        self._writes.put(write)

    def _to_host(self, tensors: dict[str, torch.Tensor], event: Any) -> dict[str, torch.Tensor]:
        if event is None:
            return {k: v.detach() for k, v in tensors.items()}
        assert self.side_out is not None
        with torch.cuda.device(self.device), torch.cuda.stream(self.side_out):
            self.side_out.wait_event(event)
            pinned = {}
            self._slab_out.reset(_nbytes(tensors.values()))
            for k, v in tensors.items():
                buf = self._slab_out.alloc(tuple(v.shape), v.dtype)
                buf.copy_(v, non_blocking=True)
                pinned[k] = buf
            done = torch.cuda.Event()
            done.record(self.side_out)
        done.synchronize()
        tensors.clear()  # the device copies may be reused from here on
        if self.mode == "host":
            # Pageable copies: a model-sized amount of pinned memory would starve the system.
            return {k: torch.empty_like(v, pin_memory=False).copy_(v) for k, v in pinned.items()}
        # Views of the slab: valid until the next layer is copied out, i.e. for on_host.
        return pinned

    def _write_loop(self) -> None:
        while True:
            job = self._writes.get()
            if job is None:
                self._writes.task_done()
                return
            try:
                if self._write_error is None:
                    job()
            except Exception as err:  # noqa: BLE001 - surfaced on the main thread at the next call
                self._write_error = err
            finally:
                self._writes.task_done()

    def _raise_write_error(self) -> None:
        if self._write_error is not None:
            err, self._write_error = self._write_error, None
            raise RuntimeError(f"writing a pruned layer failed: {err}") from err

    def flush(self) -> None:
        """Wait until every released layer is written out; raise the first write error."""
        self._writes.join()
        self._raise_write_error()

    def close(self) -> None:
        """Finish all writes and stop the threads (also after an error: writes are kept)."""
        try:
            self.flush()
        finally:
            self._writes.put(None)
            self._writer.join(timeout=60)
            for fetched in self._fetched.values():
                fetched.future.cancel()
            self._fetched.clear()
            self._reader.shutdown(wait=True)
