"""Snapshots: the state of a training loop as files, in memory, ready to be committed.

``capture`` turns ``{"model": model, "optimizer": opt, ...}`` into tensor files and a
``state.json``; ``apply`` loads a committed checkpoint back into such a mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from safepoint.errors import ConfigError, CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.format import decode_tree, dumps_json, encode_tree, is_safe_name, loads_json
from safepoint.format import read_safetensors as _read_safetensors
from safepoint.rng import capture_rng, restore_rng

log = logging.getLogger("safepoint")

STATE_NAME = "state.json"
STATE_VERSION = 1


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
    for key, value in state.items():
        if not is_safe_name(key) or key in ("state", "safepoint"):
            raise ConfigError(
                f"state key {key!r} is not usable as a file name; use letters, digits, '_' "
                "and '-' (and not 'state' or 'safepoint')"
            )
        kind, obj = _state_dict(value)
        tree, tensors = encode_tree(obj)
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
    return Snapshot(step=step, files=files)


def read_state_doc(path: Path) -> dict[str, Any]:
    """The parsed ``state.json`` of a committed checkpoint folder."""
    where = str(path / STATE_NAME)
    try:
        data = (path / STATE_NAME).read_bytes()
    except OSError as e:
        raise CorruptCheckpointError(f"{where}: cannot read ({e.strerror})") from e
    doc = loads_json(data, where=where)
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
        raise CorruptCheckpointError(f"{where}: not a safepoint state file")
    if not isinstance(doc.get("version"), int) or doc["version"] > STATE_VERSION:
        raise IncompatibleCheckpointError(
            f"{where}: state format {doc.get('version')!r} is newer than this safepoint reads; "
            "upgrade safepoint"
        )
    return doc


def apply(path: Path, state: MutableMapping[str, Any], *, rng: bool = True) -> dict[str, Any]:
    """Load the checkpoint folder ``path`` into ``state`` in place; return its progress.

    Objects with ``load_state_dict`` are loaded in place, tensors are copied into in
    place, other values are replaced in the mapping. The checkpoint must already be
    verified: this reads only files the manifest lists.
    """
    doc = read_state_doc(path)
    entries: dict[str, Any] = doc["entries"]
    missing = [k for k in state if k not in entries]
    if missing:
        raise IncompatibleCheckpointError(
            f"{path}: the checkpoint has no {', '.join(map(repr, missing))} "
            f"(it holds {', '.join(map(repr, entries)) or 'nothing'}); restore with the same "
            "state keys it was saved with"
        )
    for key in entries:
        if key not in state:
            log.warning(
                "%s: checkpoint entry %r has no place in the state; not restored", path, key
            )
    for key, value in state.items():
        entry = entries[key]
        if not isinstance(entry, dict):
            raise CorruptCheckpointError(f"{path / STATE_NAME}: entry {key!r} is malformed")
        tensors: dict[str, torch.Tensor] = {}
        if entry.get("file"):
            name = entry["file"]
            if not is_safe_name(name):
                raise CorruptCheckpointError(f"{path / STATE_NAME}: bad file name {name!r}")
            tensors, _ = _read_safetensors(path / name)
        obj = decode_tree(entry.get("tree"), tensors, where=f"{path / STATE_NAME}:{key}")
        _load_into(state, key, value, obj, entry.get("kind"), path)
    if rng and doc.get("rng"):
        restore_rng(doc["rng"])
    progress = doc.get("progress") or {}
    if not isinstance(progress, dict):
        raise CorruptCheckpointError(f"{path / STATE_NAME}: progress is not an object")
    return progress


def _load_into(
    state: MutableMapping[str, Any], key: str, value: Any, obj: Any, kind: Any, path: Path
) -> None:
    if kind == "stateful":
        if not callable(getattr(value, "load_state_dict", None)):
            raise IncompatibleCheckpointError(
                f"{path}: {key!r} was saved from an object with state_dict(), but the "
                f"state now holds a {type(value).__name__}"
            )
        try:
            value.load_state_dict(obj)
        # a damaged or hostile tree makes load_state_dict fail in many ways
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise IncompatibleCheckpointError(
                f"{path}: cannot load {key!r} ({str(e).splitlines()[0]}); is this checkpoint "
                "from the same model and optimizer configuration?"
            ) from e
    elif isinstance(value, torch.Tensor) and isinstance(obj, torch.Tensor):
        if value.shape != obj.shape or value.dtype != obj.dtype:
            raise IncompatibleCheckpointError(
                f"{path}: {key!r} is {obj.dtype} {tuple(obj.shape)} in the checkpoint but "
                f"{value.dtype} {tuple(value.shape)} now"
            )
        with torch.no_grad():
            value.copy_(obj)
    else:
        state[key] = obj
