"""``safepoint verify``: re-hash a checkpoint, or every checkpoint of a directory."""

from __future__ import annotations

from pathlib import Path

from safepoint.errors import CheckpointNotFoundError
from safepoint.units import format_size
from safepoint.validity import CheckpointInfo, verify


def verify_path(path: str) -> list[CheckpointInfo]:
    """Every checkpoint at ``path`` (one checkpoint or a directory), checksums checked."""
    if not Path(path).exists() and not Path(path).is_symlink():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint or directory")
    return verify(path)


def failed(infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """The checkpoints that did not pass (corrupt or incomplete)."""
    return [i for i in infos if i.status in ("corrupt", "incomplete")]


def verdict_lines(path: str, infos: list[CheckpointInfo]) -> list[str]:
    """One line per problem, per foreign folder and per checkpoint that passed."""
    lines = []
    for i in infos:
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
    if not infos:
        lines.append(f"{path}: no checkpoints to verify")
    return lines
