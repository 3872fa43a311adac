"""The power-cut journal and what survives a cut: pure functions over a recorded run.

The FUSE side (``fs.py``) appends one JSON line per file event to ``journal.log`` and the
bytes of every write to ``journal.data``. Events are numbered 1..N in the order the file
system applied them; number 0 is the state found at mount, durable by definition.

A power cut *before* event ``k`` leaves on disk what events ``1..k-1`` made durable:

- a file's data (writes, truncations) becomes durable at an ``fsync`` of that file;
- a directory entry change (create, mkdir, unlink, rmdir, rename) becomes durable at an
  ``fsyncdir`` of a directory it changed (a rename changes two, and stays atomic: it is
  applied whole or not at all).

``strict`` keeps only that. ``reordered`` also applies a seeded random subset of what was
not durable yet, as writeback may have done: each pending entry change with probability
1/2 (in order), and each file with pending data gets one of: nothing of it, all of it,
a random subset of its writes, a prefix of its writes, or its final size with the
pending bytes zeroed (the metadata reached the disk, the data did not). So a rename can
survive while the renamed file's data did not: a zero-length, zero-filled or short file
under the new name.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

MODES = ("strict", "reordered")
LOG_NAME = "journal.log"
DATA_NAME = "journal.data"
ROOT = 0  # node id of the mount's root directory
ENTRY_OPS = ("create", "unlink", "rename")
DATA_OPS = ("write", "truncate")
_DATA_FATES = ("none", "all", "subset", "prefix", "zeros")


@dataclass(frozen=True)
class Event:
    """One journaled file event: its number, operation and the path it concerns."""

    n: int
    op: str
    path: str
    rec: dict[str, Any] = field(repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.op} {self.path}"


class Journal:
    """A recorded run, loaded from a journal directory (read-only)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.events: list[Event] = []
        self.kinds: dict[int, str] = {ROOT: "dir"}
        with open(self.directory / LOG_NAME, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # the daemon died mid-line: that event never happened
                rec = json.loads(raw)
                self.events.append(Event(rec["n"], rec["op"], rec.get("path", ""), rec))
                if rec["op"] == "create":
                    self.kinds[rec["node"]] = rec["kind"]
        self._data_path = self.directory / DATA_NAME
        self._data: BinaryIO | None = None

    @property
    def count(self) -> int:
        """Events after the mount (numbers 1..count)."""
        return max((e.n for e in self.events), default=0)

    def numbered(self) -> list[Event]:
        return [e for e in self.events if e.n > 0]

    def _bytes(self, rec: dict[str, Any]) -> bytes:
        if rec["op"] != "write":
            return b""
        if self._data is None:
            self._data = open(self._data_path, "rb")  # noqa: SIM115 (closed by materialise)
        self._data.seek(rec["at"])
        return self._data.read(rec["len"])

    def materialise(
        self,
        dest: str | os.PathLike[str],
        *,
        before: int | None = None,
        mode: str = "strict",
        seed: int = 0,
    ) -> Path:
        """Write into ``dest`` (created; must not exist) what survives a cut before event
        ``before`` (default: after the last one) in ``mode``; return ``dest``."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        cut = self.count + 1 if before is None else before
        events = [e for e in self.events if e.n < cut]
        rng = random.Random(f"{seed}:{cut}")
        entries = _entries(events, rng if mode == "reordered" else None)
        dest = Path(dest)
        dest.mkdir(parents=True)
        try:
            for rel, node in _walk(entries):
                target = dest / rel
                if self.kinds.get(node) == "dir":
                    target.mkdir()
                else:
                    data = self._content(events, node, rng if mode == "reordered" else None)
                    target.write_bytes(data)
        finally:
            if self._data is not None:
                self._data.close()
                self._data = None
        return dest

    def _content(self, events: list[Event], node: int, rng: random.Random | None) -> bytes:
        ops = [e for e in events if e.op in (*DATA_OPS, "fsync") and e.rec["node"] == node]
        last_sync = max((i for i, e in enumerate(ops) if e.op == "fsync"), default=-1)
        durable = ops[: last_sync + 1]
        pending = [e for e in ops[last_sync + 1 :] if e.op != "fsync"]
        content = bytearray()
        for e in durable:
            if e.op != "fsync":
                _apply(content, e.rec, self._bytes(e.rec))
        if rng is None or not pending:
            return bytes(content)
        fate = rng.choice(_DATA_FATES)
        if fate == "none":
            return bytes(content)
        if fate == "subset":
            pending = [e for e in pending if rng.random() < 0.5]
        elif fate == "prefix":
            pending = pending[: rng.randint(0, len(pending))]
        written = bytearray(content)
        for e in pending:
            _apply(written, e.rec, self._bytes(e.rec))
        if fate == "zeros":  # the new size reached the disk, the new data did not
            size = len(written)
            return bytes(content[:size]) + bytes(max(size - len(content), 0))
        return bytes(written)


def _entry_durability(events: list[Event]) -> list[bool]:
    """For each event: is it durable at the cut (only entry ops can be False here)."""
    synced: set[int] = set()
    durable = [True] * len(events)
    for i in range(len(events) - 1, -1, -1):
        e = events[i]
        if e.op == "fsyncdir":
            synced.add(e.rec["node"])
        elif e.op in ENTRY_OPS and e.n > 0:
            durable[i] = bool(_dirs(e.rec) & synced)
    return durable


def _dirs(rec: dict[str, Any]) -> set[int]:
    return {rec["dir"], rec["dir2"]} if rec["op"] == "rename" else {rec["dir"]}


def _entries(events: list[Event], rng: random.Random | None) -> dict[int, dict[str, int]]:
    """Directory node -> {name: node} that survive."""
    entries: dict[int, dict[str, int]] = {ROOT: {}}
    for e, durable in zip(events, _entry_durability(events), strict=True):
        r = e.rec
        if e.op == "create" and r["kind"] == "dir":
            entries.setdefault(r["node"], {})
        if e.op not in ENTRY_OPS or not (durable or (rng is not None and rng.random() < 0.5)):
            continue
        d = entries.setdefault(r["dir"], {})
        if e.op == "create":
            d[r["name"]] = r["node"]
        elif e.op == "unlink":
            if d.get(r["name"]) == r["node"]:
                del d[r["name"]]
        else:  # rename: atomic, whole or not at all
            if d.get(r["name"]) == r["node"]:
                del d[r["name"]]
            entries.setdefault(r["dir2"], {})[r["name2"]] = r["node"]
    return entries


def _walk(entries: dict[int, dict[str, int]]) -> Iterator[tuple[str, int]]:
    """(relative path, node) of everything reachable from the root, parents first."""
    seen = {ROOT}
    stack = [("", ROOT)]
    while stack:
        prefix, node = stack.pop()
        for name, child in sorted(entries.get(node, {}).items()):
            if child in seen:  # a reordered cut may make a directory its own ancestor
                continue
            seen.add(child)
            rel = f"{prefix}{name}"
            yield rel, child
            if child in entries:
                stack.append((f"{rel}/", child))


def _apply(content: bytearray, rec: dict[str, Any], data: bytes) -> None:
    if rec["op"] == "truncate":
        del content[rec["size"] :]
        content.extend(bytes(rec["size"] - len(content)))
        return
    off = rec["off"]
    if off > len(content):
        content.extend(bytes(off - len(content)))
    content[off : off + len(data)] = data


def tree_digest(root: str | os.PathLike[str]) -> str:
    """A digest of every path and file content under ``root``: equal trees, equal digests."""
    h = hashlib.sha256()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        h.update(f"d {rel}\n".encode("utf-8", "surrogateescape"))
        for name in sorted(filenames):
            h.update(f"f {rel}/{name}\n".encode("utf-8", "surrogateescape"))
            h.update(hashlib.sha256(Path(dirpath, name).read_bytes()).digest())
    return h.hexdigest()
