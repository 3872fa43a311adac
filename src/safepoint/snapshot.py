"""Snapshots: the state of a training loop as files, in memory, ready to be committed.

``capture`` turns ``{"model": model, "optimizer": opt, ...}`` into tensor files and a
``state.json``; ``apply`` loads a committed checkpoint back into such a mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
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
    return dict(doc.get("progress") or {})


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
        except (RuntimeError, ValueError, KeyError) as e:
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
