"""Restore: a committed checkpoint loaded back into the live state, all or nothing.

``apply`` reads only files the manifest lists (each checked by size and checksum on the
bytes loaded), checks every entry against the live object it goes into, and only then
loads. A sharded entry (``sharding.py``) is read as this rank's piece of each live
DTensor, whatever number of processes saved it.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import torch

from safepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.fileio import read_regular
from safepoint.fits import check_fits
from safepoint.format import decode_tree, encode_tree, read_safetensors
from safepoint.manifest import MANIFEST_NAME, Manifest
from safepoint.rng import restore_rng
from safepoint.schema import STATE_NAME, parse_state
from safepoint.sharding import (
    SHARDS_NAME,
    ShardedTensor,
    assemble,
    is_sharded,
    like,
    parse_index,
    target_box,
)

log = logging.getLogger("safepoint")

__all__ = ["apply", "check_fits", "read_manifest", "read_state_doc"]


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
    partial: bool = False,
) -> dict[str, Any]:
    """Load the checkpoint folder ``path`` into ``state`` in place; return its progress.

    Objects with ``load_state_dict`` are loaded in place, tensors are copied into in
    place, other values are replaced in the mapping. All or nothing: every file is read
    and checked against ``manifest`` (read from ``path`` if not given: only files it
    lists are opened, each by fd, its size and checksum checked on the bytes loaded),
    and every entry against the live object it goes into (kind, keys, shapes), before
    anything is changed. Raises ``CorruptCheckpointError`` (damaged or hostile files) or
    ``IncompatibleCheckpointError`` (does not fit ``state``), with ``state`` untouched.
    ``partial``: ``state`` is meant to hold only some entries (no warning for the others).
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
        if key not in state and not partial:
            log.warning(
                "%s: checkpoint entry %r has no place in the state; not restored", path, key
            )
    decoded = {}
    files = _Files(path, manifest)
    for key, value in state.items():
        entry = entries[key]
        tensors: dict[str, torch.Tensor] = {}
        if entry.get("sharded"):
            tensors = _read_sharded(key, value, files)
        elif entry.get("file"):
            tensors = _fit_to_live(value, files.read(entry["file"]))
        obj = decode_tree(entry.get("tree"), tensors, where=f"{path / STATE_NAME}:{key}")
        check_fits(key, value, obj, entry["kind"], where=str(path))
        decoded[key] = obj
    for key, obj in decoded.items():
        _load_into(state, key, state[key], obj, entries[key]["kind"], path)
    if rng and doc.get("rng"):
        restore_rng(doc["rng"])
    return doc.get("progress") or {}


class _Files:
    """The files of one checkpoint, each read once, checked against the manifest."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path, self.manifest = path, manifest
        self._read: dict[str, dict[str, torch.Tensor]] = {}
        self._index: dict[str, dict[str, ShardedTensor]] | None = None

    def read(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of ``name`` (a file the manifest lists: the schema checked it)."""
        if name not in self._read:
            listed = self.manifest.files[name]
            self._read[name], _ = read_safetensors(
                self.path / name, size=listed.size, checksum=listed.checksum
            )
        return self._read[name]

    def index(self) -> dict[str, dict[str, ShardedTensor]]:
        if self._index is None:
            self._index = read_index(self.path, self.manifest)
        return self._index


def read_index(path: Path, manifest: Manifest) -> dict[str, dict[str, ShardedTensor]]:
    """The checked shard index of a sharded checkpoint (``CorruptCheckpointError``)."""
    listed = manifest.files.get(SHARDS_NAME)
    where = str(path / SHARDS_NAME)
    if listed is None:
        raise CorruptCheckpointError(f"{where}: a sharded entry, but no index in the manifest")
    data = read_regular(path / SHARDS_NAME, size=listed.size, checksum=listed.checksum)
    return parse_index(bytes(data), files=manifest.files, where=where)


def _templates(value: Any) -> dict[str, Any]:
    """The live tensors a checkpoint entry loads into, by the names ``encode_tree`` gives
    them: where a DTensor, the saved tensor is read as this rank's piece of it. An
    optimizer that has not stepped yet has no state tensors: a state tensor named
    ``state.<id>.<name>`` then follows its parameter's sharding."""
    if not callable(getattr(value, "state_dict", None)):
        return encode_tree(value)[1] if isinstance(value, torch.Tensor) else {}
    live = value.state_dict()
    found = encode_tree(live)[1]
    if isinstance(value, torch.optim.Optimizer):
        for saved, group in zip(live.get("param_groups", []), value.param_groups, strict=False):
            for pid, param in zip(saved.get("params", []), group["params"], strict=False):
                found.setdefault(f"state.{pid}.", param)
    return found


def _template(templates: dict[str, Any], name: str, shape: tuple[int, ...]) -> Any:
    live = templates.get(name)
    if live is None and name.startswith("state."):
        live = templates.get(name[: name.index(".", 6) + 1] if "." in name[6:] else name)
    return live if live is not None and tuple(live.shape) == shape else None


def _read_sharded(key: str, value: Any, files: _Files) -> dict[str, torch.Tensor]:
    """This rank's part of the sharded entry ``key``, whatever world size saved it."""
    specs = files.index().get(key)
    where = str(files.path / SHARDS_NAME)
    if specs is None:
        raise CorruptCheckpointError(f"{where}: no pieces for the sharded entry {key!r}")
    templates = _templates(value)
    out = {}
    for name, spec in specs.items():
        live = _template(templates, name, spec.shape)
        local = assemble(name, spec, target_box(live, spec.shape), files.read, where=where)
        out[name] = like(live, local)
    return out


def whole_entry(path: Path, manifest: Manifest, key: str) -> dict[str, torch.Tensor]:
    """Every tensor of the sharded entry ``key`` of the checkpoint ``path``, whole
    (assembled from the pieces of every rank, each file checked against ``manifest``)."""
    files = _Files(path, manifest)
    specs = files.index().get(key)
    where = str(path / SHARDS_NAME)
    if specs is None:
        raise CorruptCheckpointError(f"{where}: no pieces for the sharded entry {key!r}")
    return {
        name: assemble(name, spec, target_box(None, spec.shape), files.read, where=where)
        for name, spec in specs.items()
    }


def _fit_to_live(value: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors (saved by one process) as pieces of the live DTensors they load into."""
    templates = _templates(value)
    if not any(is_sharded(t) for t in templates.values()):
        return tensors
    out = {}
    for name, t in tensors.items():
        live = _template(templates, name, tuple(t.shape))
        offset, shape = target_box(live, tuple(t.shape))
        box = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
        out[name] = like(live, t[box]) if live is not None else t
    return out


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
