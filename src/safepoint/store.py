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
import ctypes
import errno
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from safepoint.errors import SafepointError, SaveFailedError
from safepoint.faults import crash_point
from safepoint.fileio import read_regular
from safepoint.format import write_safetensors
from safepoint.manifest import MANIFEST_NAME, FileEntry, Manifest, Parent
from safepoint.thinning import thin_manifest, thin_selection
from safepoint.validity import (
    STAGING_PREFIX,
    CheckpointInfo,
    aside_name,
    checkpoint_step,
    inspect,
    note_written,
    scan,
)
from safepoint.writing import (
    create_file,
    fsync_committed,
    fsync_dir,
    link_or_copy,
    save_failed_message,
    start_writeback,
    write_into,
    write_new_file,
)

if TYPE_CHECKING:
    # snapshot imports torch; listing and verifying never need it (`safepoint ls` < 0.5 s)
    from safepoint.snapshot import Snapshot, TensorFile

log = logging.getLogger("safepoint")

TRASH_PREFIX = ".trash-"


class Store:
    """Reads and writes the checkpoints of one output directory.

    Not thread-safe by itself: the engine serialises commits and deletions.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._reaping: list[tuple[str, Future[None]]] = []
        self._no_exchange = False  # the file system refused RENAME_EXCHANGE: no thinning

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
                fds.append(create_file(staging / name))
                crash_at = "tensor_file" if i == 0 else None
                entries[name] = write_into(
                    fds[-1], content, crash_at=crash_at, abort=abort, write=write_safetensors
                )
            for fd in fds:
                start_writeback(fd)
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
        write_new_file(staging / MANIFEST_NAME, manifest.to_json())
        crash_point("after_manifest")
        fsync_dir(staging)
        if not self._make_room_for(target, manifest):
            shutil.rmtree(staging)
            return inspect(target)
        self._put(staging, target)
        crash_point("after_rename")
        fsync_committed(self.directory, target)
        note_written(target, manifest)
        return CheckpointInfo(target, snapshot.step, "valid", (), manifest, manifest.total_bytes)

    def discard(self, staging: Path) -> None:
        """Remove a staging folder of a save that failed (gone already: fine)."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)

    def failure(self, step: int, e: OSError) -> SaveFailedError:
        """The ``SaveFailedError`` of a save of ``step`` that failed with ``e``."""
        return SaveFailedError(save_failed_message(self.path_for(step), e))

    def adopt(self, staging: Path, step: int) -> CheckpointInfo:
        """Commit a staging folder whose files were written and fsynced elsewhere (a
        checkpoint downloaded from a remote mirror): steps 4 of the commit protocol."""
        target = self.path_for(step)
        fsync_dir(staging)
        raw = read_regular(staging / MANIFEST_NAME, max_size=16 << 20)
        manifest = Manifest.from_json(bytes(raw), where=str(staging / MANIFEST_NAME))
        if self._make_room_for(target, manifest):
            self._put(staging, target)
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
        if existing.thin and not new.is_thin and existing.manifest is not None:
            old = existing.manifest.files
            if all(new.files.get(n) == e for n, e in old.items()):
                return True  # the thin form of this same checkpoint: _put swaps it out
        self.set_aside(existing, "superseded" if existing.valid else existing.status)
        return True

    def _put(self, staging: Path, target: Path) -> None:
        """The commit's rename of ``staging`` to ``target``. Where ``target`` is still
        there (``_make_room_for`` kept it: a thin checkpoint whose every file, size and
        checksum the new full one holds), the two are swapped atomically and the thin
        one leaves as a deletion does: nothing of it is lost, and it is not "another
        line of the run" to set aside."""
        if not os.path.lexists(target):
            os.replace(staging, target)
            return
        _exchange(staging, target)
        self._trash_later(staging, target.name, "its thin version")

    def _trash_later(self, path: Path, name: str, what: str) -> None:
        """Rename ``path`` (what was ``name``) to a ``.trash-`` folder; its files go on
        the reaper thread."""
        trash = self.directory / f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}"
        os.replace(path, trash)
        self._reaping.append((f"{name} ({what})", _reaper().submit(self._remove, trash)))

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

    def thin(self, info: CheckpointInfo) -> CheckpointInfo | None:
        """Replace the full checkpoint ``info`` by its thin version (``thinning.py``)
        atomically; the thin one, or None where it stays full (nothing to drop, sharded,
        a file system that cannot swap two folders: said once). A staging folder gets a
        hard link (else a copy) of each kept file and the thin manifest, fsync'd with
        the folder; then one ``renameat2(RENAME_EXCHANGE)`` swaps it with
        ``checkpoint-N``: that name holds the full checkpoint up to this instant and the
        thin one from it on, never neither (a rename onto a non-empty folder fails on
        Linux; a rename away first would leave a window with no ``checkpoint-N``). The
        full one, now under the staging name (never read by resume; a crash here leaves
        it to the next start's ``sweep``), leaves as a deletion does; its kept files'
        inodes live on in the thin one."""
        chosen = info.manifest and thin_selection(info.path, info.manifest)
        if not chosen or info.manifest is None or self._no_exchange:
            return None
        manifest = thin_manifest(info.manifest, *chosen)
        staging = self.begin(info.step)
        try:
            for name in manifest.files:
                link_or_copy(info.path / name, staging / name)
            write_new_file(staging / MANIFEST_NAME, manifest.to_json())
            fsync_dir(staging)
            crash_point("thin_staged")
            _exchange(staging, info.path)
        except OSError as e:
            self.discard(staging)
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            self._no_exchange = True
            log.warning(
                "the file system of %s cannot swap two folders atomically (%s); older "
                "checkpoints stay full (keep_full applies where it can)",
                self.directory,
                e.strerror or e,
            )
            return None
        crash_point("thin_exchanged")
        note_written(info.path, manifest)
        self._trash_later(staging, info.name, "its full version")
        return CheckpointInfo(info.path, info.step, "valid", (), manifest, manifest.total_bytes)

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


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap the names ``a`` and ``b`` atomically: Linux ``renameat2`` with
    ``RENAME_EXCHANGE`` (3.15+, ext4, xfs, btrfs, tmpfs; not NFS, not a FUSE file system
    without it: EINVAL). Raises ``OSError``; ENOSYS where the C library lacks it. Raised
    first as the audit event ``os.rename`` (it is one, twice over), so that whatever
    watches renames (the chaos file-event hook) sees it."""
    fn = _renameat2()
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here", str(a))
    sys.audit("os.rename", str(a), str(b), -1, -1)
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


def _renameat2() -> Callable[..., int] | None:
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = getattr(libc, "renameat2", None)
        except OSError:
            fn = None
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
            fn.argtypes += [ctypes.c_uint]
            fn.restype = ctypes.c_int
        _LIBC.append(fn)
    return _LIBC[0]


_LIBC: list[Callable[..., int] | None] = []
