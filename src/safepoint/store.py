"""The store: the only code that creates, renames or deletes checkpoint folders.

Commit protocol (DESIGN.md): write every file into ``.staging-checkpoint-<step>-<rand>``
beside the target, fsync each, write the manifest last, fsync the folder, rename it to
``checkpoint-<step>``, fsync the parent. A crash at any instant leaves either the old
set of checkpoints or the old set plus the new one; never a folder that resume would
pick and fail on. ``safepoint.validity.inspect`` is the one function that decides what
a folder is; everything here acts on its answer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from safepoint.errors import SafepointError, SaveFailedError
from safepoint.faults import crash_point, fault_point
from safepoint.fileio import new_hasher, read_regular, write_all
from safepoint.format import write_safetensors
from safepoint.manifest import MANIFEST_NAME, FileEntry, Manifest, Parent
from safepoint.validity import (
    STAGING_PREFIX,
    CheckpointInfo,
    aside_name,
    checkpoint_step,
    inspect,
    note_written,
    scan,
)

if TYPE_CHECKING:
    # snapshot imports torch; listing and verifying never need it (`safepoint ls` < 0.5 s)
    from safepoint.snapshot import Snapshot, TensorFile

log = logging.getLogger("safepoint")

TRASH_PREFIX = ".trash-"


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


def _create(path: Path) -> int:
    # 0o666 and 0o777 (staging) go through the umask: a checkpoint gets the modes of any
    # new file and folder, and the rename keeps them (no private temp-file modes).
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)


def _write_into(
    fd: int,
    content: TensorFile | bytes,
    *,
    crash_at: str | None,
    abort: Callable[[], None] | None = None,
) -> FileEntry:
    """Write ``content`` to the new file ``fd``, hashed in the same pass; not fsync'd."""
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

        size, digest = write_safetensors(
            fd, content.tensors, content.metadata, on_chunk=on_chunk, image=content.image
        )
        return FileEntry(size, digest)
    write_all(fd, memoryview(content))
    hasher = new_hasher()
    hasher.update(content)
    return FileEntry(len(content), hasher.hexdigest())


def _start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to the disk without waiting (Linux: the
    ``POSIX_FADV_DONTNEED`` advice does, as PostgreSQL's checkpointer uses it). Done for
    every file of a save before the first fsync waits, the blocks of all of them are
    allocated in one journal transaction, and the fsyncs after it share its commit."""
    if _FADVISE is not None:
        with contextlib.suppress(OSError):  # only a hint: the fsync after it does the work
            os.posix_fadvise(fd, 0, 0, _FADVISE)


_FADVISE = getattr(os, "POSIX_FADV_DONTNEED", None)


def _write_file(path: Path, content: bytes) -> FileEntry:
    """One new file, written and fsync'd (the manifest)."""
    fd = _create(path)
    try:
        entry = _write_into(fd, content, crash_at=None)
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


class Store:
    """Reads and writes the checkpoints of one output directory.

    Not thread-safe by itself: the engine serialises commits and deletions.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._reaping: list[tuple[str, Future[None]]] = []

    def path_for(self, step: int) -> Path:
        return self.directory / f"checkpoint-{step}"

    def scan(self, *, deep: bool = False) -> list[CheckpointInfo]:
        return scan(self.directory, deep=deep)

    def sweep(self) -> list[Path]:
        """Remove folders left by crashed saves and deletions. Call only under the lock."""
        self.settle()  # a removal that failed left its trash folder: tried again below
        swept = []
        for name in os.listdir(self.directory):
            path = self.directory / name
            if (
                name.startswith((STAGING_PREFIX, TRASH_PREFIX))
                and path.is_dir()
                and not path.is_symlink()
            ):
                try:
                    shutil.rmtree(path)
                except OSError as e:  # an undeletable file (immutable, NFS, EIO): go on
                    log.warning(
                        "cannot remove %s left by an interrupted save or deletion (%s: %s); "
                        "remove it by hand",
                        path,
                        e.strerror or e,
                        getattr(e, "filename", None) or path,
                    )
                    continue
                swept.append(path)
        if swept:
            fsync_dir(self.directory)
            log.warning(
                "removed %d folder(s) left by an interrupted save or deletion: %s",
                len(swept),
                ", ".join(p.name for p in swept),
            )
        return swept

    def commit(
        self,
        snapshot: Snapshot,
        *,
        versions: dict[str, str] | None = None,
        info: dict[str, object] | None = None,
        abort: Callable[[], None] | None = None,
        parent: Parent | None = None,
    ) -> CheckpointInfo:
        """Write ``snapshot`` with the commit protocol; return the committed checkpoint.

        Raises ``SaveFailedError`` (with the OS error as cause) after removing the
        staging folder; existing checkpoints are untouched. ``abort`` is called between
        written chunks: whatever it raises abandons the save the same way.
        """
        t0 = time.perf_counter()
        staging = None
        snapshot.resolve()  # its deferred files (state.json) are made by the writing thread
        try:
            staging = self.begin(snapshot.step)
            files = self.write_files(staging, snapshot.files, abort=abort)
            if snapshot.fence is not None:  # copy-free: the live tensors written unchanged?
                snapshot.fence.check()
            return self.finish(
                staging, snapshot, files, t0=t0, versions=versions, info=info, parent=parent
            )
        except BaseException as e:
            if staging is not None:
                self.discard(staging)
            if isinstance(e, OSError):
                raise self.failure(snapshot.step, e) from e
            raise

    def begin(self, step: int) -> Path:
        """Step 1 of the commit protocol: a new staging folder for ``checkpoint-<step>``."""
        name = f"{STAGING_PREFIX}{self.path_for(step).name}-{secrets.token_hex(4)}"
        os.mkdir(self.directory / name, 0o777)
        return self.directory / name

    def write_files(
        self,
        staging: Path,
        files: Mapping[str, TensorFile | bytes],
        *,
        abort: Callable[[], None] | None = None,
    ) -> dict[str, FileEntry]:
        """Step 2: write each of ``files`` into ``staging``, then make them all durable;
        their sizes and checksums. Writeback of every file starts before the first fsync
        waits: one journal commit then carries them all (six small files: their fsyncs
        1.7 -> 0.9 ms on this machine's ext4). Several processes may each write
        their own files into one staging."""
        fds: list[int] = []
        entries: dict[str, FileEntry] = {}
        try:
            for i, (name, content) in enumerate(files.items()):
                fds.append(_create(staging / name))
                crash_at = "tensor_file" if i == 0 else None
                entries[name] = _write_into(fds[-1], content, crash_at=crash_at, abort=abort)
            for fd in fds:
                _start_writeback(fd)
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        return entries

    def finish(
        self,
        staging: Path,
        snapshot: Snapshot,
        files: dict[str, FileEntry],
        *,
        t0: float,
        versions: dict[str, str] | None = None,
        info: dict[str, object] | None = None,
        parent: Parent | None = None,
    ) -> CheckpointInfo:
        """Steps 3 and 4, once every file of ``files`` in ``staging`` is durable: the
        manifest, fsync of the folder, the rename (the commit), fsync of the parent.
        ``parent``: the checkpoint this one descends from (the manifest records it).
        Raises ``OSError``; the caller discards the staging folder."""
        target = self.path_for(snapshot.step)
        crash_point("after_files")
        manifest = Manifest(
            step=snapshot.step,
            files=files,
            reason=snapshot.reason,
            metrics=snapshot.metrics,
            fingerprint=snapshot.fingerprint,
            versions=versions or {},
            info={
                **snapshot.info,
                **(info or {}),
                "write_s": round(time.perf_counter() - t0, 6),
            },
            parent=parent,
        )
        _write_file(staging / MANIFEST_NAME, manifest.to_json())
        crash_point("after_manifest")
        fsync_dir(staging)
        if not self._make_room_for(target, manifest):
            shutil.rmtree(staging)
            return inspect(target)
        os.replace(staging, target)
        crash_point("after_rename")
        _fsync_committed(self.directory, target)
        note_written(target, manifest)
        return CheckpointInfo(target, snapshot.step, "valid", (), manifest, manifest.total_bytes)

    def discard(self, staging: Path) -> None:
        """Remove a staging folder of a save that failed (gone already: fine)."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)

    def failure(self, step: int, e: OSError) -> SaveFailedError:
        """The ``SaveFailedError`` of a save of ``step`` that failed with ``e``."""
        return SaveFailedError(_save_failed_message(self.path_for(step), e))

    def adopt(self, staging: Path, step: int) -> CheckpointInfo:
        """Commit a staging folder whose files were written and fsynced elsewhere (a
        checkpoint downloaded from a remote mirror): steps 4 of the commit protocol."""
        target = self.path_for(step)
        fsync_dir(staging)
        raw = read_regular(staging / MANIFEST_NAME, max_size=16 << 20)
        manifest = Manifest.from_json(bytes(raw), where=str(staging / MANIFEST_NAME))
        if self._make_room_for(target, manifest):
            os.replace(staging, target)
            fsync_dir(self.directory)
        else:
            shutil.rmtree(staging)
        return inspect(target)

    def _make_room_for(self, target: Path, new: Manifest) -> bool:
        """Clear ``target`` for the commit of ``new``; False when it already holds
        exactly that checkpoint (the staging folder is then dropped).

        One rule for a slot: a folder in the way is kept only if it passes the full
        check (every checksum, not sizes) and lists the same files, sizes and checksums
        as ``new``. Anything else (damaged, unfinished, another run's, another line of
        this run's) is set aside under a name ``ls`` shows, never deleted: it may be the
        only copy of something a person wants to look at."""
        if not os.path.lexists(target):
            return True
        existing = inspect(target, deep=True)
        if existing.valid and existing.manifest is not None and existing.manifest.same_files(new):
            log.info("%s already holds this same checkpoint (every checksum equal)", target)
            return False
        self.set_aside(existing, "superseded" if existing.valid else existing.status)
        return True

    def set_aside(self, info: CheckpointInfo, why: str) -> Path:
        """Rename the folder of ``info`` out of the run to ``checkpoint-N.<why>-<time>``:
        no longer resumed from, kept or deleted by safepoint; ``ls`` lists it and why."""
        aside = aside_name(info.path, why)
        os.replace(info.path, aside)
        log.warning("%s set aside as %s", info.name, aside.name)
        return aside

    def set_aside_later_than(self, step: int) -> list[Path]:
        """Set aside every ``checkpoint-N`` with N > ``step``: a run that resumed from
        ``step`` (a rollback, or a fallback past a damaged checkpoint) writes another
        future, and a later resume must never mix the two lines. Called at that run's
        first commit, so that a run stopped before saving anything changes nothing.
        Each is checked whole first, so that its new name says whether it was damaged."""
        later = [i for i in scan(self.directory) if i.step > step and i.status != "staging"]
        moved = []
        for info in later:
            if info.valid:
                info = inspect(info.path, deep=True)
            moved.append(self.set_aside(info, "superseded" if info.valid else info.status))
        if moved:
            fsync_dir(self.directory)
        return moved

    def delete(
        self, info: CheckpointInfo, *, allow_foreign: bool = False, background: bool = False
    ) -> None:
        """Delete one checkpoint folder: atomically out of sight by a rename, then removed.

        Refuses anything that is not a ``checkpoint-N`` folder directly in this
        directory, and anything that is not a valid safepoint checkpoint unless
        ``allow_foreign`` (then foreign and incomplete folders too, never symlinks).
        ``background``: only the rename happens here; the fsync of the directory and the
        removal run on the process's reaper thread (the next ``settle()`` waits for them
        and returns what failed). A crash before they end leaves a ``.trash-`` folder,
        which the next start's ``sweep`` removes."""
        path = info.path
        if (
            (path.parent != self.directory and path.parent.resolve() != self.directory.resolve())
            or checkpoint_step(path.name) is None
            or path.is_symlink()
        ):
            raise SafepointError(
                f"{path}: refusing to delete; not a checkpoint of {self.directory}"
            )
        current = inspect(path)
        allowed = {"valid"} | ({"foreign", "incomplete"} if allow_foreign else set())
        if current.status not in allowed:
            raise SafepointError(f"{path}: refusing to delete a {current.status} folder")
        trash = self.directory / f"{TRASH_PREFIX}{path.name}-{secrets.token_hex(4)}"
        os.replace(path, trash)
        if not background:
            self._remove(trash)
            return
        self._reaping.append((path.name, _reaper().submit(self._remove, trash)))

    def _remove(self, trash: Path) -> None:
        # The rename is made durable before any file goes: where a file system does not
        # keep metadata in order, a power cut must not leave checkpoint-N half removed.
        fsync_dir(self.directory)
        crash_point("retention")
        shutil.rmtree(trash)

    def settle(self) -> list[tuple[str, OSError]]:
        """Wait for the removals of background deletes; (checkpoint name, error) of each
        that failed (its folder is out of the run already: a ``.trash-`` folder is left)."""
        reaping, self._reaping = self._reaping, []
        return [(name, e) for name, f in reaping if isinstance(e := f.exception(), OSError)]


_REAPER: list[ThreadPoolExecutor] = []
_REAPER_LOCK = threading.Lock()


def _reaper() -> ThreadPoolExecutor:
    """The one thread of this process that removes deleted checkpoints' files (shared by
    every Store: a Store per run made in a notebook must not leave a thread each)."""
    with _REAPER_LOCK:
        if not _REAPER:
            _REAPER.append(ThreadPoolExecutor(1, thread_name_prefix="safepoint-reaper"))
        return _REAPER[0]


# A forked child has no reaper thread, and the parent's pool would never run its work.
os.register_at_fork(after_in_child=_REAPER.clear)


def _fsync_committed(directory: Path, target: Path) -> None:
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


def _save_failed_message(target: Path, e: OSError) -> str:
    why = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        hint = "free space, lower keep_last, set max_disk, or use another output directory"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the output directory writable or choose another output directory"
    else:
        hint = "check the disk; earlier checkpoints are intact"
    return f"saving {target} failed: {why}; the previous checkpoints are intact; {hint}"
