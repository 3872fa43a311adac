"""What a thin checkpoint keeps: the files evaluation and export need, chosen from a
full checkpoint's manifest and its ``state.json``. Pure choice; ``Store.thin`` commits.

A full checkpoint holds the resumable state; only the newest one or two are ever
resumed from, and older kept ones serve evaluation, export or a rollback of the
weights. Thinning keeps, byte for byte (the same sizes and checksums, hard-linked):

- the weights: ``adapter_model.safetensors`` + ``adapter_config.json`` (LoRA) or
  ``model.safetensors`` + ``config.json`` (full fine-tune), or a plain loop's
  ``<key>.safetensors`` of every state entry that is not an optimizer;
- ``trainer_state.json`` (the log history and metrics ``report`` reads), tokenizer and
  generation files, and any other file safepoint does not know as resumable-only.

It drops what only a resume reads: every optimizer's file (an entry of ``state.json``
whose state is an optimizer's: ``state`` and ``param_groups``, whatever its key: most
of a full fine-tune's bytes, AdamW's two moments per weight), ``state.json`` (RNG
states, scheduler, progress, optimizer groups) and ``ranks.json`` (every rank's RNG).
A sharded checkpoint (``shards.json``) is not thinned: its weights are pieces that only
the index assembles.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from safepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.fileio import read_regular
from safepoint.manifest import FileEntry, Manifest, Thin

RESUME_ONLY = ("state.json", "ranks.json")
"""Files that only a resume reads (``snapshot.STATE_NAME``, ``distributed.RANKS_NAME``)."""
NOT_THINNED = ("shards.json",)
"""A checkpoint holding one of these is never thinned."""
_MAX_STATE_BYTES = 16 << 20


def thin_selection(
    path: Path, manifest: Manifest
) -> tuple[dict[str, FileEntry], tuple[str, ...]] | None:
    """(kept files with their manifest entries, dropped names) of the full checkpoint at
    ``path``; None when it is not to be thinned (thin already, sharded, nothing to drop,
    or its ``state.json`` unreadable: then it stays full and ``verify`` says why)."""
    if manifest.is_thin or any(n in manifest.files for n in NOT_THINNED):
        return None
    try:
        optimizers = optimizer_files(path, manifest)
    except (CorruptCheckpointError, IncompatibleCheckpointError, OSError):
        return None
    dropped = tuple(sorted(n for n in manifest.files if n in RESUME_ONLY or n in optimizers))
    if not dropped:
        return None
    kept = {n: e for n, e in manifest.files.items() if n not in dropped}
    return kept, dropped


def optimizer_files(path: Path, manifest: Manifest) -> set[str]:
    """The files of the state entries that are optimizers' state (checked against the
    manifest's checksum of ``state.json`` first)."""
    from safepoint.schema import STATE_NAME, parse_state

    entry = manifest.files.get(STATE_NAME)
    if entry is None or entry.size > _MAX_STATE_BYTES:
        return set()
    data = read_regular(path / STATE_NAME, size=entry.size, checksum=entry.checksum)
    doc = parse_state(bytes(data), files=manifest.files, where=STATE_NAME)
    found = set()
    for e in doc["entries"].values():
        tree = e.get("tree")
        if e.get("file") and isinstance(tree, dict) and {"state", "param_groups"} <= set(tree):
            found.add(e["file"])
    return found


def thin_manifest(full: Manifest, kept: dict[str, FileEntry], dropped: tuple[str, ...]) -> Manifest:
    """The manifest of the thin checkpoint made of ``full``'s ``kept`` files: the same
    step, time, metrics, parent, fingerprint and information (so ``ls`` and ``report``
    show it as it was saved), marked ``thin`` with the full one's checksum."""
    return replace(full, files=dict(kept), thin=Thin(full.digest, dropped), stored_digest=None)
