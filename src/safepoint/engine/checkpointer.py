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
from safepoint.engine.resume import Resumed, Resumer, T, say_resumed
from safepoint.engine.saver import PendingSave, Saver
from safepoint.engine.sharded import save_sharded
from safepoint.errors import ConfigError, SaveFailedError
from safepoint.lock import RunLock, prepare_directory
from safepoint.options import Options
from safepoint.records import RunRecord
from safepoint.snapshot import Snapshot, capture
from safepoint.store import Store
from safepoint.validity import CheckpointInfo

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
        # integrations that learn total_steps only at train start (``begin``).
        self.options = options.replace(**kwargs) if options else Options.from_kwargs(kwargs)
        Decider.check(self.options, length_later=length_later)
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
        self._preflight = Preflight(self.store, self.record, o, self.decider, lambda i: ours(i))
        self.saver = Saver(self.store, self.record, self._lock, o, self._preflight)
        ours = (retention := self.saver.retention).ours  # "of this configuration": one rule
        self.resumer = Resumer(self.store, self.record, o, self.ranks)
        swept = self.store.sweep() if writer else []
        if o.remote is not None and writer:
            from safepoint.remote import mirror_for  # fsspec only when asked for

            mirror = mirror_for(o.remote, self.store, policy=retention.policy, record=self.record)
            self.saver.replica = self.resumer.source = mirror
            mirror.resubmit_newest()
        if swept:
            self.record.event("swept", folders=[p.name for p in swept])
        on_disk = [{"step": i.step, "bytes": i.size} for i in self.store.scan() if i.valid]
        self.record.event("start", pid=os.getpid(), config=o.to_json(), on_disk=on_disk)
        self.emergency = EmergencyStop(
            self.saver, str(self.directory), options=o, last_saved=lambda: self.decider.last_saved
        )
        self._last_step: int | None = None
        self.emergency.install()

    # ------------------------------------------------------------------ resume

    def restore(
        self,
        state: MutableMapping[str, Any],
        *,
        checkpoint: str | os.PathLike[str] | int | None = None,
    ) -> int | None:
        """Load the newest valid checkpoint (or ``checkpoint``) into ``state`` after
        ``preflight``; the step, or None. Skips damaged ones (``engine/resume.py``)."""
        self.preflight(state)
        resumed = self.resume(lambda info: self.load(info, state), checkpoint)
        return None if resumed is None else say_resumed(resumed.info)

    def resume(
        self,
        load: Callable[[CheckpointInfo], T],
        checkpoint: str | os.PathLike[str] | int | None = None,
    ) -> Resumed[T] | None:
        """For integrations: ``restore`` with their own ``load`` (which raises
        ``CorruptCheckpointError`` / ``IncompatibleCheckpointError`` to pass)."""
        self.saver.written()  # a checkpoint still being written is one to pick from
        resumed = self.resumer.pick(checkpoint, load)
        if resumed is not None:
            self.decider.begin(step=resumed.info.step)
            self.saver.resumed_from(resumed.info, writer=self.ranks.is_writer)  # lineage
        return resumed

    def load(
        self, info: CheckpointInfo, state: MutableMapping[str, Any], *, rng: bool = True
    ) -> dict[str, Any]:
        """Load ``info`` into ``state`` (and the RNG if ``rng``); the progress stored."""
        return self.resumer.load_state(info, state, rng=rng and self.options.save_rng)

    def preflight(self, state: Mapping[str, Any], **kwargs: Any) -> Any:
        """``DiskBudgetError`` if the kept checkpoints cannot fit (``engine/preflight.py``)."""
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
        signal; the save's handle or None. ``metrics`` go to the record and manifest."""
        if metrics:
            self.emergency.check_loss(step, metrics)
            self.record.metrics(step, metrics)
        reason = self.decide(step, epoch_end=epoch_end)
        handle = None
        if reason is not None:
            snapshot = capture(state, step=step, copy=False, rng=self.options.save_rng)
            handle = self.commit_or_continue(snapshot, metrics=metrics, reason=reason)
        if self.emergency.requested:  # a stop signal arrived: emergency save, exit 3
            done = handle is not None and handle.done
            self.emergency.stop(step, None if done else lambda: self._last(step, state, metrics))
        self.emergency.boundary(step, state, rng=self.options.save_rng)
        return handle

    def _last(self, step: int, state: Mapping[str, Any], metrics: Any) -> CheckpointInfo:
        if (latest := self.latest()) is not None and latest.step == step:  # landed already
            return latest
        return self.save(step, state, metrics=metrics, reason="emergency", urgent=True).wait()

    def decide(self, step: int, *, epoch_end: bool = False) -> str | None:
        """Why to save now that ``step`` completed, or None: the same on every rank
        (collective). Raises an unwaited background failure, per ``on_save_error``."""
        self._last_step = step
        self.check()
        bg, stop = self.saver.background, self.emergency
        return self.decider.due(step, epoch_end=epoch_end, background=bg, stop=stop)

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
        """``commit`` ``state`` as ``checkpoint-<step>`` now; ``.wait()`` for the result."""
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
        """Commit ``snapshot`` (integrations build their own), then prune. In the background
        with ``async_save`` unless ``urgent``: the handle's ``wait()`` gives the result.
        ``SaveFailedError`` if an in-line save fails. Collective: rank 0 writes."""
        if self._closed:
            raise ConfigError(f"the Checkpointer of {self.directory} is closed")
        started = time.perf_counter() if started is None else started
        self.ranks.gather_rng(snapshot)  # every rank hands over its state before the commit
        snapshot.metrics = dict(metrics or snapshot.metrics)
        snapshot.reason, snapshot.fingerprint = reason, self.options.fingerprint
        urgent, writer = urgent or self.emergency.saving, self.ranks.is_writer  # urgent: in line
        if snapshot.sharded:  # every rank writes its own pieces, together, in line
            handle = save_sharded(self.saver, self.ranks, snapshot, started=started)
        else:  # rank 0 writes
            handle = self.saver.commit(snapshot, started=started, urgent=urgent, writer=writer)
        self.decider.saved(snapshot.step, handle.stall_s)
        self.saver.go()  # a background save starts as this returns (else at close, flush)
        return handle

    def commit_or_continue(self, snapshot: Snapshot, **kwargs: Any) -> PendingSave | None:
        """``commit`` a scheduled save; a failure as ``on_save_error`` says (None: go on)."""
        try:
            return self.commit(snapshot, **kwargs)
        except SaveFailedError as e:
            reason = kwargs.get("reason", "scheduled")
            self.decider.save_failed(snapshot.step, e, reason=reason, newest=self.latest())
            return None

    # ------------------------------------------------------------ stops, crashes

    def on_exception(
        self,
        exc: BaseException,
        save: Callable[[int, Mapping[str, Any], str], CheckpointInfo] | None = None,
    ) -> CheckpointInfo | None:
        """After ``exc`` escaped the loop: ``save(step, state, reason)`` the last completed
        step if the state is still that step's, add a hint to ``exc`` (then re-raise)."""
        self.emergency.handled = True
        save = save or (lambda s, st, why: self.save(s, st, reason=why, urgent=True).wait())
        return self.emergency.on_exception(
            exc, save, last_saved=self.decider.last_saved, several_ranks=self.ranks.active
        )

    # -------------------------------------------------------------------- query

    def prune(self) -> list[CheckpointInfo]:
        """Apply retention now (after the save in flight); return the deleted."""
        return self.saver.prune()

    def latest(self) -> CheckpointInfo | None:
        """The newest valid checkpoint (shallow check; after the save in flight), or None."""
        return self.saver.latest_written()

    def list(self) -> list[CheckpointInfo]:
        """All checkpoint folders, oldest first, with their status (after the save in flight)."""
        return [i for i in self.saver.scan() if i.status != "staging"]

    # -------------------------------------------------------------------- close

    def check(self) -> None:
        """Raise now the failure of a background save nobody waited for; never waits."""
        if (failure := self.saver.take_failure()) is not None:
            step, error, reason = failure
            self.decider.save_failed(step, error, reason=reason, newest=self.saver.latest())

    def flush(self) -> None:
        """Wait for the background save in flight; raise ``SaveFailedError`` if it failed."""
        self.saver.flush()

    def close(self) -> None:
        """Finish the save in flight, release the lock (idempotent); then raise the last
        background failure or a stop signal that came after the last step."""
        if self._closed:
            return
        self._closed, failure, stopped = True, None, None
        try:
            stopped = self.emergency.pending_at_close(self._last_step)  # after the last step
            failure = self.saver.close()
            self.record.event("close", step=self._last_step)
        finally:
            self.emergency.close()  # the user's own signal handlers are back
            self._lock.release()
        if failure is not None or stopped is not None:
            raise failure or stopped  # type: ignore[misc]

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # The loop failed: finish the save in flight (a good step's), save the last step
        # if consistent, and let the loop's own exception propagate, not a save failure.
        if isinstance(exc, BaseException):
            self.on_exception(exc)
        try:
            self.close()
        except SaveFailedError as e:
            log.error("%s", e)

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
        if getattr(self, "emergency", None) is not None:
            self.emergency.close()
