"""The FUSE side of the power-cut simulator: a pass-through file system that journals.

Run as ``python -m safepoint.powercut BACKING MOUNTPOINT JOURNAL [--cut-at K]``. The
program on MOUNTPOINT sees BACKING with plain POSIX behaviour; every change it makes is
also appended to the journal (``journal.py`` reads it). At a cut (event K arrives, or
``cut`` on stdin) the file system freezes: that event and every later change fail with
EIO and nothing more is journaled. Stdout says ``ready`` once mounted and ``cut N``
(N events applied) when it freezes; ``count`` on stdin answers ``count N``.

One lock around every change: the journal's order is the order the backing saw.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from typing import Any

import mfusepy as fuse

from safepoint.powercut.journal import DATA_NAME, LOG_NAME, ROOT

_STAT_KEYS = (
    "st_mode",
    "st_ino",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_blocks",
    "st_rdev",
)


class JournalingFS(fuse.Operations):
    """Pass-through to ``backing``, journaling every change into ``journal``."""

    use_ns = True

    def __init__(self, backing: str, journal: str, *, cut_at: int | None) -> None:
        self.root = os.path.realpath(backing)
        self.cut_at = cut_at
        self.mutex = threading.Lock()
        self.ids: dict[str, int] = {"/": ROOT}  # live path -> node id
        self.handles: dict[int, int] = {}  # fh -> node id
        self.next_id = ROOT + 1
        self.events = 0
        self.frozen = False
        self.log = open(os.path.join(journal, LOG_NAME), "w", encoding="utf-8")  # noqa: SIM115
        self.data = open(os.path.join(journal, DATA_NAME), "wb")  # noqa: SIM115
        self._record_initial()

    # ------------------------------------------------------------------ journal

    def _record_initial(self) -> None:
        """The backing's content at mount, as events number 0 (durable)."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = "/" + os.path.relpath(dirpath, self.root).removeprefix(".").lstrip("/")
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(rel, name)
                kind = "dir" if name in dirnames else "file"
                node = self._new(path)
                self._write_rec(
                    {
                        "op": "create",
                        "kind": kind,
                        "dir": self.ids[rel],
                        "name": name,
                        "node": node,
                        "path": path,
                    },
                    n=0,
                )
                if kind == "file":
                    with open(self.root + path, "rb") as f:
                        content = f.read()
                    rec = {"op": "write", "node": node, "off": 0, "path": path}
                    self._write_rec(rec, n=0, data=content)

    def _new(self, path: str) -> int:
        node, self.next_id = self.next_id, self.next_id + 1
        self.ids[path] = node
        return node

    def _write_rec(self, rec: dict[str, Any], *, n: int, data: bytes | None = None) -> None:
        if data is not None:
            rec["at"], rec["len"] = self.data.tell(), len(data)
            self.data.write(data)
            self.data.flush()
        rec["n"], rec["t"] = n, round(time.time(), 4)
        self.log.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.log.flush()

    def _begin(self) -> None:
        """Before a change: refuse it once frozen; freeze at the cut's event."""
        if not self.frozen and self.cut_at is not None and self.events + 1 >= self.cut_at:
            self.freeze()
        if self.frozen:
            raise fuse.FuseOSError(errno.EIO)

    def _event(self, rec: dict[str, Any], data: bytes | None = None) -> None:
        self.events += 1
        self._write_rec(rec, n=self.events, data=data)

    def freeze(self) -> None:
        if not self.frozen:
            self.frozen = True
            _say(f"cut {self.events}")

    def _full(self, path: str) -> str:
        return self.root + path

    def _parent(self, path: str) -> tuple[int, str]:
        head, name = os.path.split(path)
        return self.ids[head], name

    def _node(self, path: str | None, fh: int | None) -> int:
        if fh is not None and fh in self.handles:
            return self.handles[fh]
        if path is None or path not in self.ids:
            raise fuse.FuseOSError(errno.ENOENT)
        return self.ids[path]

    # -------------------------------------------------------------- reads

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None and path is None else os.lstat(self._full(path))
        attrs = {key: getattr(st, key) for key in _STAT_KEYS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._full(path))
        keys = (
            "f_bavail",
            "f_bfree",
            "f_blocks",
            "f_bsize",
            "f_favail",
            "f_ffree",
            "f_files",
            "f_flag",
            "f_frsize",
            "f_namemax",
        )
        return {key: getattr(sv, key) for key in keys}

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._full(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def open(self, path: str, flags: int) -> int:
        # O_APPEND stays with the kernel, which sends each write with its offset
        fd = os.open(self._full(path), flags & ~(os.O_APPEND | os.O_TRUNC | os.O_CREAT))
        if flags & os.O_TRUNC:
            try:
                self.truncate(path, 0, None)
            except BaseException:
                os.close(fd)
                raise
        self.handles[fd] = self.ids[path]
        return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def opendir(self, path: str) -> int:
        return self.ids.get(path, ROOT)

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        self.handles.pop(fh, None)
        os.close(fh)
        return 0

    # ------------------------------------------------------------ changes

    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        with self.mutex:
            self._begin()
            fd = os.open(self._full(path), (flags & ~os.O_APPEND) | os.O_CREAT | os.O_EXCL, mode)
            parent, name = self._parent(path)
            node = self._new(path)
            self.handles[fd] = node
            self._event(
                {
                    "op": "create",
                    "kind": "file",
                    "dir": parent,
                    "name": name,
                    "node": node,
                    "path": path,
                }
            )
            return fd

    def mkdir(self, path: str, mode: int) -> int:
        with self.mutex:
            self._begin()
            os.mkdir(self._full(path), mode)
            parent, name = self._parent(path)
            node = self._new(path)
            self._event(
                {
                    "op": "create",
                    "kind": "dir",
                    "dir": parent,
                    "name": name,
                    "node": node,
                    "path": path,
                }
            )
            return 0

    def unlink(self, path: str) -> int:
        with self.mutex:
            self._begin()
            os.unlink(self._full(path))
            parent, name = self._parent(path)
            node = self.ids.pop(path)
            self._event({"op": "unlink", "dir": parent, "name": name, "node": node, "path": path})
            return 0

    def rmdir(self, path: str) -> int:
        with self.mutex:
            self._begin()
            os.rmdir(self._full(path))
            parent, name = self._parent(path)
            node = self.ids.pop(path)
            self._event({"op": "unlink", "dir": parent, "name": name, "node": node, "path": path})
            return 0

    def rename(self, old: str, new: str) -> int:
        with self.mutex:
            self._begin()
            os.rename(self._full(old), self._full(new))
            (parent, name), (parent2, name2) = self._parent(old), self._parent(new)
            node = self.ids[old]
            for p in [p for p in self.ids if p == new or p.startswith(new + "/")]:
                del self.ids[p]  # whatever the rename replaced
            for p in [p for p in self.ids if p == old or p.startswith(old + "/")]:
                self.ids[new + p[len(old) :]] = self.ids.pop(p)
            self._event(
                {
                    "op": "rename",
                    "dir": parent,
                    "name": name,
                    "dir2": parent2,
                    "name2": name2,
                    "node": node,
                    "path": f"{old} -> {new}",
                }
            )
            return 0

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            self._begin()
            written = os.pwrite(fh, data, offset)
            node = self._node(path, fh)
            self._event(
                {"op": "write", "node": node, "off": offset, "path": path or "?"},
                data=bytes(data[:written]),
            )
            return written

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        with self.mutex:
            self._begin()
            if fh is not None:
                os.ftruncate(fh, length)
            else:
                os.truncate(self._full(path or ""), length)
            node = self._node(path, fh)
            self._event({"op": "truncate", "node": node, "size": length, "path": path or "?"})
            return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self.mutex:
            self._begin()  # no real fsync: durability is what the journal says
            self._event(
                {
                    "op": "fsync",
                    "node": self._node(path, fh),
                    "path": path or "?",
                    "datasync": bool(datasync),
                }
            )
            return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self.mutex:
            self._begin()
            node = self.ids.get(path, fh)
            self._event({"op": "fsyncdir", "node": node, "path": path or "?"})
            return 0

    # Attribute changes pass through and are not journaled (a cut keeps default modes).
    def chmod(self, path: str, mode: int) -> int:
        with self.mutex:
            self._begin()
            os.chmod(self._full(path), mode)
            return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        with self.mutex:
            self._begin()
            os.chown(self._full(path), uid, gid)
            return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        with self.mutex:
            self._begin()
            os.utime(self._full(path), ns=times)
            return 0

    def init_with_config(self, conn_info: Any, config: Any) -> None:
        if config is not None:
            # unlink really unlinks (no .fuse_hidden files in the backing and the journal)
            config.hard_remove = 1
        _say("ready")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _control(fs: JournalingFS) -> None:
    for line in sys.stdin:
        command = line.strip()
        with fs.mutex:
            if command == "cut":
                fs.freeze()
            elif command == "count":
                _say(f"count {fs.events}")


def main(argv: list[str]) -> int:
    backing, mountpoint, journal = argv[:3]
    cut_at = int(argv[4]) if len(argv) > 4 and argv[3] == "--cut-at" else None
    fs = JournalingFS(backing, journal, cut_at=cut_at)
    threading.Thread(target=_control, args=(fs,), daemon=True).start()
    fuse.FUSE(fs, mountpoint, foreground=True, nothreads=False)
    return 0
