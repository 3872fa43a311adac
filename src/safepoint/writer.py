"""The background writer: runs one save at a time on a thread while training goes on.

A thread, not a process, by measurement (``benchmarks/save_overhead.py --only writer``):
xxh3 hashing and ``os.write`` release the GIL (a Python ticker thread saw at most 2 ms
gaps while 256 MB were hashed), so a training step slowed down alike with a writer
thread (2.8x) and a writer process (2.8x) on 2 busy cores: the cost is CPU, not the
GIL. A process would also need the staging buffers in shared memory. Priority trades
step speed for write time: see ``WRITER_NICE``; waking the writer must not preempt the
training thread: see ``WRITER_BATCH``. Tensor files go out with ``O_DIRECT``
(``safepoint.directio``): the writer thread then used 0.15 CPU s per GB instead of
1.03 through the page cache, and a step next to it slowed 1.34x instead of 1.87x
(``save_overhead.py --only writer``, 2 loaded cores). Numbers: benchmarks/README.md.

Invariants:
- at most one save is in flight; ``submit`` refuses a second one;
- an error of a save is kept and handed back by ``wait``/``take_failure``, never lost;
- only the writer thread touches the store while a save is in flight.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from safepoint.errors import ConfigError, SaveFailedError
from safepoint.fence import OptimizerFence, owned_storages
from safepoint.memory import available_memory
from safepoint.records import RunRecord
from safepoint.snapshot import Snapshot, TensorFile
from safepoint.staging import StagingBuffers
from safepoint.units import format_size

log = logging.getLogger("safepoint")

WRITER_NICE = int(os.environ.get("SAFEPOINT_WRITER_NICE", "0"))
"""Nice increment of the writer thread (``SAFEPOINT_WRITER_NICE``). 0 by measurement:
a niced writer leaves more CPU to training but on 2 saturated cores it then needed
4-7 s for 1 GB instead of ~2 s, longer than 5 steps, so the next save waited for it
(stall 1.6 s instead of 0.08 s; benchmarks/README.md)."""


WRITER_BATCH = os.environ.get("SAFEPOINT_WRITER_BATCH", "1") != "0"
"""Wait for a job under ``SCHED_BATCH`` (Linux; ``SAFEPOINT_WRITER_BATCH=0``: not): a
thread of that policy, woken up, never preempts a running one. Without it the writer,
woken as the save call returned, took a core from the training thread on 2 busy cores
(torch's OpenMP threads spin on the other) and then held the GIL: a LoRA save call took
2.3 ms instead of 1.1. It runs each job under the normal policy again: kept in
``SCHED_BATCH``, each of a small save's ~20 wake-ups (a write done, an fsync done) waited
for a scheduler tick, and the save took 155 ms to become durable instead of 10
(``save_overhead.py --only lora``, rows "async" and "async, writer SCHED_OTHER")."""


class SaveAbandoned(Exception):
    """Raised inside the writer to stop a save that ``abandon()`` gave up on."""


@dataclass
class PendingSave:
    """One save handed to the writer. ``result`` or ``error`` is set once ``done``."""

    step: int
    submitted: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    release: Callable[[], None] | None = None
    """Of a job submitted ``held``: hands it to the writer thread (once)."""

    @property
    def failed(self) -> bool:
        return self.done.is_set() and self.error is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Hand it to the writer if it is held, then wait until it finished (True) or
        ``timeout`` passed (False)."""
        if self.release is not None:
            self.release()
        return self.done.wait(timeout)


class BackgroundWriter:
    """Runs save jobs one at a time on a daemon thread, started at the first save.

    One long-lived thread rather than one per save: starting a thread on 2 busy cores
    took ~10 ms, a visible part of a LoRA save's stall. A daemon thread so that a process
    that must end (a second Ctrl-C, ``sys.exit`` from a signal handler) is never held up
    by a save; a save cut off that way leaves only a staging folder, which the next
    start sweeps: the rename is the commit.
    """

    def __init__(self, name: str = "safepoint-writer") -> None:
        self.name = name
        self._pending: PendingSave | None = None
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[tuple[PendingSave, Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._abandon = threading.Event()

    @property
    def busy(self) -> bool:
        """True while a save is being written."""
        return self._pending is not None and not self._pending.done.is_set()

    @property
    def pending(self) -> PendingSave | None:
        """The last save submitted (running or finished and not yet taken)."""
        return self._pending

    def submit(self, step: int, job: Callable[[], Any], *, held: bool = False) -> PendingSave:
        """Start ``job`` in the background. Raises ``RuntimeError`` if a save is in flight.

        ``held``: not yet; ``release()`` (or any wait for it) starts it. A save call
        holds its job until it returns: started at once, the job's Python work (encoding
        the deferred files, the record) took the GIL from the rest of the call, 2.4 ms
        instead of 1.0 for a LoRA save on a busy machine."""
        if self.busy:
            raise RuntimeError("a save is already in flight; wait() for it first")
        self._abandon.clear()
        pending = PendingSave(step)
        self._pending = pending
        if held:
            once = threading.Lock()

            def release() -> None:
                if once.acquire(blocking=False):
                    pending.release = None
                    self._start(pending, job)

            pending.release = release
        else:
            self._start(pending, job)
        return pending

    def release(self) -> None:
        """Start the held job, if any (idempotent)."""
        pending = self._pending
        if pending is not None and pending.release is not None:
            pending.release()

    def _start(self, pending: PendingSave, job: Callable[[], Any]) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
            atexit.register(self.stop)  # a Checkpointer never closed: still end cleanly
        self._jobs.put((pending, job))

    def _run(self) -> None:
        policy = _Policy()
        while True:
            policy.wait()
            if (item := self._jobs.get()) is None:
                return
            policy.work()
            pending, job = item
            try:
                pending.result = job()
            except BaseException as e:  # kept and raised in the training thread
                pending.error = e
            finally:
                pending.finished = time.perf_counter()
                pending.done.set()

    def stop(self, timeout: float | None = 10.0) -> None:
        """End the thread once its current job is done (the next submit starts a new one).

        Joins it: a thread still alive when the interpreter exits can abort the process
        ("terminate called without an active exception", seen with torch)."""
        thread, self._thread = self._thread, None
        atexit.unregister(self.stop)
        if thread is not None:
            self._jobs.put(None)
            if thread is not threading.current_thread():
                thread.join(timeout)

    def wait(self, timeout: float | None = None) -> PendingSave | None:
        """Wait for the save in flight (if any); return it, finished, or None if none.

        Returns the unfinished save if ``timeout`` passes first. Does not raise the
        save's error: see ``take_failure``.
        """
        pending = self._pending
        if pending is None:
            return None
        pending.wait(timeout)
        return pending

    def take_failure(self) -> PendingSave | None:
        """The finished save if it failed (and forget it), else None."""
        pending = self._pending
        if pending is not None and pending.failed:
            self._pending = None
            return pending
        return None

    def check_abandon(self) -> None:
        """Called by the job between chunks: raises ``SaveAbandoned`` after ``abandon``."""
        if self._abandon.is_set():
            raise SaveAbandoned("the save was abandoned")

    def abandon(self, timeout: float | None = 10.0) -> bool:
        """Stop the save in flight at its next chunk; its staging folder is removed.

        A save already past its last chunk still commits (it is then complete). Returns
        True if no save is running any more when this returns.
        """
        if not self.busy:
            return True
        self._abandon.set()
        pending = self.wait(timeout)
        return pending is None or pending.done.is_set()


class _Policy:
    """The writer thread's scheduling: ``SCHED_BATCH`` while it waits for a job, the
    normal policy while it runs one (``WRITER_BATCH``), at nice ``WRITER_NICE``. Linux
    sets both per thread; elsewhere this does nothing. A refusal (a seccomp profile) only
    costs speed: it is logged and that setting left alone."""

    def __init__(self) -> None:
        self.tid = threading.get_native_id()
        self.batch = WRITER_BATCH and hasattr(os, "SCHED_BATCH")
        if WRITER_NICE:
            try:
                os.setpriority(os.PRIO_PROCESS, self.tid, WRITER_NICE)
            except OSError as e:
                log.info("safepoint writer: nice %d refused (%s)", WRITER_NICE, e)

    def wait(self) -> None:
        if self.batch:
            self._set(os.SCHED_BATCH)

    def work(self) -> None:
        if self.batch:
            self._set(os.SCHED_OTHER)

    def _set(self, policy: int) -> None:
        try:
            os.sched_setscheduler(self.tid, policy, os.sched_param(0))
        except OSError as e:
            self.batch = False
            log.info("safepoint writer: scheduling policy %d refused (%s)", policy, e)


# ------------------------------------------------------------------- the async engine


class AsyncSaver:
    """The background half of a ``Checkpointer``: stage to host memory, write on a thread.

    Owns the writer and the reusable staging buffers; the Checkpointer decides what to
    save and supplies the commit job. Only the training thread calls these methods.
    """

    def __init__(
        self,
        directory: Path,
        record: RunRecord,
        *,
        on_busy: Literal["wait", "skip"] = "wait",
        reserve_bytes: int = 512 << 20,
        copy_free: bool = False,
    ) -> None:
        if on_busy not in ("wait", "skip"):
            raise ConfigError(f"on_busy={on_busy!r}: use 'wait' or 'skip'")
        self.directory = directory
        self.record = record
        self.on_busy = on_busy
        self.reserve_bytes = reserve_bytes
        """Free RAM to leave untouched; below it, saves go in-line instead of staged."""
        self.writer = BackgroundWriter()
        self.buffers = StagingBuffers()
        self.fence = OptimizerFence() if copy_free else None
        """Copy-free saves (``safepoint.fence``): the tensors optimizers own are not staged."""
        self._fence_waited = 0.0
        self._owned: tuple[Snapshot, set[int]] | None = None
        self.deferred: str | None = None
        self.reasons: dict[int, str] = {}
        self._short_of_memory = False

    def raise_failure(self) -> None:
        """Raise the failure of the last background save, if it failed (once)."""
        failure = self.take_failure()
        if failure is not None:
            raise failure[1]

    def take_failure(self) -> tuple[int, SaveFailedError, str] | None:
        """(step, error, reason) of the last background save if it failed (once)."""
        pending = self.writer.take_failure()
        if pending is None or isinstance(pending.error, SaveAbandoned):
            return None
        return (
            pending.step,
            as_save_failed(pending, self.directory),
            self.reasons.get(pending.step, "scheduled"),
        )

    def due(self, step: int, reason: str | None, *, must: bool) -> str | None:
        """Apply ``on_busy`` to a due save: the reason to save now, or None (skipped)."""
        if reason is None and self.deferred is not None:
            reason = f"{self.deferred}, deferred while a save was in flight"
        if reason is None:
            return None
        if self.on_busy == "skip" and self.writer.busy and not must:
            if self.deferred is None:
                self.deferred = reason
            self.record.event("save_skipped", step=step, busy_step=self.writer.pending.step)
            return None
        self.deferred = None
        return reason

    def wait_idle(self, step: int) -> float:
        """Wait for the save in flight, if any; the seconds waited (recorded when > 0)."""
        if not self.writer.busy:
            return 0.0
        t0 = time.perf_counter()
        self.writer.wait()
        waited = time.perf_counter() - t0
        self.record.event("save_busy", step=step, action="wait", wait_s=round(waited, 6))
        return waited

    def fits(self, snapshot: Snapshot) -> bool:
        """True if host memory allows staging ``snapshot``; says so once when it does not."""
        need = self.buffers.missing_bytes(snapshot, live=self._live(snapshot))
        if need == 0:
            return True
        free, source = available_memory()  # a container's cgroup limit, not the host's
        ok = free - need >= self.reserve_bytes
        if not ok and not self._short_of_memory:
            log.warning(
                "not enough free memory for a background copy of checkpoint-%d (%s needed "
                "plus %s kept free, %s available by %s); saving in-line, training waits for "
                "the disk",
                snapshot.step,
                format_size(need),
                format_size(self.reserve_bytes),
                format_size(free),
                source,
            )
            self.record.event(
                "async_fallback", step=snapshot.step, need=need, free=free, limit=source
            )
        self._short_of_memory = not ok
        if not ok:
            self.buffers.release()
        return ok

    def start(
        self,
        snapshot: Snapshot,
        job: Callable[[Snapshot, Callable[[], None]], Any],
    ) -> Snapshot:
        """Stage ``snapshot`` (a true copy) and run ``job(staged, abort)`` in the background.

        The caller must have waited for the previous save (``wait_idle``).
        """
        self._record_fence_wait(snapshot.step)
        staged = self.buffers.stage(snapshot, live=self._live(snapshot))
        self._owned = None
        self.reasons = {snapshot.step: snapshot.reason}  # for on_save_error, if it fails
        live = [
            (f"{fname}: {name}", t)
            for fname, content in staged.files.items()
            if isinstance(content, TensorFile) and content is snapshot.files[fname]
            for name, t in content.tensors.items()
        ]  # the tensors not copied (copy_free): optimizer.step() waits for them
        fence = self.fence if live else None
        if fence is not None:
            fence.hold(live)
            staged.fence = fence

        def run() -> Any:
            try:
                self.buffers.ready()
                return job(staged, self.writer.check_abandon)
            finally:
                if fence is not None:  # whatever happened: training must not stay held
                    fence.release()

        self.writer.submit(snapshot.step, run, held=True)  # Saver.go releases it
        return staged

    def _live(self, snapshot: Snapshot) -> set[int] | None:
        """Storages a copy-free save writes as they are (None: copy everything); found
        once per snapshot (``fits`` and ``start`` both ask)."""
        if self.fence is None or not snapshot.optimizers:
            return None
        if self._owned is None or self._owned[0] is not snapshot:
            self._owned = (snapshot, owned_storages(snapshot.optimizers))
        return self._owned[1]

    def _record_fence_wait(self, step: int) -> None:
        if self.fence is not None and self.fence.waited_s > self._fence_waited:
            waited = self.fence.waited_s - self._fence_waited
            self._fence_waited = self.fence.waited_s
            self.record.event("save_fence", step=step, wait_s=round(waited, 6))

    def close(self) -> None:
        """Wait for the save in flight (abandon it if interrupted); free the buffers."""
        try:
            self.writer.wait()
        finally:
            if self.writer.busy:  # interrupted while waiting (Ctrl-C): do not leave it running
                self.writer.abandon()
            self.writer.stop()
            self.buffers.release()
            if self.fence is not None:
                pending = self.writer.pending
                self._record_fence_wait(pending.step if pending else 0)
                self.fence.close()


def as_save_failed(pending: PendingSave, directory: Path) -> SaveFailedError:
    """The ``SaveFailedError`` to raise for a failed background save, cause attached."""
    error = pending.error
    if isinstance(error, SaveFailedError):
        return error
    failed = SaveFailedError(
        f"the background save of checkpoint-{pending.step} in {directory} failed "
        f"({type(error).__name__}: {error}); the previous checkpoints are intact"
    )
    failed.__cause__ = error
    return failed
