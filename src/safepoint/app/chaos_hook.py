"""File-event fault injection for ``safepoint chaos --file-events`` (runs in the child).

Not imported by safepoint itself: ``chaos_events`` copies this file as
``sitecustomize.py`` into a folder on the child's ``PYTHONPATH``, so the command under
test runs unchanged. The first Python process of the command takes the settings from the
environment (and removes them, so its own children run plain), then sees every file
event under the output directory:

- through ``sys.addaudithook``: ``open`` for writing, ``os.mkdir``, ``os.rename`` (also
  raised by ``os.replace``), ``os.remove`` (``os.unlink``, and the unlinks inside
  ``shutil.rmtree``, relative to a directory fd), ``os.rmdir``;
- by wrapping ``os.write`` and ``os.fsync``, which raise no audit event. Writes done
  outside Python (a C library's own ``write(2)``) are not seen; safepoint writes every
  byte with ``os.write``.

Opens for reading are not events: they change nothing on disk.

``SAFEPOINT_CHAOS_HOOK`` is ``MODE:K:OUT:LOG:FIRED``. Every event is appended to LOG
(one ``number kind path`` line); at the K-th event MODE ``kill`` SIGKILLs the process
before it, ``torn`` writes half of the data of that write then SIGKILLs, ``term`` sends
SIGTERM and lets the event go on; FIRED is created first. MODE ``count`` only logs.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from typing import Any

# The random part of staging and trash folder names (.staging-checkpoint-5-1a2b3c4d): the
# same pattern as chaos_events._RANDOM_SUFFIX (this file runs standalone, as sitecustomize).
_RANDOM_SUFFIX = re.compile(r"(/?\.[^/]*?-)[0-9a-f]{8}(?=/|$)")

_SPEC = os.environ.pop("SAFEPOINT_CHAOS_HOOK", None)
_WRITABLE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _install(spec: str) -> None:
    mode, k, out, log_path, fired = spec.split(":", 4)
    # K: a global event number, or "kind US nth US path": the nth event of that kind on
    # that (normalized) path, which events the reference run did not have cannot shift.
    target: tuple[str, int, str] | None = None
    if "\x1f" in k:
        kind_, nth_, path_ = k.split("\x1f", 2)
        target, at = (kind_, int(nth_), path_), -1
    else:
        at = int(k)
    seen: dict[tuple[str, str], int] = {}
    out = os.path.abspath(out)
    prefix = out + os.sep
    lock = threading.Lock()
    inside = threading.local()
    count = [0]
    real_write, real_fsync = os.write, os.fsync
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def resolve(path: Any, dir_fd: Any = None) -> str | None:
        if isinstance(path, int):
            return _fd_path(path)
        try:
            text = os.fsdecode(os.fspath(path))
        except TypeError:
            return None
        if not os.path.isabs(text):
            base = _fd_path(dir_fd) if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
            if base is None:
                return None
            text = os.path.join(base, text)
        return os.path.normpath(text)

    def ours(path: str | None) -> bool:
        return path is not None and (path == out or path.startswith(prefix))

    def event(kind: str, path: str, data: Any = None, fd: int | None = None) -> None:
        """Count one event; fire at the K-th. Returns normally unless it kills."""
        with lock:
            count[0] += 1
            number = count[0]
            rel = os.path.relpath(path, out)
            real_write(log_fd, f"{number}\t{kind}\t{rel}\n".encode(errors="replace"))
            hit = number == at
            if target is not None:
                key = (kind, _RANDOM_SUFFIX.sub(r"\1*", rel))
                seen[key] = seen.get(key, 0) + 1
                hit = key == target[::2] and seen[key] == target[1]
        if not hit or mode == "count":
            return
        fd_marker = os.open(fired, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        real_write(fd_marker, f"{number}\t{kind}\t{rel}\n".encode(errors="replace"))
        os.close(fd_marker)
        if mode == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if mode == "torn" and fd is not None and data is not None:
            view = memoryview(data).cast("B")
            real_write(fd, view[: len(view) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    def guarded(kind: str, path: str | None, data: Any = None, fd: int | None = None) -> None:
        if not ours(path) or getattr(inside, "on", False):
            return
        inside.on = True
        try:
            event(kind, path, data, fd)  # type: ignore[arg-type]
        finally:
            inside.on = False

    def hook(name: str, args: tuple[Any, ...]) -> None:
        if name == "open" and len(args) >= 3 and isinstance(args[2], int):
            if args[2] & _WRITABLE and not isinstance(args[0], int):
                guarded("open", resolve(args[0]))
        elif name == "os.mkdir":
            guarded("mkdir", resolve(args[0], args[2]))
        elif name == "os.rename":
            src, dst = resolve(args[0], args[2]), resolve(args[1], args[3])
            guarded("rename", src if ours(src) else dst)
        elif name == "os.remove":
            guarded("unlink", resolve(args[0], args[1]))
        elif name == "os.rmdir":
            guarded("rmdir", resolve(args[0], args[1]))

    def write(fd: int, data: Any) -> int:
        if not getattr(inside, "on", False):
            guarded("write", _fd_path(fd), data, fd)
        return real_write(fd, data)

    def fsync(fd: Any) -> None:
        number = fd if isinstance(fd, int) else fd.fileno()
        if not getattr(inside, "on", False):
            guarded("fsync", _fd_path(number))
        return real_fsync(fd)

    os.write = write
    os.fsync = fsync
    sys.addaudithook(hook)


def _chain() -> None:
    """Run the sitecustomize this one shadows, if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    saved = list(sys.path)
    module = sys.modules.pop("sitecustomize", None)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    try:
        import sitecustomize  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
        if module is not None:
            sys.modules["sitecustomize"] = module


if __name__ == "sitecustomize":
    _chain()
    if _SPEC:
        _install(_SPEC)
