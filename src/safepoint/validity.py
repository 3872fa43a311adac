"""The validity oracle: what each folder of an output directory is (inspect, scan, verify)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from safepoint.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from safepoint.fileio import hash_file, read_regular
from safepoint.manifest import MANIFEST_NAME, FileEntry, Manifest

log = logging.getLogger("safepoint")

CHECKPOINT_RE = re.compile(r"checkpoint-(\d{1,18})")
STAGING_PREFIX = ".staging-"
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
    def thin(self) -> bool:
        """A thin checkpoint (``Manifest.thin``): valid, verified whole, exported and
        reported from, never resumed from."""
        return self.manifest is not None and self.manifest.is_thin

    @property
    def resumable(self) -> bool:
        """Valid and full: what resume may pick."""
        return self.valid and not self.thin

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.manifest.metrics) if self.manifest else {}

    @property
    def created(self) -> float | None:
        return self.manifest.created if self.manifest else None


ASIDE_RE = re.compile(r"checkpoint-(\d{1,18})\.([a-z]+)-([0-9A-Za-z-]{1,40})")


@dataclass(frozen=True)
class Aside:
    """A folder set aside by the store (``checkpoint-N.<why>-<time>``): never resumed
    from, kept or deleted by safepoint; ``ls`` lists it so that a person can."""

    path: Path
    step: int
    why: str  # superseded (another line of the run), corrupt, incomplete, foreign


def aside_name(path: Path, why: str) -> Path:
    """A free name for setting ``path`` (``checkpoint-N``) aside because of ``why``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for n in range(1, 1000):
        aside = path.with_name(f"{path.name}.{why}-{stamp}" + (f"-{n}" if n > 1 else ""))
        if not os.path.lexists(aside):
            return aside
    raise FileExistsError(f"no free name to set {path} aside")


def aside_folders(directory: str | os.PathLike[str]) -> list[Aside]:
    """The folders set aside in ``directory``, oldest step first."""
    found = []
    for name in os.listdir(directory):
        m = ASIDE_RE.fullmatch(name)
        if m and (path := Path(directory) / name).is_dir() and not path.is_symlink():
            found.append(Aside(path, int(m.group(1)), m.group(2)))
    return sorted(found, key=lambda a: (a.step, a.path.name))


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
        mst = mpath.lstat()
    except FileNotFoundError:
        if (path / "trainer_state.json").exists():
            return bad("foreign", "written by another tool (no safepoint.json)")
        return bad("incomplete", "no safepoint.json: never committed")
    # A manifest parsed before and unchanged since (same inode, size, mtime and ctime,
    # as for _checked below) is not read again by a shallow check: retention inspects
    # every kept checkpoint after each save.
    mkey = _manifest_key(mpath, mst)
    manifest = None if deep or not stat.S_ISREG(mst.st_mode) else _manifests.get(mkey)
    if manifest is None:
        try:
            manifest = Manifest.from_json(
                bytes(read_regular(mpath, max_size=_MAX_MANIFEST_BYTES)), where=str(mpath)
            )
        except IncompatibleCheckpointError as e:
            return bad("foreign", str(e))
        except (CorruptCheckpointError, OSError) as e:
            return bad("corrupt", str(e))
        _remember(_manifests, mkey, manifest)
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


def _manifest_key(mpath: Path, mst: os.stat_result) -> tuple[object, ...]:
    return (str(mpath), mst.st_dev, mst.st_ino, mst.st_size, mst.st_mtime_ns, mst.st_ctime_ns)


_manifests: dict[tuple[object, ...], Manifest] = {}
_CACHE_ENTRIES = 1024


def _remember(cache: dict[tuple[object, ...], Any], key: tuple[object, ...], value: Any) -> None:
    """``cache[key] = value``, emptied first once it holds ``_CACHE_ENTRIES``: the caches
    of file identities (``_manifests``, ``_checked``) must stay bounded in a process that
    inspects many folders (a long run, ``ls`` of a big tree)."""
    if len(cache) >= _CACHE_ENTRIES:
        cache.clear()
    cache[key] = value


_STATE_FILES = ("state.json", "trainer_state.json", "shards.json")
_checked: dict[tuple[object, ...], bool] = {}
"""State files that passed ``_check_state`` as they were then: (path, then per listed
state file its manifest entry and its inode, size, mtime and ctime). Retention inspects
every kept checkpoint after each save, and parsing a long run's ``trainer_state.json``
under the hostile-input checks took most of a LoRA save's time (6 ms per checkpoint at
200 steps, growing with the log history). A file changed in any way gets a new ctime,
one clock tick (a few ms) later at most; ``verify`` (deep) always parses and re-hashes."""


def _state_key(path: Path, manifest: Manifest) -> tuple[object, ...] | None:
    key: list[object] = [str(path)]
    for name in _STATE_FILES:
        entry = manifest.files.get(name)
        if entry is None:
            continue
        try:
            st = os.lstat(path / name)
        except OSError:
            return None
        key += [name, entry.size, entry.checksum, st.st_dev, st.st_ino, st.st_size]
        key += [st.st_mtime_ns, st.st_ctime_ns]
    return tuple(key)


def _check_state(path: Path, manifest: Manifest, *, deep: bool) -> list[str]:
    """``_parse_state``'s problems; a shallow check of unchanged files that passed
    before is not parsed again."""
    key = _state_key(path, manifest)
    if not deep and key is not None and key in _checked:
        return []
    problems = _parse_state(path, manifest, deep=deep)
    if not problems and key is not None:
        _remember(_checked, key, True)
    return problems


def note_written(path: Path, manifest: Manifest) -> None:
    """``path`` was just committed by this process from state files it made itself: they
    are as ``_parse_state`` would pass them, so the shallow check skips parsing them (1-3
    ms of every save's retention scan, on the writer thread holding the GIL), and its
    manifest is not read back either (0.2 ms)."""
    key = _state_key(path, manifest)
    if key is not None:
        _remember(_checked, key, True)
    with contextlib.suppress(OSError):  # gone already: nothing to remember
        mpath = path / MANIFEST_NAME
        _remember(_manifests, _manifest_key(mpath, mpath.lstat()), manifest)


def _parse_state(path: Path, manifest: Manifest, *, deep: bool) -> list[str]:
    """Problems of ``state.json``: listed, readable, and valid against its schema, so
    that a checkpoint resume would fail on is ``corrupt`` in ``ls`` already. A thin
    checkpoint has none, by design: only its ``trainer_state.json`` is checked."""
    from safepoint.schema import STATE_NAME, parse_state

    if manifest.thin is not None:
        return _check_trainer_state(path, manifest, deep=deep)
    entry = manifest.files.get(STATE_NAME)
    if entry is None:
        return [f"{STATE_NAME} is not listed in the manifest: nothing to restore from"]
    if entry.size > _MAX_MANIFEST_BYTES:
        return [f"{STATE_NAME}: {entry.size} bytes, more than a state file has"]
    try:
        data = read_regular(
            path / STATE_NAME, size=entry.size, checksum=entry.checksum if deep else None
        )
        doc = parse_state(bytes(data), files=manifest.files, where=STATE_NAME)
        if any(e.get("sharded") for e in doc["entries"].values()):
            _check_index(path, manifest, deep=deep)
    except (CorruptCheckpointError, IncompatibleCheckpointError) as e:
        return [str(e)]
    return _check_trainer_state(path, manifest, deep=deep)


def _check_index(path: Path, manifest: Manifest, *, deep: bool) -> None:
    """The shard index of a sharded checkpoint: listed, and its pieces tile each tensor
    inside listed files (``CorruptCheckpointError``)."""
    from safepoint.sharding import SHARDS_NAME, parse_index

    entry = manifest.files[SHARDS_NAME]  # parse_state checked it is listed
    if entry.size > _MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"{SHARDS_NAME}: {entry.size} bytes, more than an index has")
    data = read_regular(
        path / SHARDS_NAME, size=entry.size, checksum=entry.checksum if deep else None
    )
    parse_index(bytes(data), files=manifest.files, where=SHARDS_NAME)


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
            if e.is_symlink():
                rel = os.path.relpath(e.path, path)
                problems.append(f"{rel} is a symlink; a checkpoint holds only real files")
            elif e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            elif not e.is_file(follow_symlinks=False):
                rel = os.path.relpath(e.path, path)
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
    """The newest valid full checkpoint of ``directory`` (the one a run resumes from), or
    None. Logs each newer one skipped; thin ones are not candidates."""
    for info in newest_first(directory, deep=deep):
        return info.path
    return None


def newest_first(
    directory: str | os.PathLike[str], *, deep: bool = True
) -> Iterator[CheckpointInfo]:
    """Yield resumable checkpoints newest first, logging why each newer folder was
    skipped. A thin checkpoint is not a candidate (not damage): passed over silently."""
    if not Path(directory).is_dir():
        return
    for info in reversed(scan(directory)):
        if info.status == "staging" or info.thin:
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
