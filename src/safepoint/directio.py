"""Writing a file with ``O_DIRECT``: the bytes go from an aligned buffer to the disk.

Through the page cache, the kernel copies every byte once more and then spends CPU on
dirty-page accounting, writeback and reclaim; that CPU comes out of training on a busy
machine. Measured on the 2-core dev machine (1 GiB, ext4): 0.2-2.3 s of system time per
GiB through the page cache (2.3 s when the cache must first be reclaimed), 0.05 s with
``O_DIRECT`` (benchmarks/save_overhead.py, part ``writepath``).

``O_DIRECT`` needs the buffer address, the file offset and the length aligned to the
logical block size. Tensors are streamed through one reused page-aligned buffer
(``mmap``); the last block is padded with zeros and the file is then truncated to its
real size. Where the file system refuses ``O_DIRECT`` (ramfs, some FUSE and network
file systems: ``EINVAL``) the same bytes go through the page cache, said once in the log.
fsync is the caller's business, as for any other write.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("safepoint")

ALIGN = 4096
"""Alignment of buffer, offsets and lengths: a multiple of every common logical block size."""

BUFFER_BYTES = 8 << 20
"""Bytes per ``O_DIRECT`` write. 8 MiB is at full disk speed here and keeps the staging
copy into it cache-warm for the hash (1 MiB: -15%, 64 MiB: no faster)."""

ENABLED = os.environ.get("SAFEPOINT_DIRECT_IO", "1") != "0"
"""Use ``O_DIRECT`` for tensor files (``SAFEPOINT_DIRECT_IO=0``: page cache, as before)."""

DIRECT_MIN_BYTES = 2 << 20
"""Smaller tensor files go through the page cache. Each ``O_DIRECT`` write waits for the
disk, file after file, while page-cache files share one writeback and one journal commit
(``Store.write_files``). Three files written and fsync'd here: 1 MiB each, 3.8 ms through
the page cache, 5.7 ms with ``O_DIRECT``; 4 MiB each, 13.1 vs 11.8 ms."""


def wants_direct(size: int, direct: bool | None = None) -> bool:
    """Whether a file of ``size`` bytes is written with ``O_DIRECT``: ``direct`` if given,
    else from ``DIRECT_MIN_BYTES`` on (unless ``SAFEPOINT_DIRECT_IO=0``)."""
    return ENABLED and size >= DIRECT_MIN_BYTES if direct is None else direct


_local = threading.local()
_refused: set[int] = set()  # st_dev of file systems that refused O_DIRECT (logged once)
_refused_lock = threading.Lock()


def _buffer() -> mmap.mmap:
    # One per thread (the background writer, or the training thread for in-line saves),
    # reused for every file: no allocation per save. mmap memory is page-aligned.
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = mmap.mmap(-1, BUFFER_BYTES)
    return buf


def _refuse(fd: int, error: OSError) -> None:
    dev = os.fstat(fd).st_dev
    with _refused_lock:
        first = dev not in _refused
        _refused.add(dev)
    if first:
        log.info(
            "this file system refuses O_DIRECT (%s); checkpoints on it are written through "
            "the page cache",
            error.strerror or error,
        )


def _set_direct(fd: int, on: bool) -> bool:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = flags | os.O_DIRECT if on else flags & ~os.O_DIRECT
    if want == flags:
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)
    except OSError as e:
        if e.errno != errno.EINVAL or not on:
            raise
        _refuse(fd, e)
        return False
    return True


class FileStream:
    """Appends bytes to an open ``fd`` and hashes them in the same pass.

    With ``O_DIRECT`` available (and the fd at an aligned offset), bytes are copied into
    the thread's aligned buffer, hashed there while cache-warm, and written in whole
    blocks; ``close()`` pads the tail, truncates the padding away and clears ``O_DIRECT``
    again. Otherwise each piece is hashed and written as is. Not thread-safe; one open
    stream per thread at a time (they share the thread's buffer).
    """

    def __init__(self, fd: int, hasher: Any, *, direct: bool | None = None) -> None:
        self.fd = fd
        self.hasher = hasher
        self.start = os.lseek(fd, 0, os.SEEK_CUR)
        self.size = 0  # bytes appended so far
        use = ENABLED if direct is None else direct
        self.direct = use and self.start % ALIGN == 0 and _try_direct(fd)
        self._fill = 0
        self._buf = memoryview(_buffer()) if self.direct else None

    def write(self, data: memoryview) -> None:
        """Append ``data`` (any bytes-like; not kept after the call)."""
        data = memoryview(data).cast("B")
        self.size += len(data)
        if self._buf is None:
            self.hasher.update(data)
            _write_all(self.fd, data)
            return
        while len(data):
            n = min(len(data), len(self._buf) - self._fill)
            _copy(self._buf[self._fill : self._fill + n], data[:n])
            self._fill += n
            data = data[n:]
            if self._fill == len(self._buf):
                self._flush()

    def _flush(self) -> None:
        assert self._buf is not None
        view = self._buf[: self._fill]
        self.hasher.update(view)
        padded = -self._fill % ALIGN
        if padded:
            self._buf[self._fill : self._fill + padded] = bytes(padded)
        self._write_direct(self._buf[: self._fill + padded])
        self._fill = 0

    def _write_direct(self, view: memoryview) -> None:
        self.direct = _write_blocks(self.fd, view, direct=self.direct)

    def close(self) -> int:
        """Write what is buffered, drop the tail padding; return the bytes appended.

        The fd stays open and is not fsync'd."""
        if self._buf is not None:
            if self._fill:
                self._flush()
            _finish(self.fd, self.start + self.size, direct=self.direct)
            self._buf = None
        return self.size


def write_image(
    fd: int,
    image: memoryview,
    size: int,
    hasher: Any,
    *,
    on_chunk: Callable[[int], None] | None = None,
    direct: bool | None = None,
) -> int:
    """Append ``image[:size]`` to ``fd``, hashing it in the same pass; return ``size``.

    ``image`` is a ``staging.FileImage``: page-aligned, and zero from ``size`` to its
    block boundary. With ``O_DIRECT`` it goes to the disk from where it lies, no bounce
    buffer: ``BUFFER_BYTES`` at a time, each piece hashed just before it is written, the
    last block's padding truncated away at the end. Otherwise (``direct=False``, a file
    system that refuses it, an unaligned offset) the same pieces go through the page
    cache. ``on_chunk(bytes so far)`` after each piece. The fd stays open, at the end of
    the file, not fsync'd.
    """
    start = os.lseek(fd, 0, os.SEEK_CUR)
    blocks = -(-size // ALIGN) * ALIGN
    use = wants_direct(size, direct) and len(image) >= blocks
    on = use and start % ALIGN == 0 and _address(image) % ALIGN == 0 and _try_direct(fd)
    pos = 0
    while pos < size:
        end = min(pos + BUFFER_BYTES, size)
        hasher.update(image[pos:end])
        if on:
            on = _write_blocks(fd, image[pos : min(-(-end // ALIGN) * ALIGN, blocks)], direct=True)
        else:
            _write_all(fd, image[pos:end])
        pos = end
        if on_chunk is not None:
            on_chunk(pos)
    if on or os.lseek(fd, 0, os.SEEK_CUR) != start + size:
        _finish(fd, start + size, direct=on)
    return size


def _try_direct(fd: int) -> bool:
    return os.fstat(fd).st_dev not in _refused and _set_direct(fd, True)


def _write_blocks(fd: int, view: memoryview, *, direct: bool) -> bool:
    """Write all of ``view``; whether ``O_DIRECT`` is still on afterwards."""
    while len(view):
        try:
            n = os.write(fd, view)
        except OSError as e:
            # A file system that takes O_DIRECT at open but not these writes (a block
            # size above ALIGN): the rest goes through the page cache.
            if e.errno != errno.EINVAL or not direct:
                raise
            _refuse(fd, e)
            _set_direct(fd, False)
            direct = False
            continue
        view = view[n:]
    return direct


def _finish(fd: int, end: int, *, direct: bool) -> None:
    """Cut the zero padding of the last block (if written), leave the fd at ``end``,
    clear ``O_DIRECT``."""
    if os.lseek(fd, 0, os.SEEK_CUR) != end:
        os.ftruncate(fd, end)
        os.lseek(fd, end, os.SEEK_SET)
    if direct:
        _set_direct(fd, False)


def _address(view: memoryview) -> int:
    """The address of ``view``'s first byte (0 when empty)."""
    if not len(view):
        return 0
    import numpy as np

    return int(np.frombuffer(view, np.uint8).ctypes.data)


def _copy(dst: memoryview, src: memoryview) -> None:
    # numpy copies without the GIL (a memoryview slice assignment holds it: ~1.5 ms per
    # 8 MiB during which the training thread cannot run Python) and on one core (torch's
    # copy_ would start its own thread team next to training's).
    if len(src) < 1 << 16:
        dst[:] = src
        return
    import numpy as np

    np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]
