"""The store: the only code that creates, renames or deletes checkpoint folders.

Commit protocol (DESIGN.md): write every file into ``.staging-checkpoint-<step>-<rand>``
beside the target, fsync each, write the manifest last, fsync the folder, rename it to
``checkpoint-<step>``, fsync the parent. A crash at any instant leaves either the old
set of checkpoints or the old set plus the new one; never a folder that resume would
pick and fail on. ``inspect`` is the one function that decides what a folder is.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from safepoint.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    SafepointError,
    SaveFailedError,
)
from safepoint.format import hash_file, new_hasher, read_regular, write_all, write_safetensors
from safepoint.manifest import MANIFEST_NAME, FileEntry, Manifest

if TYPE_CHECKING:
    # snapshot imports torch; listing and verifying never need it (`safepoint ls` < 0.5 s)
    from safepoint.snapshot import Snapshot, TensorFile

log = logging.getLogger("safepoint")

CHECKPOINT_RE = re.compile(r"checkpoint-(\d{1,18})")
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
_MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB; refuse to parse a huge one

Status = Literal["valid", "incomplete", "corrupt", "foreign", "staging"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What is known about one folder of an output directory."""

    path: Path
    step: int
    status: Status
    problems: tuple[str, ...] = ()
    manifest: Manifest | None = None
    size: int = 0
    extra_files: tuple[str, ...] = field(default=())

    @property
    def valid(self) -> bool:
        return self.status == "valid"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.manifest.metrics) if self.manifest else {}

    @property
    def created(self) -> float | None:
        return self.manifest.created if self.manifest else None


# ----------------------------------------------------------------------------- crashes

_crash_counts: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Die by SIGKILL here if ``SAFEPOINT_CRASH_AT`` is ``name`` or ``name@N`` (N-th time).

    Only for crash tests: lets a test stop the writer at a named step of the protocol.
    """
    want = os.environ.get("SAFEPOINT_CRASH_AT")
    if not want:
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


# ---------------------------------------------------------------------------- inspect


def checkpoint_step(name: str) -> int | None:
    """The step in a ``checkpoint-<step>`` folder name, or None for any other name."""
    m = CHECKPOINT_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def inspect(path: str | os.PathLike[str], *, deep: bool = False) -> CheckpointInfo:
    """Decide what the folder ``path`` is: the single source of truth for validity.

    Shallow: the manifest and ``state.json`` parse and pass their schemas, the manifest
    matches the folder's step, every file it lists is a regular file of the recorded
    size, and nothing under ``path`` is a symlink or special file. ``deep`` also
    re-hashes every file. Opens only files the manifest lists (and the manifest), each
    with ``O_NOFOLLOW`` and checked on the open fd; never follows a link, never blocks.
    """
    path = Path(path)
    step = checkpoint_step(path.name)
    if step is None and path.name.startswith(STAGING_PREFIX):
        m = re.match(r"\.staging-checkpoint-(\d+)-", path.name)
        return CheckpointInfo(
            path,
            int(m.group(1)) if m else -1,
            "staging",
            ("a save in progress or abandoned by a crash",),
        )
    step = -1 if step is None else step

    def bad(status: Status, *problems: str, manifest: Manifest | None = None) -> CheckpointInfo:
        return CheckpointInfo(path, step, status, problems, manifest, _du(path))

    try:
        st = path.lstat()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such checkpoint") from None
    if stat.S_ISLNK(st.st_mode):
        return CheckpointInfo(
            path,
            step,
            "corrupt",
            (f"is a symlink to {os.readlink(path)}; safepoint only reads real folders",),
        )
    if not stat.S_ISDIR(st.st_mode):
        return CheckpointInfo(path, step, "corrupt", ("is not a folder",))
    mpath = path / MANIFEST_NAME
    try:
        mpath.lstat()
    except FileNotFoundError:
        if (path / "trainer_state.json").exists():
            return bad("foreign", "written by another tool (no safepoint.json)")
        return bad("incomplete", "no safepoint.json: never committed")
    try:
        manifest = Manifest.from_json(
            bytes(read_regular(mpath, max_size=_MAX_MANIFEST_BYTES)), where=str(mpath)
        )
    except IncompatibleCheckpointError as e:
        return bad("foreign", str(e))
    except (CorruptCheckpointError, OSError) as e:
        return bad("corrupt", str(e))
    if manifest.step != step:
        return bad(
            "corrupt", f"manifest says step {manifest.step}, folder says {step}", manifest=manifest
        )
    # A link anywhere inside is refused even if unlisted: nothing in a checkpoint may
    # point out of it, and a tool that copies or exports the folder would follow it.
    problems = _special_files(path)
    problems += [
        p
        for name, entry in manifest.files.items()
        if (p := _check_file(path / name, entry, deep=deep))
    ]
    if not problems:
        problems += _check_state(path, manifest, deep=deep)
    listed = set(manifest.files) | {MANIFEST_NAME}
    try:
        extra = tuple(sorted(n for n in os.listdir(path) if n not in listed))
    except OSError as e:
        problems.append(f"cannot list folder ({e.strerror})")
        extra = ()
    status: Status = "corrupt" if problems else "valid"
    return CheckpointInfo(
        path, step, status, tuple(problems), manifest, manifest.total_bytes, extra
    )


def _check_state(path: Path, manifest: Manifest, *, deep: bool) -> list[str]:
    """Problems of ``state.json``: listed, readable, and valid against its schema, so
    that a checkpoint resume would fail on is ``corrupt`` in ``ls`` already."""
    from safepoint.schema import STATE_NAME, parse_state

    entry = manifest.files.get(STATE_NAME)
    if entry is None:
        return [f"{STATE_NAME} is not listed in the manifest: nothing to restore from"]
    if entry.size > _MAX_MANIFEST_BYTES:
        return [f"{STATE_NAME}: {entry.size} bytes, more than a state file has"]
    try:
        data = read_regular(
            path / STATE_NAME, size=entry.size, checksum=entry.checksum if deep else None
        )
        parse_state(bytes(data), files=manifest.files, where=STATE_NAME)
    except (CorruptCheckpointError, IncompatibleCheckpointError) as e:
        return [str(e)]
    return _check_trainer_state(path, manifest, deep=deep)


def _check_trainer_state(path: Path, manifest: Manifest, *, deep: bool) -> list[str]:
    """Problems of a listed ``trainer_state.json`` (Trainer runs): the Trainer's resume
    would build its state from it, so one that fails its schema makes the checkpoint
    ``corrupt`` here, where every reader (ls, verify, resume, retention) sees it."""
    from safepoint.schema import (
        MAX_TRAINER_STATE_BYTES,
        TRAINER_STATE_NAME,
        parse_trainer_state,
    )

    entry = manifest.files.get(TRAINER_STATE_NAME)
    if entry is None:
        return []
    if entry.size > MAX_TRAINER_STATE_BYTES:
        return [f"{TRAINER_STATE_NAME}: {entry.size} bytes, more than a trainer state has"]
    try:
        data = read_regular(
            path / TRAINER_STATE_NAME,
            size=entry.size,
            checksum=entry.checksum if deep else None,
        )
        parse_trainer_state(bytes(data), step=manifest.step, where=TRAINER_STATE_NAME)
    except CorruptCheckpointError as e:
        return [str(e)]
    return []


def _special_files(path: Path) -> list[str]:
    """Every symlink or special file (FIFO, socket, device) anywhere under ``path``."""
    problems = []
    stack = [path]
    while stack and len(problems) < 10:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            problems.append(f"cannot list {folder.name} ({e.strerror})")
            continue
        for e in entries:
            rel = os.path.relpath(e.path, path)
            if e.is_symlink():
                problems.append(f"{rel} is a symlink; a checkpoint holds only real files")
            elif e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            elif not e.is_file(follow_symlinks=False):
                problems.append(f"{rel} is not a regular file (FIFO, socket or device)")
    return problems


def _check_file(path: Path, entry: FileEntry, *, deep: bool) -> str | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return f"{path.name}: missing"
    except OSError as e:
        return f"{path.name}: cannot stat ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{path.name}: not a regular file (symlink or special file)"
    if st.st_size != entry.size:
        return f"{path.name}: size expected {entry.size}, found {st.st_size}"
    if deep:
        try:
            _, digest = hash_file(path)
        except CorruptCheckpointError as e:
            return str(e)
        except OSError as e:
            return f"{path.name}: cannot read ({e.strerror})"
        if digest != entry.checksum:
            return f"{path.name}: checksum expected {entry.checksum}, found {digest}"
    return None


def _du(path: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for root, _dirs, files in os.walk(path):  # os.walk does not follow symlinks
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_size
    return total


def scan(directory: str | os.PathLike[str], *, deep: bool = False) -> list[CheckpointInfo]:
    """Every ``checkpoint-N`` and staging folder of ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{directory}: no such directory")
    infos = [
        inspect(directory / name, deep=deep)
        for name in os.listdir(directory)
        if checkpoint_step(name) is not None or name.startswith(STAGING_PREFIX)
    ]
    return sorted(infos, key=lambda i: (i.step, i.status != "staging", i.name))


def latest_checkpoint(directory: str | os.PathLike[str], *, deep: bool = True) -> Path | None:
    """The newest valid checkpoint of ``directory``, or None. Logs each newer one skipped."""
    for info in newest_first(directory, deep=deep):
        return info.path
    return None


def newest_first(
    directory: str | os.PathLike[str], *, deep: bool = True
) -> Iterator[CheckpointInfo]:
    """Yield valid checkpoints newest first, logging why each newer folder was skipped."""
    if not Path(directory).is_dir():
        return
    for info in reversed(scan(directory)):
        if info.status == "staging":
            continue
        if info.valid and deep:
            info = inspect(info.path, deep=True)
        if info.valid:
            yield info
        else:
            log.warning("skipping %s (%s): %s", info.path, info.status, "; ".join(info.problems))


def verify(path: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Deep-check one checkpoint folder, or every checkpoint in an output directory."""
    path = Path(path)
    if checkpoint_step(path.name) is not None or (path / MANIFEST_NAME).exists():
        return [inspect(path, deep=True)]
    return [i for i in scan(path, deep=True) if i.status != "staging"]


# ----------------------------------------------------------------------------- writes


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


def _write_file(
    path: Path,
    content: TensorFile | bytes,
    *,
    crash_at: str | None,
    abort: Callable[[], None] | None = None,
) -> FileEntry:
    from safepoint.snapshot import TensorFile  # loaded already: a save holds tensors

    # 0o666 and 0o777 (staging) go through the umask: a checkpoint gets the modes of any
    # new file and folder, and the rename keeps them (no private temp-file modes).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
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
                fd, content.tensors, content.metadata, on_chunk=on_chunk
            )
        else:
            write_all(fd, memoryview(content))
            hasher = new_hasher()
            hasher.update(content)
            size, digest = len(content), hasher.hexdigest()
        os.fsync(fd)
    finally:
        os.close(fd)
    return FileEntry(size, digest)


class Store:
    """Reads and writes the checkpoints of one output directory.

    Not thread-safe by itself: the engine serialises commits and deletions.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path_for(self, step: int) -> Path:
        return self.directory / f"checkpoint-{step}"

    def scan(self, *, deep: bool = False) -> list[CheckpointInfo]:
        return scan(self.directory, deep=deep)

    def sweep(self) -> list[Path]:
        """Remove folders left by crashed saves and deletions. Call only under the lock."""
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
    ) -> CheckpointInfo:
        """Write ``snapshot`` with the commit protocol; return the committed checkpoint.

        Raises ``SaveFailedError`` (with the OS error as cause) after removing the
        staging folder; existing checkpoints are untouched. ``abort`` is called between
        written chunks: whatever it raises abandons the save the same way.
        """
        target = self.path_for(snapshot.step)
        staging = self.directory / f"{STAGING_PREFIX}{target.name}-{secrets.token_hex(4)}"
        t0 = time.perf_counter()
        try:
            os.mkdir(staging, 0o777)
            files = {}
            for i, (name, content) in enumerate(snapshot.files.items()):
                files[name] = _write_file(
                    staging / name,
                    content,
                    crash_at="tensor_file" if i == 0 else None,
                    abort=abort,
                )
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
            )
            _write_file(staging / MANIFEST_NAME, manifest.to_json(), crash_at=None)
            crash_point("after_manifest")
            fsync_dir(staging)
            if not self._make_room_for(target):
                shutil.rmtree(staging)
                return inspect(target)
            os.replace(staging, target)
            crash_point("after_rename")
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(staging)
            if isinstance(e, OSError):
                raise SaveFailedError(_save_failed_message(target, e)) from e
            raise
        _fsync_committed(self.directory, target)
        return CheckpointInfo(target, snapshot.step, "valid", (), manifest, manifest.total_bytes)

    def adopt(self, staging: Path, step: int) -> CheckpointInfo:
        """Commit a staging folder whose files were written and fsynced elsewhere (a
        checkpoint downloaded from a remote mirror): steps 4 of the commit protocol."""
        target = self.path_for(step)
        fsync_dir(staging)
        if self._make_room_for(target):
            os.replace(staging, target)
            fsync_dir(self.directory)
        return inspect(target)

    def _make_room_for(self, target: Path) -> bool:
        """False if ``target`` already holds a valid checkpoint (keep it, skip the save).

        An invalid folder in the way is renamed aside, never deleted: it may be the only
        copy of something a person wants to look at."""
        if not os.path.lexists(target):
            return True
        existing = inspect(target)
        if existing.valid:
            log.info("%s already holds a valid checkpoint; keeping it", target)
            return False
        aside = target.with_name(f"{target.name}.{existing.status}-{int(time.time())}")
        os.replace(target, aside)
        log.warning(
            "moved %s %s aside to %s (%s); delete it when no longer needed",
            existing.status,
            target.name,
            aside.name,
            "; ".join(existing.problems),
        )
        return True

    def delete(self, info: CheckpointInfo, *, allow_foreign: bool = False) -> None:
        """Delete one checkpoint folder: atomically out of sight by a rename, then removed.

        Refuses anything that is not a ``checkpoint-N`` folder directly in this
        directory, and anything that is not a valid safepoint checkpoint unless
        ``allow_foreign`` (then foreign and incomplete folders too, never symlinks)."""
        path = info.path
        if (
            path.parent.resolve() != self.directory.resolve()
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
        fsync_dir(self.directory)
        crash_point("retention")
        shutil.rmtree(trash)


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
        hint = "free space, lower --keep-last, set --max-disk, or use another --output-dir"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the output directory writable or choose another --output-dir"
    else:
        hint = "check the disk; earlier checkpoints are intact"
    return f"saving {target} failed: {why}; the previous checkpoints are intact; {hint}"
