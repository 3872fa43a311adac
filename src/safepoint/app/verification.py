"""``safepoint verify``: re-hash a checkpoint, or every checkpoint of a directory.

A live run may delete a checkpoint (retention) while ``verify`` reads it: the folder is
renamed out of its name at once (``store.delete``), so files that went missing under a
name that no longer holds the folder that was listed mean "deleted while verifying",
which is no failure. A file missing from a checkpoint that is still there is one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from safepoint.errors import CheckpointNotFoundError
from safepoint.faults import pause_point
from safepoint.manifest import MANIFEST_NAME
from safepoint.units import format_size
from safepoint.validity import CheckpointInfo, checkpoint_step, inspect

DELETED_NOTE = "deleted while verifying (a run's retention removed it); not a failure"


@dataclass
class Verification:
    """What ``verify`` found: the checkpoints it checked, and those deleted meanwhile."""

    infos: list[CheckpointInfo] = field(default_factory=list)
    deleted: list[Path] = field(default_factory=list)
    """Folders that were there when listed and no longer are under their name."""


def verify_path(path: str) -> Verification:
    """Every checkpoint at ``path`` (one checkpoint or a directory), checksums checked."""
    where = Path(path)
    if not where.exists() and not where.is_symlink():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint or directory")
    if checkpoint_step(where.name) is not None or (where / MANIFEST_NAME).exists():
        targets = [where]
    elif not where.is_dir():
        raise CheckpointNotFoundError(f"{path}: not a checkpoint or a directory of them")
    else:
        targets = [where / n for n in os.listdir(where) if checkpoint_step(n) is not None]
    listed = {t: _identity(t) for t in targets}
    pause_point("verify_listed")  # tests delete a listed checkpoint here
    result = Verification()
    for target in sorted(targets, key=lambda t: (checkpoint_step(t.name) or -1, t.name)):
        try:
            info = inspect(target, deep=True)
        except CheckpointNotFoundError:
            info = None
        if info is not None and (info.valid or info.status == "foreign"):
            result.infos.append(info)
        elif info is None or (now := _identity(target)) is None or now != listed[target]:
            # It was listed, and its name no longer holds the folder that was listed
            # (gone, or another one made since): what went missing was deleted.
            result.deleted.append(target)
        else:
            result.infos.append(info)
    return result


def _identity(path: Path) -> tuple[int, int] | None:
    """The folder's (device, inode), or None when nothing is there."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def failed(result: Verification) -> list[CheckpointInfo]:
    """The checkpoints that did not pass (corrupt or incomplete)."""
    return [i for i in result.infos if i.status in ("corrupt", "incomplete")]


def verdict_lines(path: str, result: Verification) -> list[str]:
    """One line per problem, per foreign folder, per checkpoint that passed and per
    checkpoint deleted while it was verified."""
    lines = []
    for i in result.infos:
        if i.status in ("corrupt", "incomplete"):
            lines += [f"{i.path}: {problem}" for problem in i.problems]
        elif i.status == "foreign":
            lines.append(f"{i.path}: not a safepoint checkpoint ({'; '.join(i.problems)})")
        else:
            note = f" (ignored unlisted files: {', '.join(i.extra_files)})" if i.extra_files else ""
            lines.append(
                f"{i.path}: ok, {len(i.manifest.files) if i.manifest else 0} files, "
                f"{format_size(i.size)}{note}"
            )
    lines += [f"{p}: {DELETED_NOTE}" for p in result.deleted]
    if not result.infos and not result.deleted:
        lines.append(f"{path}: no checkpoints to verify")
    return lines


def deleted_json(path: Path) -> dict[str, object]:
    """The ``verify --json`` entry of a checkpoint deleted while it was verified."""
    return {
        "name": path.name,
        "path": str(path),
        "step": checkpoint_step(path.name),
        "status": "deleted",
        "problems": [DELETED_NOTE],
    }
