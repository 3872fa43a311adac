"""``Checkpointer``: the one engine behind the plain loop, the Trainer callback and the CLI.

A façade over ``decide`` (when), ``saver`` (how, and what to keep), ``resume`` (from
where), ``preflight`` (will it fit) and ``emergency`` (signals and crashes). It owns the
run lock and the run record; the parts talk to each other only through it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from safepoint.distributed import QuietRecord, Ranks
from safepoint.engine.decide import Decider
from safepoint.engine.emergency import EmergencyStop
from safepoint.engine.preflight import Preflight
from safepoint.engine.resume import Resumed, Resumer, T
from safepoint.engine.saver import PendingSave, Saver
from safepoint.errors import ConfigError, SaveFailedError
from safepoint.lock import RunLock, prepare_directory
from safepoint.options import Options
from safepoint.records import RunRecord
from safepoint.snapshot import Snapshot, capture
from safepoint.store import CheckpointInfo, Store

log = logging.getLogger("safepoint")


class Checkpointer:
    """Saves and restores the state of a training loop in ``directory``.

    Takes the fields of ``Options`` as keyword arguments (or ``options=``). Holds the
    directory's run lock from construction to ``close()``; a second process on the same
    directory gets ``RunLockedError``. Not thread-safe: call it from the training loop.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        options: Options | None = None,
        *,
        length_later: bool = False,
        **kwargs: Any,
    ) -> None:
        # Every option is checked before anything is locked or written. ``length_later``:
        # for integrations that learn total_steps only at train start (``begin``).
        self.options = options.replace(**kwargs) if options else Options.from_kwargs(kwargs)
        if not length_later:
            Decider.check(self.options)
        self.directory = Path(directory)
        prepare_directory(self.directory)
        self.ranks = Ranks.current()  # several processes: rank 0 locks, records, commits
        self._lock = RunLock(self.directory)
        if self.ranks.is_writer:
            self._lock.acquire()
        self._closed = False
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise

    def _open(self) -> None:
        o, writer = self.options, self.ranks.is_writer
        self.store = Store(self.directory)
        self.record = RunRecord(self.directory) if writer else QuietRecord()
        self.decider = Decider(o, self.ranks, self.record)
        self._preflight = Preflight(self.store, self.record, o, self.decider, self._ours)
        self.saver = Saver(self.store, self.record, self._lock, o, self._preflight)
        self.resumer = Resumer(self.store, self.record, o, self.ranks)
        swept = self.store.sweep() if writer else []
        if o.remote is not None and writer:
            from safepoint.remote import mirror_for  # fsspec only when asked for

            mirror = mirror_for(o.remote, self.store, policy=self.saver.policy, record=self.record)
            self.saver.replica = self.resumer.source = mirror
            mirror.resubmit_newest()
        if swept:
            self.record.event("swept", folders=[p.name for p in swept])
        on_disk = [{"step": i.step, "bytes": i.size} for i in self.store.scan() if i.valid]
        self.record.event("start", pid=os.getpid(), config=o.to_json(), on_disk=on_disk)
        self._stop = EmergencyStop(
            self.saver,
            str(self.directory),
            signals=o.signals,
            grace=o.grace,
            stop_on_nan=o.stop_on_nan,
        )
        self._last_step: int | None = None
        self._logged: tuple[int, dict[str, Any]] | None = None
        self._stop.install()

    def _ours(self, info: CheckpointInfo) -> bool:
        return self.saver.ours(info)

    # ------------------------------------------------------------------ resume

    def restore(
        self,
        state: MutableMapping[str, Any],
        *,
        checkpoint: str | os.PathLike[str] | int | None = None,
    ) -> int | None:
        """Load the newest valid checkpoint (or ``checkpoint``) into ``state``.

        Returns the step restored, or None when there is nothing to resume from. A newer
        checkpoint that is damaged is skipped with a warning naming the problem. Raises
        ``IncompatibleCheckpointError`` if it belongs to another configuration or does
        not fit ``state``. Runs ``preflight`` first: ``DiskBudgetError`` before training.
        """
        self.preflight(state)
        rng = self.options.save_rng
        resumed = self.resume(
            lambda info: self.resumer.load_state(info, state, rng=rng), checkpoint
        )
        return None if resumed is None else resumed.info.step

    def resume(
        self,
        load: Callable[[CheckpointInfo], T],
        checkpoint: str | os.PathLike[str] | int | None = None,
    ) -> Resumed[T] | None:
        """For integrations: pick the checkpoint to resume from as ``restore`` does, with
        their own ``load`` (which raises ``CorruptCheckpointError`` or
        ``IncompatibleCheckpointError`` to pass to the next older checkpoint)."""
        resumed = self.resumer.pick(checkpoint, load)
        if resumed is not None:
            self.decider.begin(step=resumed.info.step)
        return resumed

    def load(
        self, info: CheckpointInfo, state: MutableMapping[str, Any], *, rng: bool = True
    ) -> dict[str, Any]:
        """For integrations: load ``info`` into ``state`` (and the RNG, if saved and
        ``rng``); returns the progress stored with it."""
        return self.resumer.load_state(info, state, rng=rng and self.options.save_rng)

    def begin(self, *, step: int = 0, total_steps: int | None = None) -> None:
        """For integrations: training starts at ``step``; ``total_steps`` when known now."""
        self.decider.begin(step=step, total_steps=total_steps)

    def preflight(self, state: Mapping[str, Any], **kwargs: Any) -> Any:
        """Raise ``DiskBudgetError`` before training if the kept checkpoints of ``state``
        cannot fit (once per run; ``engine/preflight.py``)."""
        return self._preflight.run(state, **kwargs)

    # -------------------------------------------------------------------- save

    def step(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        epoch_end: bool = False,
    ) -> PendingSave | None:
        """``step`` completed: save if due (always at ``total_steps``), act on a stop
        signal. Returns the save's handle, or None when none was due. ``metrics`` go to
        the run record and, when a save happens, into its manifest for retention."""
        if metrics:
            self.check_loss(step, metrics)
            self.log_metrics(step, metrics)
        reason = self.decide(step, epoch_end=epoch_end)
        handle = None
        if reason is not None:
            snapshot = capture(state, step=step, copy=False, rng=self.options.save_rng)
            handle = self.commit_or_continue(snapshot, metrics=metrics, reason=reason)
        if self._stop.requested:  # a stop signal arrived: emergency save, exit 3

            def emergency() -> CheckpointInfo:
                latest = self.latest()  # the background save of this step, if it landed
                if latest is not None and latest.step == step:
                    return latest
                return self.save(step, state, metrics=metrics, reason="emergency").wait()

            done = handle is not None and handle.done
            self._stop.stop(step, None if done else emergency)
        self._stop.boundary(step, state, rng=self.options.save_rng)
        return handle

    def decide(self, step: int, *, epoch_end: bool = False) -> str | None:
        """The reason to save now that ``step`` completed, or None; the same on every rank
        (collective: call it after every step on every rank). Raises the failure of a
        background save nobody waited for, as ``on_save_error`` says."""
        self._last_step = step
        self.check()
        bg = self.saver.background
        return self.decider.due(step, epoch_end=epoch_end, background=bg, stop=self._stop)

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        reason: str = "manual",
        progress: Mapping[str, Any] | None = None,
        urgent: bool = False,
    ) -> PendingSave:
        """Save ``state`` as ``checkpoint-<step>`` now, then prune; ``wait()`` on the
        handle for the checkpoint (a background save with ``async_save``, unless
        ``urgent``). ``SaveFailedError`` if writing fails; earlier checkpoints stay."""
        started = time.perf_counter()
        snap = capture(state, step=step, copy=False, rng=self.options.save_rng, progress=progress)
        return self.commit(snap, metrics=metrics, reason=reason, started=started, urgent=urgent)

    def commit(
        self,
        snapshot: Snapshot,
        *,
        metrics: Mapping[str, float] | None = None,
        reason: str = "manual",
        started: float | None = None,
        urgent: bool = False,
    ) -> PendingSave:
        """Commit a prepared ``snapshot`` (integrations build their own), then prune.

        With ``async_save`` (and not ``urgent``) it returns once the snapshot is copied to
        host memory; ``wait()`` on the handle gives the result. Collective on several
        ranks: every rank commits the same step; rank 0 writes."""
        if self._closed:
            raise ConfigError(f"the Checkpointer of {self.directory} is closed")
        started = time.perf_counter() if started is None else started
        urgent = urgent or self._stop.saving  # emergency saves go ahead, in line
        self.ranks.gather_rng(snapshot)  # every rank hands over its state before the commit
        snapshot.metrics = dict(metrics or snapshot.metrics)
        snapshot.reason = reason
        snapshot.fingerprint = self.options.fingerprint
        if self.ranks.is_writer:
            handle = self.saver.commit(snapshot, started=started, urgent=urgent)
        else:  # rank 0 commits; this rank's handle says what rank 0 will have done
            path = self.store.path_for(snapshot.step)
            info = CheckpointInfo(path, snapshot.step, "valid")
            handle = PendingSave(snapshot.step, path, reason, dict(snapshot.metrics), _info=info)
        handle.stall_s = time.perf_counter() - started
        self.decider.saved(snapshot.step, handle.stall_s)
        return handle

    def commit_or_continue(self, snapshot: Snapshot, **kwargs: Any) -> PendingSave | None:
        """``commit`` a scheduled save; on failure apply ``on_save_error`` (None: goes on)."""
        try:
            return self.commit(snapshot, **kwargs)
        except SaveFailedError as e:
            self.save_failed(snapshot.step, e, reason=kwargs.get("reason", "scheduled"))
            return None

    def save_failed(self, step: int, error: SaveFailedError, *, reason: str) -> None:
        """Apply ``on_save_error`` to a scheduled save that failed: re-raise ``error``
        ("stop"), or warn loudly and train on until the next due save ("continue")."""
        if self.options.on_save_error == "stop":
            raise error
        self.record.event("save_skipped", step=step, reason=reason, error=str(error))
        if self.decider.end_of_run(step) or reason == "end of training":
            # Going on would end the run with exit 0 and no final checkpoint.
            newest = self.latest()
            raise SaveFailedError(
                f"the final save (step {step}) failed, so the run ends WITHOUT its final "
                f"checkpoint; {'the newest is ' + newest.name if newest else 'no checkpoint'} "
                f"(rerun the same command to resume and save again): {error}"
            ) from error
        self.decider.failed()
        log.error(
            "SAVE FAILED at step %d, training goes on WITHOUT a new checkpoint "
            "(on_save_error='continue'); the next save tries again: %s",
            step,
            error,
        )

    # ------------------------------------------------------------ stops, crashes

    def at_boundary(
        self, step: int, state: Mapping[str, Any], save: Callable[[], CheckpointInfo]
    ) -> None:
        """For integrations that build their own snapshots: ``step`` completed and
        ``state`` is consistent. After a stop signal: ``save()``, then ``TrainingStopped``."""
        if self._stop.requested:
            self._stop.stop(step, None if self.decider.last_saved == step else save)
        self._stop.boundary(step, state, rng=self.options.save_rng)

    @property
    def stop_requested(self) -> str | None:
        """The stop signal received and not yet acted on (``"SIGINT"``...), or None."""
        return self._stop.requested

    def check_loss(self, step: int, metrics: Mapping[str, Any]) -> None:
        """With ``stop_on_nan``: raise ``NonFiniteLossError`` if ``metrics["loss"]`` is not
        finite; nothing of that step is saved. ``step()`` calls it itself."""
        self._stop.check_loss(step, metrics)

    def on_exception(
        self,
        exc: BaseException,
        save: Callable[[int, Mapping[str, Any], str], CheckpointInfo] | None = None,
    ) -> CheckpointInfo | None:
        """After ``exc`` escaped the training loop: save the last completed step if the
        state is still that step's (``save(step, state, reason)``), add a hint to ``exc``;
        the caller re-raises."""
        self._stop.handled = True

        def default(step: int, state: Mapping[str, Any], reason: str) -> CheckpointInfo:
            return self.save(step, state, reason=reason, urgent=True).wait()

        return self._stop.on_exception(exc, save or default, last_saved=self.decider.last_saved)

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` reached at ``step`` in the run record, each value once."""
        fresh = dict(metrics)
        if self._logged is not None and self._logged[0] == step:
            fresh = {k: v for k, v in fresh.items() if self._logged[1].get(k, object()) != v}
            self._logged[1].update(fresh)
        else:
            self._logged = (step, dict(fresh))
        if fresh:
            self.record.event("metrics", step=step, metrics=fresh)

    # -------------------------------------------------------------------- query

    def prune(self) -> list[CheckpointInfo]:
        """Apply retention now (after the save in flight); return the deleted."""
        return self.saver.prune()

    def latest(self) -> CheckpointInfo | None:
        """The newest valid checkpoint (shallow check), or None."""
        return self.saver.latest()

    def list(self) -> list[CheckpointInfo]:
        """All checkpoint folders of the directory, oldest first, with their status."""
        return [i for i in self.store.scan() if i.status != "staging"]

    @property
    def schedule(self) -> Any:
        """The save schedule (read only: ``decide`` is the one that asks it)."""
        return self.decider.schedule

    @property
    def last_saved(self) -> int | None:
        """The step of the newest save of this run (or the step resumed from)."""
        return self.decider.last_saved

    # -------------------------------------------------------------------- close

    def check(self) -> None:
        """Raise ``SaveFailedError`` now if a background save nobody waited for failed
        (as ``on_save_error`` says); never waits."""
        failure = self.saver.take_failure()
        if failure is not None:
            self.save_failed(failure[0], failure[1], reason=failure[2])

    def flush(self) -> None:
        """Wait for the background save in flight; raise ``SaveFailedError`` if it failed."""
        self.saver.flush()

    def abandon(self) -> None:
        """Give up the background save in flight (its staging folder is removed)."""
        self.saver.abandon()

    def close(self) -> None:
        """Wait for the save in flight, release the run lock. Idempotent. Raises the
        failure of the last background save (after releasing), or a late stop."""
        if self._closed:
            return
        self._closed = True
        failure = stopped = None
        try:
            stopped = self._stop.pending_at_close(self._last_step)  # after the last step
            failure = self.saver.close()
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
        # The loop failed: still finish the save in flight (its snapshot was taken at a
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
