"""The remote replica: a background thread mirrors each committed checkpoint to a URL.

A remote checkpoint is committed and deleted in the order ``safepoint.remote_dir`` keeps
(manifest last on upload, first on deletion); this module decides when and what.

Uploads run in one background thread, in commit order. A failed upload is retried with
exponential backoff and never raises into the training loop; when a newer checkpoint is
waiting, an older one that keeps failing is given up (the newer one supersedes it).
Every step of the mirror is an ``upload`` event in the run record, which is what
``safepoint ls`` reads to show local only / uploading / mirrored.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from safepoint.errors import ConfigError, CorruptCheckpointError, RemoteUnavailableError
from safepoint.records import RunRecord, read_events
from safepoint.remote_dir import RemoteDir, with_retries
from safepoint.retention import Candidate, RetentionPolicy, plan
from safepoint.store import Store
from safepoint.validity import CheckpointInfo

log = logging.getLogger("safepoint")

UPLOAD_TIMEOUT_ENV = "SAFEPOINT_UPLOAD_TIMEOUT"
_DEFAULT_CLOSE_TIMEOUT = 600.0


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

        Each read is retried (``remote_dir.FETCH_TRIES``) when it fails with a 5xx, a
        timeout or a reset; a checkpoint that fails its checksums or cannot be read even
        so gives way to the next older one, saying which and why. Returns the local
        checkpoint, or None when the remote has none. Raises ``RemoteUnavailableError``
        when the remote cannot be listed, or when checkpoints it holds could not be read
        (starting over would throw the run's progress away).
        """
        try:
            candidates = with_retries(
                f"listing {self.url}", lambda: list(self.remote.newest_first())
            )
        except Exception as e:  # network, credentials: any backend error
            # Starting from scratch here would silently throw away the run's progress.
            raise RemoteUnavailableError(
                f"the local directory {self.store.directory} has no checkpoint and the remote "
                f"{self.url} cannot be read ({_short(e)}); fix the network or credentials and "
                "rerun, or run without the remote to start from scratch"
            ) from e
        unread: list[str] = []
        for rc in candidates:
            t0 = time.perf_counter()
            try:
                info = self.remote.download(rc, self.store)
            except CorruptCheckpointError as e:
                log.warning(
                    "remote %s/%s is damaged, trying an older one: %s", self.url, rc.name, e
                )
                continue
            except Exception as e:  # the backend's, after the retries
                unread.append(f"{rc.name}: {_short(e)}")
                self.record.event(
                    "download_failed", step=rc.step, checkpoint=rc.name, remote=self.url,
                    error=_short(e),
                )  # fmt: skip
                log.warning(
                    "remote %s/%s could not be downloaded (%s, after retries); trying an older one",
                    self.url,
                    rc.name,
                    _short(e),
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
        if unread:
            older = f"; and {len(unread) - 1} older" if len(unread) > 1 else ""
            raise RemoteUnavailableError(
                f"the local directory {self.store.directory} has no checkpoint and no "
                f"checkpoint of the remote {self.url} could be downloaded ({unread[0]}{older}); "
                "rerun when the remote answers again, or run without the remote to start "
                "from scratch"
            )
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
