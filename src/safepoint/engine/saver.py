"""How a save happens: commit (in line or in the background), retry on a full disk,
retention, the hand-off to the replica. Returns a ``PendingSave`` for every save.

Only this module's ``Saver`` touches the store for writing, and only one thread at a
time: a save in flight finishes before the next one, a prune or a close starts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safepoint.disk import is_recoverable
from safepoint.engine.preflight import Preflight
from safepoint.engine.retain import Retention
from safepoint.errors import SaveFailedError
from safepoint.lock import RunLock
from safepoint.manifest import Parent, library_versions
from safepoint.options import Options
from safepoint.records import RunRecord
from safepoint.snapshot import Snapshot
from safepoint.store import Store
from safepoint.units import format_size
from safepoint.validity import CheckpointInfo, checkpoint_step
from safepoint.writer import AsyncSaver, as_save_failed

if TYPE_CHECKING:
    from safepoint.engine.replica import Replica

log = logging.getLogger("safepoint")


@dataclass
class PendingSave:
    """The handle of one save: ``wait()`` returns its committed checkpoint or raises.

    In-line saves are done when returned. A background save's failure is raised by
    ``wait()``; if nobody waits for it, the next ``step()`` (or ``close()``) raises it,
    once, as ``on_save_error`` says.
    """

    step: int
    path: Path
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    stall_s: float = 0.0
    """How long training was blocked by this save (the host copy, for a background one)."""
    _info: CheckpointInfo | None = None
    _job: Any = None  # writer.PendingSave of a background save
    _observed: list[bool] = field(default_factory=lambda: [False])

    @property
    def done(self) -> bool:
        return self._job is None or self._job.done.is_set()

    @property
    def failed(self) -> bool:
        """True once the save has failed (``wait()`` raises why)."""
        return self._job is not None and self._job.failed

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block until the save has finished, well or not (True), or ``timeout`` passed;
        raises nothing: a failure still surfaces through ``wait()`` or the next step."""
        return self._job is None or self._job.wait(timeout)

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        """The committed checkpoint; raises ``SaveFailedError`` if the save failed, or
        ``TimeoutError`` if it is still being written after ``timeout`` seconds."""
        if self._job is not None:
            if not self._job.wait(timeout):
                raise TimeoutError(f"checkpoint-{self.step} is still being written")
            if self._job.error is not None:
                self._observed[0] = True
                raise as_save_failed(self._job, self.path.parent)
            self._info = self._job.result
        assert self._info is not None
        return self._info


class Saver:
    """Commits snapshots into ``store`` and applies retention; rank 0 only."""

    def __init__(
        self,
        store: Store,
        record: RunRecord,
        lock: RunLock,
        options: Options,
        preflight: Preflight,
    ) -> None:
        self.store = store
        self.record = record
        self.lock = lock
        self.options = options
        self.retention = Retention(store, record, options)
        self.preflight = preflight
        self.replica: Replica | None = None
        self.background = (
            AsyncSaver(
                store.directory, record, on_busy=options.on_busy, copy_free=options.copy_free
            )
            if (options.async_save)
            else None
        )
        self._last: PendingSave | None = None
        self._tip: Parent | None = None  # the checkpoint the next commit descends from
        self._later_than: int | None = None  # resumed from an older step: set aside first
        self.last_commit_s: float | None = None
        """How long the last commit took, start to end (the emergency grace check)."""

    # ------------------------------------------------------------------ commit

    def resumed_from(self, info: CheckpointInfo, *, writer: bool = True) -> None:
        """The run continues from ``info``: its next commit descends from it, and sets
        aside every later folder first (another line of the run: ``Store.set_aside_later_than``).
        Only the ``writer`` (rank 0) touches the store."""
        if not writer:
            return
        self.written()
        assert info.manifest is not None
        self._tip = Parent(info.step, info.manifest.digest)
        # Names only: whether any later folder exists (set_aside_later_than checks them).
        steps = (checkpoint_step(n) for n in os.listdir(self.store.directory))
        later = any(s is not None and s > info.step for s in steps)
        self._later_than = info.step if later else None

    def commit(
        self, snapshot: Snapshot, *, started: float, urgent: bool = False, writer: bool = True
    ) -> PendingSave:
        """Commit ``snapshot`` (its ``reason``, ``metrics`` set), then prune.

        In line, or in the background with ``async_save`` (``urgent``: always in line,
        for emergency saves; in line too when host memory is short). Raises
        ``SaveFailedError`` for an in-line save that failed. Not the ``writer`` (a rank
        other than 0): the handle of what rank 0 commits.
        """
        self.go()
        path = self.store.path_for(snapshot.step)
        handle = PendingSave(snapshot.step, path, snapshot.reason, dict(snapshot.metrics))
        bg = self.background
        if not writer:
            handle._info = CheckpointInfo(path, snapshot.step, "valid")
        elif bg is None:
            handle._info = self.commit_now(snapshot, started, mode="sync")
        else:
            self._raise_unobserved()
            waited = bg.wait_idle(snapshot.step)  # one thread touches the store at a time
            if urgent:
                try:
                    bg.raise_failure()
                except SaveFailedError as e:
                    log.error("%s", e)
            else:
                self._raise_unobserved()
            if urgent or not bg.fits(snapshot):
                mode = "sync" if urgent else "inline"
                handle._info = self.commit_now(snapshot, started, mode=mode)
            else:
                handle._job = self._start(bg, snapshot, started, waited)
        handle.stall_s = time.perf_counter() - started
        self._last = handle
        return handle

    def _start(self, bg: AsyncSaver, snapshot: Snapshot, started: float, waited: float) -> Any:
        t_copy = time.perf_counter()
        timing: dict[str, float] = {"wait_s": round(waited, 6)}

        def job(copy: Snapshot, abort: Callable[[], None]) -> CheckpointInfo:
            return self.commit_now(copy, started, mode="async", abort=abort, timing=timing)

        bg.start(snapshot, job)  # held until go()
        now = time.perf_counter()
        timing |= {"snapshot_s": round(now - t_copy, 6), "stall_s": round(now - started, 6)}
        return bg.writer.pending

    def go(self) -> None:
        """Hand the background save just started to the writer thread: the save call
        does this as it returns (``BackgroundWriter.submit``, ``held``); any wait for
        the save does it too."""
        if self.background is not None:
            self.background.writer.release()

    def commit_now(
        self,
        snapshot: Snapshot,
        started: float,
        *,
        mode: str,
        abort: Callable[[], None] | None = None,
        timing: dict[str, float] | None = None,
        store_commit: Callable[..., CheckpointInfo] | None = None,
    ) -> CheckpointInfo:
        """The commit itself, in the training thread or on the writer thread (async);
        ``timing`` (async) was measured in the training thread when the save started;
        ``store_commit`` replaces ``store.commit`` (a sharded save: no retry)."""
        self.retention.settle()  # the last save's deletions: their space is free first
        try:
            snapshot.resolve()  # its deferred files are encoded here, on this thread
            self.lock.check()  # safepoint.lock deleted under us: still the only writer?
            if self._later_than is not None:  # the first commit after a rollback
                self.store.set_aside_later_than(self._later_than)
                self._later_than = None
            info = self._store_commit(
                snapshot,
                store_commit=store_commit,
                versions=library_versions(),
                info={
                    "bytes": snapshot.nbytes,
                    "mode": mode,
                    **(timing or {}),
                    "policy": self.options.to_json(),
                },
                abort=abort,
                parent=self._tip,
            )
        except Exception as e:
            self.record.event("save", step=snapshot.step, reason=snapshot.reason, result="failed")
            self.record.event("error", where="save", step=snapshot.step, error=str(e))
            raise
        finally:
            if snapshot.fence is not None:  # copy-free: committed or failed, retries done
                snapshot.fence.release()
        done = time.perf_counter() - started
        stall = timing["stall_s"] if timing else done
        write_s = info.manifest.info.get("write_s") if info.manifest else None
        log.info("saved %s (%s, %s) in %.2f s", info.path.name, snapshot.reason, mode, done)
        self.record.event(
            "save",
            step=info.step,
            reason=snapshot.reason,
            mode=mode,
            stall_s=round(stall, 6),
            **{k: v for k, v in (timing or {}).items() if k != "stall_s"},
            write_s=write_s,
            commit_s=round(done, 6),
            bytes=info.size,
            mb_per_s=round(info.size / write_s / 1e6, 1) if write_s else None,
            metrics=snapshot.metrics,
            result="committed",
            **({"writers": writers} if (writers := _writers(info)) else {}),
        )
        self.last_commit_s = done
        if info.manifest is not None:
            self._tip = Parent(info.step, info.manifest.digest)
        self.retention.saw(info)
        self.retention.apply()
        if self.replica is not None:
            self.replica.submit(info)
        return info

    def _store_commit(
        self,
        snapshot: Snapshot,
        *,
        store_commit: Callable[..., CheckpointInfo] | None = None,
        **kwargs: Any,
    ) -> CheckpointInfo:
        """``store.commit``; after a full disk or an I/O error, free space and retry once.

        Space is freed by deleting what the retention policy would delete once this save
        is committed, sparing the newest and the best checkpoints (it may fail again).
        A sharded save is not retried: every rank would have to retry with rank 0.
        """
        self.retention.check_metric(snapshot)
        try:
            info = (store_commit or self.store.commit)(snapshot, **kwargs)
            self.preflight.recheck(info)
            return info
        except SaveFailedError as e:
            if not is_recoverable(e) or store_commit is not None:
                raise
            first = e
        return self.retry(snapshot, first, lambda: self.store.commit(snapshot, **kwargs))

    def retry(
        self, snapshot: Snapshot, first: SaveFailedError, commit: Callable[[], CheckpointInfo]
    ) -> CheckpointInfo:
        """After ``first`` (a full disk, EIO): free what retention will delete once this
        save is committed, then ``commit()`` once more."""
        freed = self.retention.free_for(snapshot)
        log.warning(
            "%s; freed %s by the retention policy, retrying once", first, format_size(freed)
        )
        self.record.event("save_retry", step=snapshot.step, error=str(first), freed_bytes=freed)
        try:
            return commit()
        except SaveFailedError as e:
            newest = self.latest()
            resume = (
                f"rerun the same command to resume from {newest.name}"
                if newest
                else "no checkpoint"
            )
            raise SaveFailedError(
                f"{e} (retried once after freeing {format_size(freed)} by the retention "
                f"policy; {resume})"
            ) from e

    def prune(self) -> list[CheckpointInfo]:
        """Apply retention now (after the save in flight); return the deleted."""
        self.flush()
        deleted = self.retention.apply()
        self.retention.settle()
        return deleted

    def latest(self) -> CheckpointInfo | None:
        """The newest resumable checkpoint (shallow check; not a thin one), or None."""
        return next((i for i in reversed(self.store.scan()) if i.resumable), None)

    def written(self) -> None:
        """Wait until the background save in flight has finished, well or not (a failure
        is still raised where it would be)."""
        self.go()
        if self.background is not None and self.background.writer.busy:
            self.background.writer.wait()

    def latest_written(self) -> CheckpointInfo | None:
        """``latest()`` after ``written()``: the checkpoint a message that stops the run
        names, not the one before it."""
        self.written()
        return self.latest()

    def scan(self) -> list[CheckpointInfo]:
        """Every checkpoint folder, after ``written()``."""
        self.written()
        return self.store.scan()

    # ------------------------------------------------------------- background

    def _raise_unobserved(self) -> None:
        failure = self.take_failure()
        if failure is not None:
            raise failure[1]

    def take_failure(self) -> tuple[int, SaveFailedError, str] | None:
        """(step, error, reason) of a failed background save nobody waited for (once)."""
        if self.background is None:
            return None
        failure = self.background.take_failure()
        last = self._last
        if failure and last is not None and last._observed[0] and last.step == failure[0]:
            return None  # its wait() raised it already
        return failure

    def flush(self) -> None:
        """Wait for the background save in flight; raise ``SaveFailedError`` if it failed."""
        self.go()
        if self.background is not None:
            self.background.wait_idle(self._last.step if self._last else 0)
            self._raise_unobserved()

    def abandon(self) -> None:
        """Give up the background save in flight: it stops at its next chunk and its
        staging folder is removed (a save past its last chunk still commits)."""
        self.go()
        bg = self.background
        if bg is not None and bg.writer.busy:
            step = bg.writer.pending.step
            self.record.event("save_abandoned", step=step, stopped=bg.writer.abandon())

    def close(self) -> SaveFailedError | None:
        """Finish the save in flight and the replica's upload; the failure, if any."""
        failure = None
        self.go()
        if self.background is not None:
            self.background.close()
            unobserved = self.take_failure()
            failure = unobserved[1] if unobserved else None
        self.retention.settle()
        if self.replica is not None:
            self.replica.close()  # waits for the last upload, at most its timeout
        return failure


def _writers(info: CheckpointInfo) -> Any:
    """Of a sharded save: which rank (process) wrote which files, how many bytes, how fast."""
    return info.manifest.info.get("writers") if info.manifest else None
