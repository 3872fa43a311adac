"""One remote run directory through fsspec: list, check, upload, download, delete."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from safepoint.errors import ConfigError, CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.fileio import dumps_json, loads_json, new_hasher, write_all
from safepoint.manifest import MANIFEST_NAME, Manifest
from safepoint.validity import STAGING_PREFIX, CheckpointInfo, checkpoint_step

if TYPE_CHECKING:
    from safepoint.store import Store

# Object stores have no atomic rename, so a remote checkpoint is committed the way the
# local one is, minus the rename: every data file first, each verified present with its
# recorded size, then ``safepoint.json`` last (a remote folder without it is not a
# checkpoint), then the ``latest`` pointer beside the checkpoints moves to it. Deletion
# goes the other way: the manifest first, so that a half-deleted folder is never taken
# for a checkpoint.

log = logging.getLogger("safepoint")

LATEST_NAME = "latest"
"""The remote pointer file: JSON naming the newest fully uploaded checkpoint."""

FETCH_TRIES = 3
"""Tries of each remote read (a listing, one file of a download) that fails with a 5xx,
a timeout or a reset, before the download falls back to an older remote checkpoint.
s3fs leaves a 5xx to botocore, which already retries it 4 times within one read (about
7 s, measured through a proxy answering 500); these tries come on top for a failure
that outlasts that, and are all the retrying a backend without its own gets."""

FETCH_BACKOFF_S = (0.5, 4.0)
"""The pause before the second try, doubled for each next one up to the second value:
with ``FETCH_TRIES`` = 3 at most 1.5 s of pauses per file."""

_TRANSIENT_ERRNOS = {
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs's translation of a 500
    errno.EBUSY,  # s3fs's translation of a 503 SlowDown
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
}
# Backend exceptions that are not OSErrors, by name: botocore's and aiohttp's transport
# errors (importing them would tie this module to one backend).
_TRANSIENT_NAMES = {
    "HTTPClientError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "IncompleteRead",
    "ResponseParserError",
    "ClientPayloadError",
    "ClientConnectionError",
    "ServerDisconnectedError",
}

T = TypeVar("T")


def is_transient(e: BaseException) -> bool:
    """True for a remote failure worth another try: an HTTP 5xx, a timeout, a reset."""
    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (TimeoutError, ConnectionError)):
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        status = getattr(err, "status", None) or getattr(err, "status_code", None)
        response = getattr(err, "response", None)
        if status is None and isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int) and 500 <= status < 600:
            return True
        if any(t.__name__ in _TRANSIENT_NAMES for t in type(err).__mro__):
            return True
        err = err.__cause__ or err.__context__
    return False


def with_retries(what: str, attempt: Callable[[], T]) -> T:
    """``attempt()``, tried up to ``FETCH_TRIES`` times while it fails transiently, with
    exponential backoff; the last failure, or any other one, is raised as is."""
    for n in range(1, FETCH_TRIES + 1):
        try:
            return attempt()
        except Exception as e:
            if n == FETCH_TRIES or not is_transient(e):
                raise
            delay = min(FETCH_BACKOFF_S[0] * 2 ** (n - 1), FETCH_BACKOFF_S[1])
            log.warning(
                "%s failed (%s); try %d of %d in %.1f s",
                what,
                str(e).splitlines()[0] if str(e) else type(e).__name__,
                n + 1,
                FETCH_TRIES,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _open(url: str) -> tuple[Any, str]:
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise ConfigError(
            f"remote={url!r} needs fsspec: pip install 'safepoint[remote]' (and s3fs for s3://)"
        ) from None
    try:
        return url_to_fs(url, skip_instance_cache=True)  # credentials may change per run
    except (ImportError, ValueError) as e:
        raise ConfigError(
            f"cannot open the remote {url!r} ({e}); install the fsspec backend for its "
            "scheme (s3fs for s3://, gcsfs for gs://) or fix the URL"
        ) from e


@dataclass(frozen=True)
class RemoteCheckpoint:
    """One ``checkpoint-N`` folder of the remote and whether it is complete."""

    step: int
    manifest: Manifest | None
    problems: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.manifest is not None and not self.problems

    @property
    def name(self) -> str:
        return f"checkpoint-{self.step}"


class RemoteDir:
    """Synchronous operations on one remote run directory (an fsspec URL)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = _open(self.url)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _refresh(self) -> None:
        # s3fs caches listings; a stale one would hide or resurrect files.
        with contextlib.suppress(AttributeError):
            self.fs.invalidate_cache()

    def steps(self) -> list[int]:
        """Steps of the ``checkpoint-N`` folders on the remote, ascending."""
        self._refresh()
        try:
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        steps = {checkpoint_step(str(n).rstrip("/").rsplit("/", 1)[-1]) for n in names}
        return sorted(s for s in steps if s is not None)

    def _sizes(self, step: int) -> dict[str, int]:
        entries = self.fs.ls(self.path(f"checkpoint-{step}"), detail=True)
        return {
            str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries
            if e.get("type") == "file"
        }

    def check(self, step: int) -> RemoteCheckpoint:
        """Shallow check: the manifest parses and every listed file has its size."""
        where = f"{self.url}/checkpoint-{step}/{MANIFEST_NAME}"
        try:
            sizes = self._sizes(step)
            if MANIFEST_NAME not in sizes:
                return RemoteCheckpoint(step, None, ("no safepoint.json: never committed",))
            manifest = Manifest.from_json(
                self.fs.cat_file(self.path(f"checkpoint-{step}", MANIFEST_NAME)), where=where
            )
        except (CorruptCheckpointError, IncompatibleCheckpointError) as e:
            return RemoteCheckpoint(step, None, (str(e),))
        except FileNotFoundError:
            return RemoteCheckpoint(step, None, ("vanished while being read",))
        problems = tuple(
            f"{name}: size expected {entry.size}, found {sizes.get(name, 'missing')}"
            for name, entry in manifest.files.items()
            if sizes.get(name) != entry.size
        )
        if manifest.step != step:
            problems += (f"manifest says step {manifest.step}",)
        return RemoteCheckpoint(step, manifest, problems)

    def newest_first(self) -> Iterator[RemoteCheckpoint]:
        """Valid remote checkpoints of the run's current line, newest first; logs each
        newer one skipped. A checkpoint newer than the ``latest`` pointer is taken only
        if its manifests' parents lead back to the pointer's checkpoint: one left by a
        line of the run that a resume from an earlier step replaced is not."""
        pointer = self.latest_step()
        for step in reversed(self.steps()):
            rc = self.check(step)
            if not rc.valid:
                log.warning("remote %s/%s skipped: %s", self.url, rc.name, "; ".join(rc.problems))
            elif pointer is not None and step > pointer and not self._descends(rc, pointer):
                log.warning(
                    "remote %s/%s skipped: another line of the run (it does not descend from "
                    "checkpoint-%d, the remote's latest)",
                    self.url,
                    rc.name,
                    pointer,
                )
            else:
                yield rc

    def _descends(self, rc: RemoteCheckpoint, ancestor: int) -> bool:
        """Whether the parents recorded from ``rc`` back lead to the valid remote
        ``checkpoint-<ancestor>`` with the very manifest it has now."""
        manifest = rc.manifest
        while manifest is not None and manifest.parent is not None:
            parent = manifest.parent
            if parent.step < ancestor:
                return False
            found = self.check(parent.step)
            if found.manifest is None or found.manifest.digest != parent.manifest:
                return False
            if parent.step == ancestor:
                return found.valid
            manifest = found.manifest
        return False

    def latest_step(self) -> int | None:
        """The step the ``latest`` pointer names, or None."""
        try:
            doc = loads_json(self.fs.cat_file(self.path(LATEST_NAME)), where=LATEST_NAME)
        except (FileNotFoundError, CorruptCheckpointError):
            return None
        step = doc.get("step") if isinstance(doc, dict) else None
        return step if isinstance(step, int) else None

    # ---------------------------------------------------------------------- upload

    def upload(self, info: CheckpointInfo, done: set[str]) -> None:
        """Mirror the local checkpoint ``info``; ``done`` holds files already verified
        by an earlier attempt of this same upload (they are not sent again)."""
        assert info.manifest is not None
        local_manifest = (info.path / MANIFEST_NAME).read_bytes()
        rdir = self.path(info.name)
        rmanifest = self.path(info.name, MANIFEST_NAME)
        if not done:
            self._refresh()
            if self.fs.exists(rmanifest):
                if self.fs.cat_file(rmanifest) == local_manifest and self.check(info.step).valid:
                    self._point_to(info.step)
                    return
                self.fs.rm_file(rmanifest)  # another save of this step: uncommit it first
        self.fs.makedirs(rdir, exist_ok=True)  # needed by file://, a no-op on object stores
        for name, entry in sorted(info.manifest.files.items()):
            if name in done:
                continue
            self.fs.put_file(str(info.path / name), f"{rdir}/{name}")
            self._verify_size(f"{rdir}/{name}", entry.size)
            done.add(name)
        self.fs.pipe_file(rmanifest, local_manifest)
        self._verify_size(rmanifest, len(local_manifest))
        self._point_to(info.step)

    def _verify_size(self, path: str, size: int) -> None:
        self._refresh()
        found = self.fs.info(path).get("size")
        if found != size:
            raise OSError(f"{path}: uploaded {found} bytes, expected {size}")

    def _point_to(self, step: int) -> None:
        body = dumps_json(
            {"checkpoint": f"checkpoint-{step}", "step": step, "t": time.time()}, indent=1
        )
        self.fs.pipe_file(self.path(LATEST_NAME), body)

    def delete(self, step: int) -> None:
        """Remove one remote checkpoint, manifest first."""
        rdir = self.path(f"checkpoint-{step}")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{rdir}/{MANIFEST_NAME}")
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(rdir, recursive=True)

    # -------------------------------------------------------------------- download

    def download(self, rc: RemoteCheckpoint, store: Store) -> CheckpointInfo:
        """Copy the remote checkpoint into ``store`` through a staging folder, checking
        every file's checksum against the manifest. Raises ``CorruptCheckpointError``,
        or the backend's error when a read still fails after ``FETCH_TRIES``."""
        assert rc.manifest is not None
        staging = store.directory / f"{STAGING_PREFIX}{rc.name}-{secrets.token_hex(4)}"
        os.mkdir(staging)
        try:
            for name, entry in rc.manifest.files.items():
                where = f"{self.url}/{rc.name}/{name}"
                size, digest = self._fetch(self.path(rc.name, name), staging / name, where)
                if (size, digest) != (entry.size, entry.checksum):
                    raise CorruptCheckpointError(
                        f"{where}: downloaded {size} bytes with checksum "
                        f"{digest}, the manifest says {entry.size} bytes, {entry.checksum}"
                    )
            manifest = self.path(rc.name, MANIFEST_NAME)
            self._fetch(manifest, staging / MANIFEST_NAME, f"{self.url}/{rc.name}/{MANIFEST_NAME}")
            return store.adopt(staging, rc.step)
        finally:
            # Our own temporary folder, never a checkpoint: adopt() renamed it on success.
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch(self, src: str, dest: Path, where: str) -> tuple[int, str]:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:

            def attempt() -> tuple[int, str]:
                os.ftruncate(fd, 0)  # a retry starts the file over
                os.lseek(fd, 0, os.SEEK_SET)
                hasher = new_hasher()
                size = 0
                with self.fs.open(src, "rb") as f:
                    while chunk := f.read(8 << 20):
                        hasher.update(chunk)
                        write_all(fd, memoryview(chunk))
                        size += len(chunk)
                return size, hasher.hexdigest()

            size, digest = with_retries(f"reading {where}", attempt)
            os.fsync(fd)
        finally:
            os.close(fd)
        return size, digest
