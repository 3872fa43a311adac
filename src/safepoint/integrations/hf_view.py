"""A verified view of a checkpoint for the Trainer's own resume code.

The Trainer resumes from a folder: it ``torch.load``s any ``rng_state.pth``,
``optimizer.pt`` or ``scheduler.pt`` it finds there, builds ``TrainerState(**json)``
from ``trainer_state.json`` and loads whatever weights the folder holds. A checkpoint
may come from an untrusted machine, so the Trainer never sees the checkpoint folder
itself: it gets a private folder holding only

- the adapter or model weights the manifest lists, hard-linked (copied where links are
  impossible), then re-read from the view, checksum-verified and checked tensor by
  tensor (names, dtypes, shapes) against the live model;
- the live model's own ``adapter_config.json`` / ``config.json`` (nothing from the
  checkpoint's config reaches ``from_pretrained``);
- ``trainer_state.json`` parsed with bounds, checked field by field, and written again.

Optimizer, scheduler and RNG states come from safepoint's own files (``state.json``,
``optimizer.safetensors``) through the store's readers, as for any ``Checkpointer``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from safepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.fileio import read_regular
from safepoint.format import parse_safetensors
from safepoint.integrations.hf_layout import (
    TRAINER_STATE_NAME,
    adapter_files,
    is_peft,
    model_files,
)
from safepoint.schema import MAX_TRAINER_STATE_BYTES, parse_trainer_state
from safepoint.snapshot import TensorFile
from safepoint.store import TRASH_PREFIX
from safepoint.validity import CheckpointInfo

# A crash leaves the view behind; the trash prefix makes the next run's sweep remove it.
VIEW_PREFIX = f"{TRASH_PREFIX}resume-view-"


def check_trainer_state(data: bytes, *, step: int, where: str) -> dict[str, Any]:
    """Parse ``trainer_state.json`` (bounded JSON, every field checked by
    ``schema.check_trainer_state_doc``), refuse fields ``TrainerState`` does not have,
    and return a document ``TrainerState(**doc)`` accepts. ``step`` is the manifest's.

    ``best_model_checkpoint`` is dropped: it is a path the Trainer would stat, and
    SafepointCallback never loads a best model from it. Raises ``CorruptCheckpointError``.
    """
    from transformers.trainer_callback import TrainerState

    doc = parse_trainer_state(data, step=step, where=where)
    known = {f.name for f in dataclasses.fields(TrainerState)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise CorruptCheckpointError(f"{where}: fields {unknown} are not TrainerState fields")
    doc = {**doc, "best_model_checkpoint": None}
    try:
        TrainerState(**doc)
    except Exception as e:  # the dataclass's own checks, whatever they raise
        raise CorruptCheckpointError(f"{where}: not a TrainerState ({e})") from None
    return doc


def _live_weights(model: Any) -> tuple[str, dict[str, Any], bytes]:
    """(weights file name, the live tensors it must match, the live config file)."""
    peft = is_peft(model)
    files = adapter_files(model, copy_data=False) if peft else model_files(model, copy_data=False)
    weights = "adapter_model.safetensors" if peft else "model.safetensors"
    tensors, config = files[weights], files[_config_name(weights)]
    assert isinstance(tensors, TensorFile) and isinstance(config, bytes)
    return weights, dict(tensors.tensors), config


def _check_tensors(saved: dict[str, Any], live: dict[str, Any], where: str) -> None:
    missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or extra:
        raise IncompatibleCheckpointError(
            f"{where} does not fit this model: "
            + "; ".join(
                f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for what, names in (("missing", missing), ("unexpected", extra))
                if names
            )
        )
    for name, t in live.items():
        s = saved[name]
        if s.dtype != t.dtype or tuple(s.shape) != tuple(t.shape):
            raise IncompatibleCheckpointError(
                f"{where}: {name} is {s.dtype} {list(s.shape)}, this model has "
                f"{t.dtype} {list(t.shape)}"
            )


def make_view(
    info: CheckpointInfo, model: Any, directory: Path, *, weights: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Build the verified view of ``info`` for ``model`` under ``directory``; return its
    path and the checked ``trainer_state.json`` document. The caller removes the view
    with ``remove_view``. Raises ``CorruptCheckpointError`` (damaged or invalid files)
    or ``IncompatibleCheckpointError`` (weights that do not fit ``model``); nothing is
    left behind then. ``weights=False``: ``trainer_state.json`` alone (the weights are
    a state entry of a sharded save, loaded by safepoint, not by the Trainer).
    """
    manifest = info.manifest
    assert manifest is not None
    weights_name, live, config = _live_weights(model) if weights else ("", {}, b"")
    for name in (weights_name, TRAINER_STATE_NAME) if weights else (TRAINER_STATE_NAME,):
        if name not in manifest.files:
            raise IncompatibleCheckpointError(
                f"{info.path}: the manifest lists no {name}; this model needs it to resume"
            )
    state_entry = manifest.files[TRAINER_STATE_NAME]
    if state_entry.size > MAX_TRAINER_STATE_BYTES:
        raise CorruptCheckpointError(f"{info.path / TRAINER_STATE_NAME}: too large")
    state_bytes = read_regular(
        info.path / TRAINER_STATE_NAME, size=state_entry.size, checksum=state_entry.checksum
    )
    doc = check_trainer_state(
        bytes(state_bytes), step=info.step, where=str(info.path / TRAINER_STATE_NAME)
    )
    view = directory / f"{VIEW_PREFIX}{secrets.token_hex(4)}"
    os.mkdir(view, 0o700)
    try:
        (view / TRAINER_STATE_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True))
        if not weights:
            return view, doc
        entry = manifest.files[weights_name]
        _link_or_copy(info.path / weights_name, view / weights_name, entry.size)
        # Re-read from the view: what the Trainer will load is what is verified here.
        data = read_regular(view / weights_name, size=entry.size, checksum=entry.checksum)
        tensors, _ = parse_safetensors(data, where=str(info.path / weights_name))
        _check_tensors(tensors, live, str(info.path / weights_name))
        del tensors
        (view / _config_name(weights_name)).write_bytes(config)
    except BaseException:
        remove_view(view)
        raise
    return view, doc


def _config_name(weights_name: str) -> str:
    return "adapter_config.json" if weights_name.startswith("adapter") else "config.json"


def _link_or_copy(src: Path, dest: Path, size: int) -> None:
    """A hard link of ``src`` (the link itself if it were one: never followed); a copy
    read from an ``O_NOFOLLOW`` fd where this file system refuses hard links."""
    try:
        os.link(src, dest, follow_symlinks=False)
        return
    except OSError:
        pass
    dest.write_bytes(read_regular(src, size=size))


def remove_view(view: Path | None) -> None:
    """Remove a view made by ``make_view`` (never a checkpoint: only its own folder)."""
    if view is not None and view.name.startswith(VIEW_PREFIX):
        shutil.rmtree(view, ignore_errors=True)
