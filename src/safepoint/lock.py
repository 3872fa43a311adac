"""The run lock: one live process per output directory.

An advisory ``flock`` on the output directory itself and on ``safepoint.lock`` in it.
The kernel drops both when the holder dies, however it dies, so a lock left by a killed
run never blocks the rerun; the file's content (pid, host, start time) only serves the
message to whoever is refused.

Why the directory too: a lock on a file protects only while the file stays. With
``safepoint.lock`` deleted under a live run (``rm``, a cleanup script), a second run
would create a new file, lock it, and both would commit and prune in one folder. The
directory cannot be deleted under a run without deleting the run, so its lock is the
one that excludes. The file lock is kept for safepoint versions that lock only the file,
and is checked by inode after ``flock`` (a file unlinked between our ``open`` and our
``flock`` is retried), and again by the live run before each commit (``check``): a
deleted file is re-created so that the next refused run can still say who holds the
directory. Where a file system cannot lock directories (some network file systems),
the file lock alone is used, and ``check`` then refuses to commit if another process
locked a new file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path

from safepoint.errors import ConfigError, RunLockedError, UnsafeFileError
from safepoint.fileio import open_regular

log = logging.getLogger("safepoint")

LOCK_NAME = "safepoint.lock"
_RETRIES = 20  # a file swapped between our open and flock every time is an attack: stop


class RunLock:
    """Exclusive lock of ``directory``; ``acquire`` raises ``RunLockedError`` if held.

    Raises ``UnsafeFileError`` if ``safepoint.lock`` is a symlink, a FIFO or another
    non-regular file: it is never followed nor written through."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._dir_fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        dir_fd = self._lock_directory()
        try:
            self._fd = self._lock_file()
        except BaseException:
            if dir_fd is not None:
                os.close(dir_fd)
            raise
        self._dir_fd = dir_fd

    def _lock_directory(self) -> int | None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(self._refusal()) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
                return None  # no directory locks here: the file lock alone decides
            raise
        return fd

    def _lock_file(self) -> int:
        """Open, lock and fill ``safepoint.lock``; the fd returned is the file at the path."""
        for _ in range(_RETRIES):
            fd, _ = open_regular(self.path, flags=os.O_RDWR | os.O_CREAT, error=UnsafeFileError)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunLockedError(self._refusal()) from None
            except BaseException:
                os.close(fd)
                raise
            if self._is_path(fd):
                info = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.time(),
                    "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
                return fd
            os.close(fd)  # unlinked or replaced after our open: lock what is there now
        raise RunLockedError(
            f"{self.path} keeps being replaced while safepoint locks it; stop whatever "
            "rewrites it, or use another output directory"
        )

    def _is_path(self, fd: int) -> bool:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _refusal(self) -> str:
        return (
            f"{self.directory}: another run holds the lock ({_holder(self.path)}); wait for "
            "it to finish or stop it, or use another output directory"
        )

    def check(self) -> None:
        """Before a commit: raise ``RunLockedError`` unless this run still excludes all
        others. Re-creates ``safepoint.lock`` if it was deleted or replaced."""
        if self._fd is None or self._is_path(self._fd):
            return
        log.warning("%s was deleted or replaced while this run held it; re-creating it", self.path)
        try:
            fd = self._lock_file()
        except (RunLockedError, OSError) as e:
            if self._dir_fd is not None:  # the directory lock still excludes every run
                log.warning("cannot re-create %s (%s); the run goes on", self.path, e)
                return
            raise RunLockedError(
                f"{self.directory}: {LOCK_NAME} was removed under this run and another "
                f"process now holds the directory ({e}); this run stops saving here"
            ) from e
        old, self._fd = self._fd, fd
        os.close(old)

    def release(self) -> None:
        # The file stays: unlinking a lock file races with a process that just opened it.
        for name in ("_fd", "_dir_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_unlocked(directory: Path) -> None:
    """Raise ``RunLockedError`` if a live process holds ``directory``'s lock.

    Creates and writes nothing (a pre-flight before any work); a lock file left by a
    dead run does not count. ``RunLock.acquire`` stays the real guard.
    """
    try:
        # no-follow, non-blocking: a symlinked or FIFO lock file must not hang a probe
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(Path(directory) / LOCK_NAME, flags)
    except OSError:
        return  # no lock file (or none readable): nobody can hold it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunLockedError(
            f"{directory}: another run holds the lock ({_describe(fd)}); wait for it to "
            "finish or stop it, or use another output directory"
        ) from None
    finally:
        os.close(fd)  # closing drops the probe's shared lock


def _holder(path: Path) -> str:
    """Who holds the lock, from the lock file (never followed, never blocked on)."""
    try:
        fd, _ = open_regular(path, max_size=1 << 16, error=UnsafeFileError)
    except OSError:
        return "holder unknown"
    try:
        return _describe(fd)
    finally:
        os.close(fd)


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['started_utc']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown"


def prepare_directory(directory: Path) -> None:
    """Create ``directory`` if needed and prove it writable, or raise ``ConfigError``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(
            f"{directory} exists and is not a directory; choose another output directory"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"cannot create the output directory {directory} ({e.strerror}); "
            "choose another output directory"
        ) from e
    # A random suffix as staging folders have (not the pid: `safepoint chaos` matches
    # file events across runs by name, with random suffixes masked)
    probe = directory / f".safepoint-write-test-{secrets.token_hex(4)}"
    try:
        # O_EXCL: never write through a link or file planted under this name
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write in the output directory {directory} ({e.strerror}); "
            "make it writable or choose another output directory"
        ) from e
