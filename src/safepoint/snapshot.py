"""Snapshots: the state of a training loop as files, in memory, ready to be committed.

``capture`` turns ``{"model": model, "optimizer": opt, ...}`` into tensor files and a
``state.json``; ``restore.apply`` loads a committed checkpoint back into such a mapping.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from safepoint.errors import ConfigError
from safepoint.fileio import dumps_json, is_safe_name
from safepoint.format import encode_tree
from safepoint.rng import FrozenRng, freeze_rng, rng_json
from safepoint.schema import STATE_NAME, STATE_VERSION
from safepoint.sharding import is_sharded, local_pieces, shard_file

log = logging.getLogger("safepoint")

__all__ = ["STATE_NAME", "STATE_VERSION", "Snapshot", "TensorFile", "capture"]


@dataclass
class TensorFile:
    """A safetensors file to be written: tensors by name, optional string metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] | None = None
    image: Any = None
    """The ``staging.FileImage`` the tensors are views of, when a background save staged
    them into one: the writer writes it as it lies."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class Snapshot:
    """Everything one checkpoint holds, in memory. ``files`` maps a file name to a
    ``TensorFile`` or to the exact bytes of any other file (JSON, configs); ``deferred``
    maps a file name to what makes its bytes, run by ``resolve`` on the thread that
    writes the checkpoint (a background save's writer), so encoding costs the training
    thread nothing. What it reads must be frozen when the snapshot is taken (copies,
    immutable values): training goes on meanwhile."""

    step: int
    files: dict[str, TensorFile | bytes]
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = "step"
    fingerprint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    deferred: dict[str, Callable[[], bytes]] = field(default_factory=dict)
    shards: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Of a sharded state (DTensors): per entry, the pieces this rank writes
    (``sharding.local_pieces``). Every rank writes its own files; rank 0 adds the index."""
    optimizers: list[Any] = field(default_factory=list)
    """The optimizers of the state: a copy-free background save (``safepoint.fence``)
    writes the tensors they own as they are and holds their ``step()`` meanwhile."""
    fence: Any = None
    """A copy-free save's ``fence.OptimizerFence``: some tensors are the live ones.
    ``Store.commit`` calls ``fence.check()`` once every file is written, before the
    commit (raises if one changed); the Saver ``fence.release()``s it once committed or
    failed, retries included (a retry writes the live tensors again)."""

    @property
    def sharded(self) -> bool:
        return bool(self.shards)

    @property
    def nbytes(self) -> int:
        """Payload bytes (tensor data plus other files), a close estimate of the size;
        ``deferred`` files count once resolved."""
        return sum(f.nbytes if isinstance(f, TensorFile) else len(f) for f in self.files.values())

    def resolve(self) -> Snapshot:
        """Make the ``deferred`` files' bytes (once); returns ``self``."""
        deferred, self.deferred = self.deferred, {}
        for name, make in deferred.items():
            self.files[name] = make()
        return self


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
        "rng": None,
        "progress": dict(progress or {}),
    }
    # Encoded now but for the RNG states (frozen now, encoded by the writer): a user's
    # ``progress`` may be changed in place once this returns.
    texts = {key: dumps_json(doc[key]).decode()[:-1] for key in doc if key != "rng"}
    frozen = freeze_rng() if rng else None
    return Snapshot(
        step=step,
        files=files,
        deferred={STATE_NAME: lambda: _state_json(texts, frozen)},
        shards=shards,
        optimizers=[v for v in state.values() if isinstance(v, torch.optim.Optimizer)],
    )


def _state_json(texts: dict[str, str], rng: FrozenRng | None) -> bytes:
    """``dumps_json(doc)`` from the JSON text of each key of ``doc`` but ``"rng"``."""
    parts = {**texts, "rng": "null" if rng is None else rng_json(rng)}
    return ("{" + ",".join(f"{json.dumps(k)}:{parts[k]}" for k in sorted(parts)) + "}\n").encode()


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
