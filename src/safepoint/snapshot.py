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
from safepoint.fileio import dumps_json, is_safe_name, read_regular
from safepoint.format import decode_tree, encode_tree, read_safetensors
from safepoint.manifest import MANIFEST_NAME, Manifest
from safepoint.rng import capture_rng, restore_rng
from safepoint.schema import STATE_NAME, STATE_VERSION, parse_state

log = logging.getLogger("safepoint")

__all__ = ["STATE_NAME", "STATE_VERSION", "Snapshot", "TensorFile", "apply", "capture"]


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


def read_state_doc(path: Path, manifest: Manifest | None = None) -> dict[str, Any]:
    """The parsed and checked ``state.json`` of a committed checkpoint folder.

    With ``manifest`` the file must have the size and checksum it lists; without, it is
    read only if it is a regular file of sane size. Raises ``CorruptCheckpointError`` or
    ``IncompatibleCheckpointError`` (a newer state format)."""
    where = str(path / STATE_NAME)
    if manifest is None:
        data = read_regular(path / STATE_NAME, max_size=_MAX_STATE_BYTES)
        return parse_state(bytes(data), files=None, where=where)
    entry = manifest.files.get(STATE_NAME)
    if entry is None:
        raise CorruptCheckpointError(f"{where}: not listed in the manifest")
    data = read_regular(path / STATE_NAME, size=entry.size, checksum=entry.checksum)
    return parse_state(bytes(data), files=manifest.files, where=where)


_MAX_STATE_BYTES = 256 << 20  # state.json holds no tensors: a few MB at most


def read_manifest(path: Path) -> Manifest:
    """The checked manifest of the checkpoint folder ``path`` (``CorruptCheckpointError``)."""
    where = path / MANIFEST_NAME
    data = read_regular(where, max_size=_MAX_STATE_BYTES)
    return Manifest.from_json(bytes(data), where=str(where))


def apply(
    path: Path,
    state: MutableMapping[str, Any],
    *,
    rng: bool = True,
    manifest: Manifest | None = None,
) -> dict[str, Any]:
    """Load the checkpoint folder ``path`` into ``state`` in place; return its progress.

    Objects with ``load_state_dict`` are loaded in place, tensors are copied into in
    place, other values are replaced in the mapping. All or nothing: every file is read
    and checked against ``manifest`` (read from ``path`` if not given: only files it
    lists are opened, each by fd, its size and checksum checked on the bytes loaded),
    and every entry against the live object it goes into (kind, keys, shapes), before
    anything is changed. Raises ``CorruptCheckpointError`` (damaged or hostile files) or
    ``IncompatibleCheckpointError`` (does not fit ``state``), with ``state`` untouched.
    """
    manifest = manifest or read_manifest(path)
    doc = read_state_doc(path, manifest)
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
    decoded = {}
    for key, value in state.items():
        entry = entries[key]
        tensors: dict[str, torch.Tensor] = {}
        if entry.get("file"):
            name = entry["file"]  # listed in the manifest: parse_state checked it
            listed = manifest.files[name]
            tensors, _ = read_safetensors(path / name, size=listed.size, checksum=listed.checksum)
        obj = decode_tree(entry.get("tree"), tensors, where=f"{path / STATE_NAME}:{key}")
        check_fits(key, value, obj, entry["kind"], where=str(path))
        decoded[key] = obj
    for key, obj in decoded.items():
        _load_into(state, key, state[key], obj, entries[key]["kind"], path)
    if rng and doc.get("rng"):
        restore_rng(doc["rng"])
    return doc.get("progress") or {}


def check_fits(key: str, value: Any, obj: Any, kind: str, *, where: str) -> None:
    """Raise ``IncompatibleCheckpointError`` unless ``obj`` (decoded from a checkpoint)
    can be loaded into the live ``value`` as a whole: loading it cannot fail half way,
    and a module or optimizer gets tensors of the shapes it has."""

    def no(problem: str) -> IncompatibleCheckpointError:
        return IncompatibleCheckpointError(
            f"{where}: cannot restore {key!r}: {problem}; is this checkpoint from the same "
            "model and optimizer configuration?"
        )

    stateful = callable(getattr(value, "load_state_dict", None))
    if kind == "value":
        if stateful:
            raise no(f"it was saved as a plain value, but the state holds a {type(value).__name__}")
        if isinstance(value, torch.Tensor) and not (
            isinstance(obj, torch.Tensor) and obj.shape == value.shape and obj.dtype == value.dtype
        ):
            found = (
                f"{obj.dtype} {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else "no tensor"
            )
            raise no(f"the checkpoint holds {found}, the state {value.dtype} {tuple(value.shape)}")
        return
    if not stateful:
        raise no(
            "it was saved from an object with state_dict(), the state holds a "
            + type(value).__name__
        )
    if not isinstance(obj, dict):
        raise no(f"its saved state is a {type(obj).__name__}, not a state dict")
    if isinstance(value, torch.nn.Module):
        _check_module(value, obj, no)
    elif isinstance(value, torch.optim.Optimizer):
        _check_optimizer(value, obj, no)
    elif isinstance(value, torch.optim.lr_scheduler.LRScheduler):
        # load_state_dict does __dict__.update(): an unknown key would set any attribute
        unknown = set(obj) - set(value.state_dict())
        if unknown:
            raise no(f"unknown scheduler fields {sorted(map(str, unknown))[:3]}")


def _check_module(module: torch.nn.Module, obj: dict[Any, Any], no: Any) -> None:
    live = module.state_dict()
    missing, unexpected = set(live) - set(obj), set(obj) - set(live)
    if missing or unexpected:
        raise no(
            f"keys missing {sorted(missing)[:3]}, unexpected {sorted(map(str, unexpected))[:3]}"
        )
    for name, t in live.items():
        saved = obj[name]
        if isinstance(t, torch.Tensor) and (
            not isinstance(saved, torch.Tensor) or saved.shape != t.shape
        ):
            found = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise no(f"{name} is {found} in the checkpoint, {tuple(t.shape)} in the model")


# torch.optim optimizers whose per-parameter state tensors all have the parameter's shape
# (Adafactor's factored moments do not, nor do many third-party optimizers').
_PARAM_SHAPED = frozenset(
    "SGD Adam AdamW Adamax NAdam RAdam RMSprop Adagrad Adadelta ASGD Rprop SparseAdam".split()  # noqa: SIM905
)


def _check_optimizer(opt: torch.optim.Optimizer, obj: dict[Any, Any], no: Any) -> None:
    groups, saved_state = obj.get("param_groups"), obj.get("state")
    if not isinstance(groups, list) or not isinstance(saved_state, dict):
        raise no("the optimizer state has no param_groups list or state dict")
    if len(groups) != len(opt.param_groups):
        raise no(f"{len(groups)} parameter groups saved, {len(opt.param_groups)} now")
    params: dict[Any, torch.Tensor] = {}
    for i, (saved, live) in enumerate(zip(groups, opt.param_groups, strict=True)):
        ids = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(ids, list) or len(ids) != len(live["params"]):
            raise no(f"parameter group {i} holds another number of parameters")
        for k, v in live.items():
            if k != "params" and k in saved and not _same_kind(v, saved[k]):
                raise no(f"parameter group {i}: {k} is {saved[k]!r}, expected like {v!r}")
        for pid, p in zip(ids, live["params"], strict=True):
            if not isinstance(pid, int) or pid in params:
                raise no(f"parameter group {i} has a bad or repeated parameter id {pid!r}")
            params[pid] = p
    strict = type(opt).__module__.startswith("torch.optim") and type(opt).__name__ in _PARAM_SHAPED
    for pid, st in saved_state.items():
        if pid not in params or not isinstance(st, dict):
            raise no(f"state for an unknown parameter {pid!r}")
        for k, t in st.items():
            if (
                strict
                and isinstance(t, torch.Tensor)
                and t.dim() > 0
                and t.shape != params[pid].shape
            ):
                raise no(
                    f"state {k!r} of parameter {pid} is {tuple(t.shape)}, "
                    f"the parameter {tuple(params[pid].shape)}"
                )


def _same_kind(live: Any, saved: Any) -> bool:
    """A saved hyperparameter can replace the live one (lr, betas, momentum, flags)."""
    if isinstance(live, bool) or live is None:
        return True  # flags and optional values: load_state_dict takes what was saved
    if isinstance(live, (int, float, torch.Tensor)):
        return isinstance(saved, (int, float, torch.Tensor)) and not isinstance(saved, bool)
    if isinstance(live, (tuple, list)):
        return (
            isinstance(saved, (tuple, list))
            and len(saved) == len(live)
            and all(_same_kind(a, b) for a, b in zip(live, saved, strict=True))
        )
    return True


def _load_into(
    state: MutableMapping[str, Any], key: str, value: Any, obj: Any, kind: Any, path: Path
) -> None:
    if kind == "stateful":
        try:
            value.load_state_dict(obj)
        # check_fits makes this unlikely; a failure here still names the checkpoint
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise IncompatibleCheckpointError(
                f"{path}: cannot load {key!r} ({str(e).splitlines()[0]}); is this checkpoint "
                "from the same model and optimizer configuration?"
            ) from e
    elif isinstance(value, torch.Tensor):
        with torch.no_grad():
            value.copy_(obj)
    else:
        state[key] = obj
