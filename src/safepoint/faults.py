"""Test hooks that kill or fail a save at a named point of the commit protocol."""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_crash_counts: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Die by SIGKILL here if ``SAFEPOINT_CRASH_AT`` is ``name`` or ``name@N`` (N-th time)
    (with ``SAFEPOINT_CRASH_RANK=R``: only in the process whose ``RANK`` is R).

    Only for crash tests: lets a test stop the writer at a named step of the protocol.
    """
    want = os.environ.get("SAFEPOINT_CRASH_AT")
    if not want:
        return
    only = os.environ.get("SAFEPOINT_CRASH_RANK")  # several processes: only this rank dies
    if only is not None and os.environ.get("RANK", "0") != only:
        return
    point, _, nth = want.partition("@")
    if point != name:
        return
    _crash_counts[name] += 1
    if _crash_counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fault_point(name: str) -> None:
    """Raise ``OSError(ERRNO)`` here if ``SAFEPOINT_FAULT_AT`` is ``name:ERRNO`` (e.g.
    ``dir_fsync:EINVAL``). Only for tests: file-system faults no local disk produces
    (a FUSE or CIFS mount that refuses a directory fsync)."""
    want = os.environ.get("SAFEPOINT_FAULT_AT")
    if not want:
        return
    point, _, code = want.partition(":")
    if point == name:
        number = getattr(errno, code or "EIO", errno.EIO)
        raise OSError(number, os.strerror(number))


def pause_point(name: str) -> None:
    """Block here if ``SAFEPOINT_PAUSE_AT`` is ``name:FIFO`` until a test has opened the
    named pipe ``FIFO`` for writing and closed it again. Only for tests: the test's open
    returns exactly when this process has reached ``name``, so it can change the files
    (delete a checkpoint) at that point and then let the process go on, with no timing."""
    want = os.environ.get("SAFEPOINT_PAUSE_AT")
    if not want:
        return
    point, _, fifo = want.partition(":")
    if point == name and fifo:
        with open(fifo, "rb") as f:  # blocks until the test opens it for writing
            f.read()  # returns at EOF: the test closed its end
