"""Writing one checkpoint's files into its staging folder: create, write hashed,
writeback, fsync; a file unchanged since the previous checkpoint hard-linked instead.

No renames, no deletions (``store.py`` does those): everything here creates new names
inside a staging folder that nothing reads until the store commits it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from safepoint.faults import crash_point, fault_point
from safepoint.fileio import new_hasher, write_all
from safepoint.format import write_safetensors
from safepoint.manifest import FileEntry

if TYPE_CHECKING:
    from safepoint.snapshot import TensorFile

log = logging.getLogger("safepoint")


def fsync_dir(path: Path) -> None:
    """fsync a folder; a file system that cannot (EINVAL, ENOTSUP: some FUSE and CIFS
    mounts) is said once, and the save goes on: it flushes folders its own way."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fault_point("dir_fsync")
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        if not _fsync_unsupported:
            _fsync_unsupported.append(path)
            log.warning(
                "the file system of %s cannot fsync a folder (%s); checkpoints are still "
                "committed by rename, durable once the file system flushes",
                path,
                e.strerror,
            )
    finally:
        os.close(fd)


_fsync_unsupported: list[Path] = []


def create_file(path: Path) -> int:
    # 0o666 and 0o777 (staging) go through the umask: a checkpoint gets the modes of any
    # new file and folder, and the rename keeps them (no private temp-file modes).
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)


def write_into(
    fd: int,
    content: TensorFile | bytes,
    *,
    crash_at: str | None,
    abort: Callable[[], None] | None = None,
    write: Callable[..., tuple[int, str]] = write_safetensors,
) -> FileEntry:
    """Write ``content`` to the new file ``fd``, hashed in the same pass; not fsync'd.
    ``write``: how a tensor file is written (``store`` passes its own name of
    ``format.write_safetensors``, which tests replace to slow or fail a save)."""
    from safepoint.snapshot import TensorFile  # loaded already: a save holds tensors

    if isinstance(content, TensorFile):
        calls = []

        def on_chunk(_written: int) -> None:
            # Crash tests: die once per save, mid-file, after its first chunk.
            if crash_at and not calls:
                calls.append(1)
                crash_point(crash_at)
            if abort is not None:
                abort()

        size, digest = write(
            fd, content.tensors, content.metadata, on_chunk=on_chunk, image=content.image
        )
        return FileEntry(size, digest)
    write_all(fd, memoryview(content))
    hasher = new_hasher()
    hasher.update(content)
    return FileEntry(len(content), hasher.hexdigest())


def start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to the disk without waiting (Linux: the
    ``POSIX_FADV_DONTNEED`` advice does, as PostgreSQL's checkpointer uses it). Done for
    every file of a save before the first fsync waits, the blocks of all of them are
    allocated in one journal transaction, and the fsyncs after it share its commit."""
    if _FADVISE is not None:
        with contextlib.suppress(OSError):  # only a hint: the fsync after it does the work
            os.posix_fadvise(fd, 0, 0, _FADVISE)


_FADVISE = getattr(os, "POSIX_FADV_DONTNEED", None)


def write_new_file(path: Path, content: bytes) -> FileEntry:
    """One new file, written and fsync'd (the manifest)."""
    fd = create_file(path)
    try:
        entry = write_into(fd, content, crash_at=None)
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def fsync_committed(directory: Path, target: Path) -> None:
    # After the rename the checkpoint is committed: a failed fsync of the parent (an I/O
    # error) may cost the rename at a power cut, never the folder's content. Say so; it
    # is not a failed save.
    try:
        fsync_dir(directory)
    except OSError as e:
        log.warning(
            "%s is committed, but fsync of %s failed (%s): after a power cut the run may "
            "resume from the checkpoint before it; check the disk",
            target.name,
            directory,
            e.strerror or e,
        )


def save_failed_message(target: Path, e: OSError) -> str:
    why = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        hint = "free space, lower keep_last, set max_disk, or use another output directory"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the output directory writable or choose another output directory"
    else:
        hint = "check the disk; earlier checkpoints are intact"
    return f"saving {target} failed: {why}; the previous checkpoints are intact; {hint}"


def link_or_copy(src: Path, dst: Path) -> bool:
    """Make ``dst`` (a new name in a staging folder) hold ``src``'s bytes: a hard link
    (same file system: no byte written, the inode shared), else a copy, fsync'd. True
    when linked. Links fail on another file system (EXDEV), where a file system has
    none (a FUSE mount without ``link``: EPERM, ENOSYS, ENOTSUP) or too many (EMLINK):
    the copy is then the answer, said nowhere (the hot path stays quiet). A linked
    file is shared: nothing in safepoint ever writes a committed file in place, so
    sharing changes what is on disk only when the last name goes."""
    try:
        os.link(src, dst, follow_symlinks=False)
        return True
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        out = create_file(dst)
        try:
            with open(fd, "rb", closefd=False) as r, open(out, "wb", closefd=False) as w:
                shutil.copyfileobj(r, w, 8 << 20)
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)
    return False


_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP,
            errno.EMLINK, errno.EACCES}  # fmt: skip
