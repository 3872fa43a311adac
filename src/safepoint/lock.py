"""The run lock: one live process per output directory.

An advisory ``flock`` on ``safepoint.lock``. The kernel drops it when the holder dies,
however it dies, so a lock left by a killed run never blocks the rerun; the file's
content (pid, host, start time) only serves the message to whoever is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from safepoint.errors import RunLockedError

LOCK_NAME = "safepoint.lock"


class RunLock:
    """Exclusive lock of ``directory``; ``acquire`` raises ``RunLockedError`` if held."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent}: another run holds the lock ({holder}); wait for it to "
                "finish or stop it, or use another --output-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        self._fd = fd

    def release(self) -> None:
        # The file stays: unlinking a lock file races with a process that just opened it.
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['started_utc']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown"
