"""Remote mirrors through fsspec: upload each committed checkpoint, fetch one on resume.

Object stores have no atomic rename, so a remote checkpoint is committed the way the
local one is, minus the rename: every data file first, each verified present with its
recorded size, then ``safepoint.json`` last (a remote folder without it is not a
checkpoint), then the ``latest`` pointer beside the checkpoints moves to it. Deletion
goes the other way: the manifest first, so that a half-deleted folder is never taken for
a checkpoint.

Uploads run in one background thread, in commit order. A failed upload is retried with
exponential backoff and never raises into the training loop; when a newer checkpoint is
waiting, an older one that keeps failing is given up (the newer one supersedes it).
Every step of the mirror is an ``upload`` event in the run record, which is what
``safepoint ls`` reads to show local only / uploading / mirrored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safepoint.errors import (
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    RemoteUnavailableError,
)
from safepoint.format import dumps_json, loads_json, new_hasher, write_all
from safepoint.manifest import MANIFEST_NAME, Manifest
from safepoint.records import RunRecord, read_events
from safepoint.retention import Candidate, RetentionPolicy, plan
from safepoint.store import STAGING_PREFIX, CheckpointInfo, Store, checkpoint_step

log = logging.getLogger("safepoint")

LATEST_NAME = "latest"
"""The remote pointer file: JSON naming the newest fully uploaded checkpoint."""
UPLOAD_TIMEOUT_ENV = "SAFEPOINT_UPLOAD_TIMEOUT"
_DEFAULT_CLOSE_TIMEOUT = 600.0


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
        """Valid remote checkpoints, newest first; logs each newer one skipped."""
        for step in reversed(self.steps()):
            rc = self.check(step)
            if rc.valid:
                yield rc
            else:
                log.warning("remote %s/%s skipped: %s", self.url, rc.name, "; ".join(rc.problems))

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
        body = dumps_json({"checkpoint": f"checkpoint-{step}", "step": step, "t": time.time()})
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
        every file's checksum against the manifest. Raises ``CorruptCheckpointError``."""
        assert rc.manifest is not None
        staging = store.directory / f"{STAGING_PREFIX}{rc.name}-{secrets.token_hex(4)}"
        os.mkdir(staging)
        try:
            for name, entry in rc.manifest.files.items():
                size, digest = self._fetch(self.path(rc.name, name), staging / name)
                if (size, digest) != (entry.size, entry.checksum):
                    raise CorruptCheckpointError(
                        f"{self.url}/{rc.name}/{name}: downloaded {size} bytes with checksum "
                        f"{digest}, the manifest says {entry.size} bytes, {entry.checksum}"
                    )
            self._fetch(self.path(rc.name, MANIFEST_NAME), staging / MANIFEST_NAME)
            return store.adopt(staging, rc.step)
        finally:
            # Our own temporary folder, never a checkpoint: adopt() renamed it on success.
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch(self, src: str, dest: Path) -> tuple[int, str]:
        hasher = new_hasher()
        size = 0
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            with self.fs.open(src, "rb") as f:
                while chunk := f.read(8 << 20):
                    hasher.update(chunk)
                    write_all(fd, memoryview(chunk))
                    size += len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        return size, hasher.hexdigest()


@dataclass
class _Job:
    info: CheckpointInfo
    done: set[str]


class Mirror:
    """Background uploader of one output directory's checkpoints to ``url``.

    ``submit`` never blocks and never raises; ``close`` waits for the queue to drain
    (at most ``close_timeout`` seconds) and says what was left local only.
    """

    def __init__(
        self,
        url: str,
        store: Store,
        *,
        policy: RetentionPolicy | None = None,
        record: RunRecord | None = None,
        close_timeout: float | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.remote = RemoteDir(url)
        self.url = self.remote.url
        self.store = store
        self.policy = policy or RetentionPolicy()
        self.record = record or RunRecord(store.directory)
        env = os.environ.get(UPLOAD_TIMEOUT_ENV)
        self.close_timeout = (
            close_timeout if close_timeout is not None else float(env or _DEFAULT_CLOSE_TIMEOUT)
        )
        self.backoff = backoff
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closing = threading.Event()
        self._current: _Job | None = None
        self._thread = threading.Thread(target=self._run, name="safepoint-mirror", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------- training side

    def submit(self, info: CheckpointInfo) -> None:
        """Queue the committed local checkpoint ``info`` for upload."""
        self._event("queued", info)
        self._queue.put(_Job(info, set()))

    def resubmit_newest(self) -> None:
        """Queue the newest valid local checkpoint (a previous process may have died
        before mirroring it; the upload notices if the remote already has it)."""
        newest = next((i for i in reversed(self.store.scan()) if i.valid), None)
        if newest is not None:
            self.submit(newest)

    def fetch_if_empty(self) -> CheckpointInfo | None:
        """``fetch`` when the local directory holds no valid checkpoint (a fresh machine)."""
        return self.fetch() if is_empty(self.store) else None

    def fetch(self) -> CheckpointInfo | None:
        """Download the newest valid remote checkpoint into the (empty) local directory.

        Tries older remote checkpoints when a newer one fails its checksums. Returns the
        local checkpoint, or None when the remote has none. Raises
        ``RemoteUnavailableError`` when the remote cannot be listed.
        """
        try:
            candidates = list(self.remote.newest_first())
        except Exception as e:  # network, credentials: any backend error
            # Starting from scratch here would silently throw away the run's progress.
            raise RemoteUnavailableError(
                f"the local directory {self.store.directory} has no checkpoint and the remote "
                f"{self.url} cannot be read ({_short(e)}); fix the network or credentials and "
                "rerun, or run without the remote to start from scratch"
            ) from e
        for rc in candidates:
            t0 = time.perf_counter()
            try:
                info = self.remote.download(rc, self.store)
            except CorruptCheckpointError as e:
                log.warning(
                    "remote %s/%s is damaged, trying an older one: %s", self.url, rc.name, e
                )
                continue
            self.record.event(
                "download",
                step=rc.step,
                checkpoint=rc.name,
                remote=self.url,
                seconds=round(time.perf_counter() - t0, 3),
                bytes=info.size,
            )
            log.warning("downloaded %s from %s (checksums verified)", rc.name, self.url)
            return info
        return None

    def close(self, timeout: float | None = None) -> bool:
        """Wait for queued uploads to finish; True if all did. Never raises."""
        timeout = self.close_timeout if timeout is None else timeout
        self._queue.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        self._closing.set()  # stop retrying; the thread is a daemon and dies with us
        pending = [j.info.name for j in ([self._current] if self._current else [])]
        pending += [j.info.name for j in list(self._queue.queue) if j is not None]
        log.warning(
            "uploads to %s did not finish within %.0f s; %s stay local only (intact on "
            "disk). Rerunning the same command uploads the newest one first.",
            self.url,
            timeout,
            ", ".join(pending) or "the last checkpoint",
        )
        self.record.event("upload_timeout", remote=self.url, pending=pending, timeout_s=timeout)
        return False

    # ---------------------------------------------------------------------- uploader

    def _event(self, state: str, info: CheckpointInfo, **fields: Any) -> None:
        self.record.event(
            "upload", state=state, step=info.step, checkpoint=info.name, remote=self.url, **fields
        )

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            self._current = job
            self._upload_with_retries(job)
            self._current = None

    def _upload_with_retries(self, job: _Job) -> None:
        attempt = 0
        while not self._closing.is_set():
            if not job.info.path.is_dir():
                self._event("skipped", job.info, why="deleted locally before its upload")
                return
            t0 = time.perf_counter()
            self._event("started", job.info, attempt=attempt + 1)
            try:
                self.remote.upload(job.info, job.done)
            except Exception as e:  # any backend error: retry, never reach training
                attempt += 1
                delay = min(self.backoff[0] * 2 ** (attempt - 1), self.backoff[1])
                self._event("retry", job.info, attempt=attempt, error=_short(e), delay_s=delay)
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "upload of %s to %s failed (%s); retrying in %.1f s, training goes on",
                        job.info.name,
                        self.url,
                        _short(e),
                        delay,
                    )
                if any(j is not None for j in list(self._queue.queue)):
                    self._event("skipped", job.info, why="superseded by a newer checkpoint")
                    return
                self._closing.wait(delay)
                continue
            self._event("mirrored", job.info, seconds=round(time.perf_counter() - t0, 3))
            self._prune()
            return

    def _prune(self) -> None:
        """Apply the retention policy to the remote; errors are logged, never raised."""
        try:
            checks = [self.remote.check(s) for s in self.remote.steps()]
            pointer = self.remote.latest_step()
            valid = [rc for rc in checks if rc.valid]
            decision = plan(
                [Candidate(rc.step, rc.manifest.total_bytes, rc.manifest.metrics) for rc in valid],  # type: ignore[union-attr]
                self.policy,
            )
            newest = max((rc.step for rc in valid), default=None)
            doomed = [s for s in decision.delete if s != pointer]
            # Folders without a manifest older than the newest are interrupted uploads.
            doomed += [
                rc.step for rc in checks if rc.manifest is None and newest and rc.step < newest
            ]
            for step in doomed:
                self.remote.delete(step)
                self.record.event("remote_delete", step=step, checkpoint=f"checkpoint-{step}")
        except Exception as e:
            log.warning(
                "remote retention on %s failed (%s); will retry after the next upload",
                self.url,
                _short(e),
            )


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:300]


def upload_states(directory: str | os.PathLike[str]) -> dict[str, str]:
    """For ``safepoint ls``: checkpoint name -> "mirrored", "uploading" or "local only",
    from the run record; empty when the run never had a remote."""
    states: dict[str, str] = {}
    for ev in read_events(directory):
        if ev["event"] in ("start", "upload_timeout"):
            # The process that was uploading has ended: what it had not finished never will.
            states = {k: "local only" if v == "uploading" else v for k, v in states.items()}
            continue
        name = ev.get("checkpoint")
        if not isinstance(name, str):
            continue
        if ev["event"] == "upload":
            state = ev.get("state")
            if state == "mirrored":
                states[name] = "mirrored"
            elif state == "skipped":
                states[name] = "local only"
            else:
                states[name] = "uploading"
        elif ev["event"] == "remote_delete" and name in states:
            states[name] = "local only"
        elif ev["event"] == "download":
            states[name] = "mirrored"
    return states


def mirror_for(url: str, store: Store, **kwargs: Any) -> Mirror:
    """A ``Mirror`` of ``store`` to ``url``; raises ``ConfigError`` for a bad URL."""
    if "://" not in url and not url.startswith("/"):
        raise ConfigError(
            f"remote={url!r} is not a URL; use e.g. s3://bucket/runs/exp1 or file:///mnt/backup"
        )
    return Mirror(url, store, **kwargs)


def is_empty(store: Store) -> bool:
    """True when the local directory holds no valid checkpoint (a fresh machine)."""
    return not any(i.valid for i in store.scan())
