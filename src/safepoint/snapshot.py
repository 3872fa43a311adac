"""Snapshots: the state of a training loop as files, in memory, ready to be committed.

``capture`` turns ``{"model": model, "optimizer": opt, ...}`` into tensor files and a
``state.json``; ``restore.apply`` loads a committed checkpoint back into such a mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from safepoint.errors import ConfigError
from safepoint.fileio import dumps_json, is_safe_name
from safepoint.format import encode_tree
from safepoint.rng import capture_rng
from safepoint.schema import STATE_NAME, STATE_VERSION
from safepoint.sharding import is_sharded, local_pieces, shard_file

log = logging.getLogger("safepoint")

__all__ = ["STATE_NAME", "STATE_VERSION", "Snapshot", "TensorFile", "capture"]


@dataclass
class TensorFile:
    """A safetensors file to be written: tensors by name, optional string metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class Snapshot:
    """Everything one checkpoint holds, in memory. ``files`` maps a file name to a
    ``TensorFile`` or to the exact bytes of any other file (JSON, configs)."""

    step: int
    files: dict[str, TensorFile | bytes]
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = "step"
    fingerprint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    shards: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Of a sharded state (DTensors): per entry, the pieces this rank writes
    (``sharding.local_pieces``). Every rank writes its own files; rank 0 adds the index."""

    @property
    def sharded(self) -> bool:
        return bool(self.shards)

    @property
    def nbytes(self) -> int:
        """Payload bytes (tensor data plus other files), a close estimate of the size."""
        return sum(f.nbytes if isinstance(f, TensorFile) else len(f) for f in self.files.values())


def _state_dict(value: Any) -> tuple[str, Any]:
    if callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    ):
        return "stateful", value.state_dict()
    return "value", value


def copy_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A true CPU copy of ``tensors`` (aliases stay aliases of one copy)."""
    copies: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in tensors.items():
        key = id(t)
        if key not in copies:
            copies[key] = t.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


class StagingBuffers:
    """Reusable host-memory copies of a snapshot's tensors, for background saves.

    A buffer is reused while the tensor under the same file and name keeps its shape and
    dtype; buffers not used by the latest ``stage`` are released, so the memory held is at
    most one checkpoint's worth. Buffers for CUDA tensors are pinned so that the copy is
    a ``non_blocking`` DMA. Not thread-safe: the caller must not stage while a writer is
    still reading the previous snapshot.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self.pending: list[Any] = []  # CUDA events the writer must wait for

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def missing_bytes(self, snapshot: Snapshot) -> int:
        """Bytes ``stage(snapshot)`` would have to allocate (reuse not possible)."""
        total = 0
        for fname, name, t in _tensor_items(snapshot):
            buf = self._buffers.get((fname, name))
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                total += t.numel() * t.element_size()
        return total

    def _buffer(self, key: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.device.type == "cuda" and torch.cuda.is_available()
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        return buf

    def stage(self, snapshot: Snapshot) -> Snapshot:
        """A copy of ``snapshot`` whose tensors live in these buffers (a true copy).

        CUDA copies are queued ``non_blocking`` on the current stream, so they are ordered
        before the next step's kernels; ``ready()`` waits for them (the writer calls it).
        """
        files: dict[str, TensorFile | bytes] = {}
        used: set[tuple[str, str]] = set()
        self.pending = []
        cuda = False
        for fname, content in snapshot.files.items():
            if not isinstance(content, TensorFile):
                files[fname] = content
                continue
            copies: dict[int, torch.Tensor] = {}
            out: dict[str, torch.Tensor] = {}
            for name, t in content.tensors.items():
                if id(t) not in copies:
                    buf = self._buffer((fname, name), t)
                    used.add((fname, name))
                    non_blocking = t.device.type == "cuda"
                    cuda = cuda or non_blocking
                    with torch.no_grad():
                        buf.copy_(t.detach(), non_blocking=non_blocking)
                    copies[id(t)] = buf
                out[name] = copies[id(t)]
            files[fname] = TensorFile(out, content.metadata)
        for key in set(self._buffers) - used:
            del self._buffers[key]
        if cuda:
            event = torch.cuda.Event()
            event.record()
            self.pending.append(event)
        return replace(snapshot, files=files)

    def ready(self) -> None:
        """Block until the queued device-to-host copies of the last ``stage`` are done."""
        for event in self.pending:
            event.synchronize()
        self.pending = []

    def release(self) -> None:
        """Drop every buffer (memory goes back once the last snapshot using it is gone)."""
        self._buffers.clear()


def _tensor_items(snapshot: Snapshot) -> Iterator[tuple[str, str, torch.Tensor]]:
    for fname, content in snapshot.files.items():
        if isinstance(content, TensorFile):
            seen: set[int] = set()
            for name, t in content.tensors.items():
                if id(t) not in seen:
                    seen.add(id(t))
                    yield fname, name, t


def capture(
    state: Mapping[str, Any],
    *,
    step: int,
    copy: bool,
    rng: bool = True,
    progress: Mapping[str, Any] | None = None,
) -> Snapshot:
    """Snapshot ``state`` at ``step``.

    ``copy=False`` references the live tensors: only valid while training is paused
    until the snapshot is written. ``copy=True`` makes a CPU copy that training may then
    change freely. ``progress`` is extra JSON (epoch, data position...) stored as is.
    """
    files: dict[str, TensorFile | bytes] = {}
    entries: dict[str, Any] = {}
    shards: dict[str, dict[str, dict[str, Any]]] = {}
    for key, value in state.items():
        if not is_safe_name(key) or key in ("state", "safepoint"):
            raise ConfigError(
                f"state key {key!r} is not usable as a file name; use letters, digits, '_' "
                "and '-' (and not 'state' or 'safepoint')"
            )
        kind, obj = _state_dict(value)
        tree, tensors = encode_tree(obj)
        if any(is_sharded(t) for t in tensors.values()):
            rank, world = _rank_and_world()
            local, shards[key] = local_pieces(tensors, rank=rank)
            if local:
                files[shard_file(key, rank, world)] = TensorFile(
                    copy_tensors(local) if copy else local
                )
            entries[key] = {"kind": kind, "tree": tree, "file": None, "sharded": True}
            continue
        file = f"{key}.safetensors" if tensors else None
        if file:
            files[file] = TensorFile(copy_tensors(tensors) if copy else tensors)
        entries[key] = {"kind": kind, "tree": tree, "file": file}
    doc = {
        "version": STATE_VERSION,
        "step": step,
        "entries": entries,
        "rng": capture_rng() if rng else None,
        "progress": dict(progress or {}),
    }
    files[STATE_NAME] = dumps_json(doc)
    return Snapshot(step=step, files=files, shards=shards)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
