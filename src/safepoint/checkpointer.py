"""The engine: ``Checkpointer`` decides, snapshots, commits, prunes and restores.

A thin orchestrator over the pure policies (``schedule``, ``retention``) and the store.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, Literal

from safepoint import policy_hooks
from safepoint.disk import DiskCheck
from safepoint.distributed import QuietRecord, Ranks
from safepoint.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    SaveFailedError,
)
from safepoint.lock import RunLock
from safepoint.plan import DEFAULT_MAX_OVERHEAD
from safepoint.records import RunRecord, last_reached_step, retention_rule
from safepoint.remote import Mirror, mirror_for
from safepoint.retention import Candidate, RetentionPolicy, plan
from safepoint.schedule import Schedule, parse_save_every
from safepoint.signals import DEFAULT_SIGNALS, EmergencyStop
from safepoint.snapshot import Snapshot, apply, capture
from safepoint.store import CheckpointInfo, Store, checkpoint_step, inspect, newest_first
from safepoint.units import parse_duration, parse_size
from safepoint.writer import AsyncSaver

log = logging.getLogger("safepoint")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint, for its manifest."""
    import safetensors
    import torch

    from safepoint import __version__

    versions = {
        "safepoint": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
    for name in ("transformers", "peft", "trl", "accelerate"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            versions[name] = str(module.__version__)
    return versions


def prepare_directory(directory: Path) -> None:
    """Create ``directory`` if needed and prove it writable, or raise ``ConfigError``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(
            f"{directory} exists and is not a directory; choose another --output-dir"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"cannot create the output directory {directory} ({e.strerror}); "
            "choose another --output-dir"
        ) from e
    probe = directory / f".safepoint-write-test-{os.getpid()}"
    try:
        # O_EXCL: never write through a link or file planted under this name
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write in the output directory {directory} ({e.strerror}); "
            "make it writable or choose another --output-dir"
        ) from e


class Checkpointer:
    """Saves and restores the state of a training loop in ``directory``.

    Holds the directory's run lock from construction to ``close()``; a second process on
    the same directory gets ``RunLockedError``. Not thread-safe: call it from the
    training loop only.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: str | int | None = None,
        total_steps: int | None = None,
        keep_last: int | None = None,
        keep_best: int = 0,
        metric: str = "eval_loss",
        mode: Literal["min", "max"] = "min",
        keep_every: int | None = None,
        max_disk: str | int | None = None,
        async_save: bool = False,
        on_busy: Literal["wait", "skip"] = "wait",
        remote: str | None = None,
        verify_on_resume: bool = True,
        fingerprint: str | None = None,
        save_rng: bool = True,
        mtbf: str | float = "24h",
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
        on_save_error: Literal["stop", "continue"] = "stop",
        check_disk: bool = True,
        signals: str | list[str] | None = DEFAULT_SIGNALS,
        grace: str | float | None = None,
        stop_on_nan: bool = False,
    ) -> None:
        self.directory = Path(directory)
        # signals.py: stop signals -> emergency save at the next step boundary, exit 3
        self._stop = EmergencyStop(
            str(self.directory), signals=signals, grace=grace, stop_on_nan=stop_on_nan
        )
        if on_save_error not in ("stop", "continue"):
            raise ConfigError(f"on_save_error={on_save_error!r} must be 'stop' or 'continue'")
        self.on_save_error = on_save_error
        self.check_disk = check_disk
        self._preflight: DiskCheck | None = None
        self._warned_overhead = self._warned_metric = False
        self._preflight_rechecked = False  # policy_hooks.recheck: once, after the first save
        self.metric_hint = "pass it to step() in metrics=, or set metric= to one the saves carry"
        """How the user gets ``metric`` into the saves, in their terms (integrations adapt it)."""
        self.schedule = Schedule(
            parse_save_every(save_every),
            total_steps=total_steps,
            mtbf=parse_duration(mtbf, what="mtbf"),
            max_overhead=max_overhead,
        )
        self.policy = RetentionPolicy(
            keep_last=keep_last,
            keep_best=keep_best,
            metric=metric,
            mode=mode,
            keep_every=keep_every,
            max_bytes=None if max_disk is None else parse_size(max_disk, what="max_disk"),
        )
        self.total_steps = total_steps
        self.verify_on_resume = verify_on_resume
        self.fingerprint = fingerprint
        self.save_rng = save_rng
        prepare_directory(self.directory)
        self.store = Store(self.directory)
        self._lock = RunLock(self.directory)
        self.ranks = Ranks.current()  # several processes: rank 0 locks, records, commits
        if self.ranks.is_writer:
            self._lock.acquire()
        self._closed = False
        self.record = RunRecord(self.directory) if self.ranks.is_writer else QuietRecord()
        self.mirror: Mirror | None = None
        # async_save: snapshot to host memory now, commit on a background thread (writer.py)
        self._async = (
            AsyncSaver(self.directory, self.record, on_busy=on_busy) if async_save else None
        )
        self.last_progress: dict[str, Any] = {}
        try:
            swept = self.store.sweep() if self.ranks.is_writer else []
            if remote is not None and self.ranks.is_writer:
                self.mirror = mirror_for(remote, self.store, policy=self.policy, record=self.record)
                self.mirror.resubmit_newest()
            if swept:
                self.record.event("swept", folders=[p.name for p in swept])
            self._record_start(save_every)
        except BaseException:
            self._lock.release()
            raise
        self.schedule.start(time.monotonic())
        self._stop.install()

    def _record_start(self, save_every: object) -> None:
        # What the previous process reached gives "steps lost" when this one resumes.
        self._reached_before = last_reached_step(self.directory)
        self._last_step: int | None = None
        self._logged: tuple[int, dict[str, Any]] | None = None
        p = self.policy
        config = {
            "save_every": None if save_every is None else str(save_every),
            "total_steps": self.total_steps,
            **{k: getattr(p, k) for k in ("keep_last", "keep_best", "metric", "mode")},
            **{"keep_every": p.keep_every, "max_disk": p.max_bytes},
        }
        on_disk = [{"step": i.step, "bytes": i.size} for i in self.store.scan() if i.valid]
        self.record.event("start", pid=os.getpid(), config=config, on_disk=on_disk)

    # ------------------------------------------------------------------ restore

    def restore(
        self,
        state: MutableMapping[str, Any],
        *,
        checkpoint: str | os.PathLike[str] | int | None = None,
    ) -> int | None:
        """Load the newest valid checkpoint (or ``checkpoint``) into ``state``.

        Returns the step restored, or None when there is nothing to resume from. A newer
        checkpoint that is damaged is skipped with a warning naming the problem.
        Raises ``IncompatibleCheckpointError`` if the newest valid checkpoint belongs to
        another configuration (fingerprint) or does not fit ``state``. Runs ``preflight``
        first: raises ``DiskBudgetError`` before training if the checkpoints cannot fit.
        """
        self.preflight(state)
        if checkpoint is None and self.mirror is not None:
            self.mirror.fetch_if_empty()  # a fresh machine: the newest remote one, verified
        if checkpoint is None and self.ranks.active:
            # Every rank resumes from the checkpoint rank 0 picks; none of them guesses.
            checkpoint = self.ranks.agree_on_checkpoint(
                lambda: next((i.step for i in newest_first(self.directory)), None)
            )
            if checkpoint is None:
                return None
        if checkpoint is not None:
            info = self._explicit(checkpoint)
            progress = self._load(info, state)
            return self._resumed(info, progress)
        failed: dict[str, str] = {}
        misfit: IncompatibleCheckpointError | None = None
        for info in newest_first(self.directory, deep=self.verify_on_resume):
            try:
                progress = self._load(info, state)
            except CorruptCheckpointError as e:
                log.warning("skipping %s: %s; trying the next older checkpoint", info.path, e)
                failed[info.name] = str(e)
                continue
            except IncompatibleCheckpointError as e:
                if self._other_config(info):
                    raise
                # It does not fit the live objects (kinds, keys, shapes): an older one may
                # (this one damaged or tampered with). If none fits, the first reason is
                # raised: training from scratch would hide a changed model.
                log.warning("skipping %s: %s; trying the next older checkpoint", info.path, e)
                failed[info.name] = str(e)
                misfit = misfit or e
                continue
            return self._resumed(info, progress, failed)
        if misfit is not None:
            raise misfit
        return None

    def _explicit(self, checkpoint: str | os.PathLike[str] | int) -> CheckpointInfo:
        path = self.store.path_for(checkpoint) if isinstance(checkpoint, int) else Path(checkpoint)
        if not os.path.lexists(path):
            have = ", ".join(i.name for i in self.list() if i.valid) or "none"
            raise CheckpointNotFoundError(
                f"{path}: no such checkpoint; valid checkpoints in {self.directory}: {have}"
            )
        info = inspect(path, deep=self.verify_on_resume)
        if info.status == "foreign":  # e.g. the stock Trainer's: never resumed from
            from safepoint.foreign import describe_foreign

            raise IncompatibleCheckpointError(
                f"{path} was not written by safepoint ({'; '.join(info.problems)}); "
                f"{describe_foreign(path)}"
            )
        if not info.valid:
            raise CorruptCheckpointError(
                f"{path} is {info.status}: {'; '.join(info.problems)}; resume from another "
                "checkpoint or run `safepoint verify` for details"
            )
        return info

    def _other_config(self, info: CheckpointInfo) -> bool:
        theirs = info.manifest.fingerprint if info.manifest else None
        return bool(self.fingerprint and theirs and theirs != self.fingerprint)

    def _load(self, info: CheckpointInfo, state: MutableMapping[str, Any]) -> dict[str, Any]:
        theirs = info.manifest.fingerprint if info.manifest else None
        if self._other_config(info):
            raise IncompatibleCheckpointError(
                f"{info.path} was written by another configuration (fingerprint {theirs}, "
                f"this run {self.fingerprint}); use the same configuration or another "
                "output directory"
            )
        progress = apply(info.path, state, rng=self.save_rng, manifest=info.manifest)
        self.ranks.restore_rank_rng(info.path, rng=self.save_rng)
        return progress

    def _resumed(
        self,
        info: CheckpointInfo,
        progress: Mapping[str, Any],
        failed: Mapping[str, str] | None = None,
    ) -> int:
        log.info("resumed from %s", info.path)
        reached = self._reached_before
        self.record.event(
            "resume",
            step=info.step,
            checkpoint=info.name,
            reached=reached,
            steps_lost=None if reached is None else max(reached - info.step, 0),
            skipped=self._skipped_newer(info.step, failed or {}),
        )
        self.schedule.start(time.monotonic(), info.step)
        self.last_progress = dict(progress)
        return info.step

    def _skipped_newer(self, step: int, failed: Mapping[str, str]) -> list[dict[str, str]]:
        """Why each folder newer than ``step`` was passed over, for the run record."""
        skipped = []
        for i in self.store.scan():
            if i.step <= step or i.status == "staging":
                continue
            problem = failed.get(i.name) or "; ".join(i.problems)
            if i.valid and not problem:
                problem = "checksum verification failed"
            skipped.append({"checkpoint": i.name, "status": i.status, "problem": problem})
        return skipped

    # --------------------------------------------------------------------- save

    def step(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        epoch_end: bool = False,
    ) -> CheckpointInfo | None:
        """Tell the checkpointer that ``step`` completed; save if the schedule says so.

        Also saves at ``total_steps`` (the end of the run), always. Returns the committed
        checkpoint, or None when no save was due. ``metrics`` go to the run record (as
        ``log_metrics``) and, when a save happens, into its manifest for retention.
        """
        if metrics:
            self._stop.check_loss(self, step, metrics)
            self.log_metrics(step, metrics)
        self._last_step = step
        now = time.monotonic()
        reason = self.schedule.due(step, now, epoch_end=epoch_end)
        if (
            reason is None
            and self.total_steps is not None
            and step >= self.total_steps
            and self.schedule.last_save_step != step
        ):
            reason = "end of training"
        if self._async is not None:
            self._background_failure()
            reason = self._async.due(step, reason, must=reason == "end of training")
        reason = self.ranks.agree_to_save(reason, self._stop)  # same decision on all ranks
        info = None if reason is None else self._scheduled_save(step, state, metrics, reason)
        if self._stop.requested:  # a stop signal arrived: emergency save, exit 3
            self._stop.stop(
                self,
                step,
                None
                if info is not None and info.valid
                else lambda: self.save(step, state, metrics=metrics, reason="emergency"),
            )
        self._stop.boundary(step, state, rng=self.save_rng)
        return info

    def at_boundary(
        self, step: int, state: Mapping[str, Any], save: Callable[[], CheckpointInfo]
    ) -> None:
        """For integrations that build their own snapshots (the Trainer callback): ``step``
        completed and ``state`` (optimizer, model) is consistent. If a stop signal arrived,
        commits ``save()`` synchronously and raises ``TrainingStopped`` (exit code 3)."""
        if self._stop.requested:
            self._stop.stop(self, step, None if self.schedule.last_save_step == step else save)
        self._stop.boundary(step, state, rng=self.save_rng)

    @property
    def stop_requested(self) -> str | None:
        """The stop signal received and not yet acted on (``"SIGINT"``...), or None. For
        integrations that let their framework finish the step's logging first."""
        return self._stop.requested

    def check_loss(self, step: int, metrics: Mapping[str, Any]) -> None:
        """With ``stop_on_nan``: raise ``NonFiniteLossError`` if ``metrics["loss"]`` is NaN
        or infinite; nothing of that step is saved. ``step()`` calls it itself."""
        self._stop.check_loss(self, step, metrics)

    def on_exception(
        self,
        exc: BaseException,
        save: Callable[[int, Mapping[str, Any]], CheckpointInfo] | None = None,
    ) -> CheckpointInfo | None:
        """After ``exc`` escaped the training loop: save the last completed step if the state
        still is that step's (``signals.py``), add a hint to ``exc``; the caller re-raises."""
        self._stop.handled = True
        return self._stop.on_exception(self, exc, save)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record training or eval ``metrics`` reached at ``step`` in the run record.

        Values already recorded for the same step are not written twice, so a callback
        may both log metrics here and pass them to ``step()``.
        """
        fresh = dict(metrics)
        if self._logged is not None and self._logged[0] == step:
            fresh = {k: v for k, v in fresh.items() if self._logged[1].get(k, object()) != v}
            self._logged[1].update(fresh)
        else:
            self._logged = (step, dict(fresh))
        if fresh:
            self.record.event("metrics", step=step, metrics=fresh)

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        reason: str = "manual",
        progress: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Save ``state`` as ``checkpoint-<step>`` now, then apply retention.

        Raises ``SaveFailedError`` if writing fails; earlier checkpoints stay intact.
        """
        self._check_open()
        t0 = time.perf_counter()
        snapshot = capture(state, step=step, copy=False, rng=self.save_rng, progress=progress)
        return self.commit(snapshot, metrics=metrics, reason=reason, started=t0)

    def commit(
        self,
        snapshot: Snapshot,
        *,
        metrics: Mapping[str, float] | None = None,
        reason: str = "manual",
        started: float | None = None,
    ) -> CheckpointInfo:
        """Commit a prepared ``snapshot`` (integrations build their own), then prune.

        With ``async_save`` this returns once the snapshot is copied to host memory, with
        a ``staging`` info; the commit happens in the background and a failure of it is
        raised by the next ``step()``, ``save()``, ``flush()`` or ``close()``.
        """
        self._check_open()
        self.ranks.gather_rng(snapshot)  # every rank hands over its state before the commit
        if not self.ranks.is_writer:
            self.schedule.saved(snapshot.step, time.monotonic())
            status = "valid" if self._async is None else "staging"  # as rank 0 will say
            return CheckpointInfo(self.store.path_for(snapshot.step), snapshot.step, status)
        started = time.perf_counter() if started is None else started
        snapshot.metrics = dict(metrics or snapshot.metrics)
        snapshot.reason = reason
        snapshot.fingerprint = self.fingerprint
        if self._async is None:
            return self._commit_now(snapshot, started, mode="sync")
        # Only one thread may touch the store: first let the save in flight finish.
        self._background_failure()
        waited = self._async.wait_idle(snapshot.step)
        if self._stop.saving:  # emergency saves are synchronous, and go ahead regardless
            try:
                self._async.raise_failure()
            except SaveFailedError as e:
                log.error("%s", e)
            return self._commit_now(snapshot, started, mode="sync")
        self._background_failure()
        if not self._async.fits(snapshot):
            return self._commit_now(snapshot, started, mode="inline")
        t_copy = time.perf_counter()
        self._async.start(
            snapshot,
            lambda staged, abort: self._commit_now(
                staged,
                started,
                mode="async",
                abort=abort,
                timing={
                    "wait_s": round(waited, 6),
                    "snapshot_s": round(time.perf_counter() - t_copy, 6),
                    "stall_s": round(time.perf_counter() - started, 6),
                },
            ),
        )
        self._saved(snapshot.step, time.perf_counter() - started)
        return CheckpointInfo(
            self.store.path_for(snapshot.step),
            snapshot.step,
            "staging",
            ("being written in the background",),
        )

    def _commit_now(
        self,
        snapshot: Snapshot,
        started: float,
        *,
        mode: str,
        abort: Callable[[], None] | None = None,
        timing: dict[str, float] | None = None,
    ) -> CheckpointInfo:
        # Runs in the training thread (sync, inline) or on the writer thread (async);
        # ``timing`` (async) was measured in the training thread when the save started.
        reason = snapshot.reason
        try:
            self._lock.check()  # safepoint.lock deleted under us: still the only writer?
            info = self._store_commit(
                snapshot,
                versions=library_versions(),
                info={
                    "bytes": snapshot.nbytes,
                    "mode": mode,
                    **(timing or {}),
                    "policy": self._policy_json(),
                },
                abort=abort,
            )
        except Exception as e:
            self.record.event("save", step=snapshot.step, reason=reason, result="failed")
            self.record.event("error", where="save", step=snapshot.step, error=str(e))
            raise
        done = time.perf_counter() - started
        self._stop.measured(done)
        stall = timing["stall_s"] if timing else done
        if mode != "async":
            self._saved(snapshot.step, stall)
        write_s = info.manifest.info.get("write_s") if info.manifest else None
        log.info("saved %s (%s, %s) in %.2f s", info.path.name, reason, mode, done)
        self.record.event(
            "save",
            step=info.step,
            reason=reason,
            mode=mode,
            stall_s=round(stall, 6),
            **{k: v for k, v in (timing or {}).items() if k != "stall_s"},
            write_s=write_s,
            commit_s=round(done, 6),
            bytes=info.size,
            mb_per_s=round(info.size / write_s / 1e6, 1) if write_s else None,
            metrics=snapshot.metrics,
            result="committed",
        )
        self._prune()
        if self.mirror is not None:
            self.mirror.submit(info)
        return info

    def prune(self) -> list[CheckpointInfo]:
        """Apply the retention policy to this run's valid checkpoints; return the deleted.

        Waits for a background save first: only one thread touches the store at a time."""
        self.flush()
        return self._prune()

    def _prune(self) -> list[CheckpointInfo]:
        valid = [i for i in self.store.scan() if i.valid and self._ours(i)]
        decision = plan([Candidate(i.step, i.size, i.metrics) for i in valid], self.policy)
        if decision.over_budget:
            log.warning(
                "the checkpoints that must be kept exceed max_disk=%s bytes", self.policy.max_bytes
            )
        deleted = []
        for info in valid:
            if info.step in decision.delete:
                if not policy_hooks.delete(self, info):
                    continue
                self.record.event(
                    "delete",
                    step=info.step,
                    checkpoint=info.name,
                    bytes=info.size,
                    rule=retention_rule(self.policy),
                )
                deleted.append(info)
        return deleted

    # ---------------------------------------------- policies: disk, errors (policy_hooks)

    preflight = policy_hooks.preflight
    save_failed = policy_hooks.save_failed
    _scheduled_save = policy_hooks.scheduled_save
    _store_commit = policy_hooks.store_commit
    _saved = policy_hooks.saved
    _policy_json = policy_hooks.policy_json

    def _ours(self, info: CheckpointInfo) -> bool:
        theirs = info.manifest.fingerprint if info.manifest else None
        return self.fingerprint is None or theirs is None or theirs == self.fingerprint

    # -------------------------------------------------------------------- query

    def latest(self) -> CheckpointInfo | None:
        """The newest valid checkpoint (shallow check), or None."""
        return next((i for i in reversed(self.list()) if i.valid), None)

    def list(self) -> list[CheckpointInfo]:
        """All checkpoint folders of the directory, oldest first, with their status."""
        return [i for i in self.store.scan() if i.status != "staging"]

    # -------------------------------------------------------------------- close

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"the Checkpointer of {self.directory} is closed")

    def check(self) -> None:
        """Raise ``SaveFailedError`` now if a background save failed; never waits.
        Integrations call it at every step so that a failure surfaces at once. With
        ``on_save_error="continue"`` a failed scheduled save is logged instead."""
        self._background_failure()

    def _background_failure(self) -> None:
        if self._async is not None:
            failure = self._async.take_failure()
            if failure is not None:
                self.save_failed(failure[0], failure[1], reason=failure[2])

    def flush(self) -> None:
        """Wait for the background save in flight, if any; raise ``SaveFailedError`` if it
        (or an earlier background save) failed. For emergency saves: flush, then save."""
        if self._async is not None:
            self._async.wait_idle(self._last_step or 0)
            self._async.raise_failure()

    def abandon(self) -> None:
        """Give up the background save in flight: it stops at its next chunk and its
        staging folder is removed (a save already past its last chunk still commits).
        For a process that must end now; the newest committed checkpoint stays valid."""
        if self._async is not None and self._async.writer.busy:
            step = self._async.writer.pending.step
            done = self._async.writer.abandon()
            self.record.event("save_abandoned", step=step, stopped=done)

    def close(self) -> None:
        """Wait for the save in flight, release the run lock. Idempotent.

        Raises ``SaveFailedError`` if the last background save failed (after releasing)."""
        if self._closed:
            return
        self._closed = True
        failure: SaveFailedError | None = None
        stopped = None
        try:
            stopped = self._stop.pending_at_close(self)  # a signal after the last step
            if self._async is not None:
                self._async.close()
                try:
                    self._async.raise_failure()
                except SaveFailedError as e:
                    failure = e
            if self.mirror is not None:
                self.mirror.close()  # waits for the last upload, at most its timeout
            self.record.event("close", step=self._last_step)
        finally:
            self._stop.close()  # the user's own signal handlers are back
            self._lock.release()
        if failure is not None:
            raise failure
        if stopped is not None:
            raise stopped

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # The loop failed: still wait for the save in flight (its snapshot was taken at a
        # good step), but let the loop's own exception propagate, not a save failure.
        if isinstance(exc, BaseException):
            self.on_exception(exc)  # emergency save if the state is consistent
        try:
            self.close()
        except SaveFailedError as e:
            log.error("%s", e)

    def __del__(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.close()


__all__ = ["Checkpointer", "checkpoint_step"]
