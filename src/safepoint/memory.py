"""How much memory this process may still take: the tightest cgroup limit, else the host's.

A container's limit is a cgroup's, not the host's: psutil's host-wide "available" saw
21 GB inside a cgroup with ``memory.max`` = 600 MB, and a background copy sized from it
got the process OOM-killed. Reads cgroup v2 (``memory.max`` / ``memory.current``) and v1
(``memory.limit_in_bytes`` / ``memory.usage_in_bytes``) of the process's own cgroup and
of every parent; the smallest headroom wins, and so does the host's when it is smaller.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")

# cgroup v1 writes "no limit" as the largest page-aligned int64 (9223372036854771712).
_NO_LIMIT_V1 = 1 << 62


class Headroom(NamedTuple):
    """Bytes this process may still allocate, and which limit says so."""

    available: int
    source: str


def available_memory(
    *,
    cgroup_root: str | os.PathLike[str] = CGROUP_ROOT,
    proc_cgroup: str | os.PathLike[str] = PROC_CGROUP,
) -> Headroom:
    """The memory this process may still allocate: the least of the host's available
    memory and the headroom (limit minus usage, reclaimable file cache not counted) of
    every cgroup limit above the process. Never raises: unreadable cgroup files count
    as no limit."""
    best = Headroom(psutil.virtual_memory().available, "host")
    for room in _cgroup_headrooms(Path(cgroup_root), Path(proc_cgroup)):
        if room.available < best.available:
            best = room
    return best


def _cgroup_headrooms(root: Path, proc_cgroup: Path) -> list[Headroom]:
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    rooms = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "":  # v2: mounted at the root, or at unified/ beside v1
            for mount in (root, root / "unified"):
                rooms += _walk(mount, path, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            mount = root / controllers
            rooms += _walk(
                mount, path, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
            )
    return rooms


def _walk(mount: Path, path: str, limit: str, usage: str, cache: str) -> list[Headroom]:
    """The headroom of the cgroup at ``path`` and of each parent that sets a limit."""
    rooms = []
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    for depth in range(len(parts), -1, -1):
        folder = mount.joinpath(*parts[:depth])
        most = _read_int(folder / limit)
        if most is None or most >= _NO_LIMIT_V1:
            continue
        used = _read_int(folder / usage) or 0
        used -= _stat(folder / "memory.stat", cache)  # reclaimed before any OOM kill
        rooms.append(Headroom(max(most - max(used, 0), 0), str(folder / limit)))
    return rooms


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2): no limit


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0
