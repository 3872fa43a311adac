"""The background writer on its own: one job at a time, errors kept, abandon."""

from __future__ import annotations

import os
import threading
import time

import pytest

from safepoint.writer import BackgroundWriter, SaveAbandoned

DEADLINE = 30.0


def test_result_is_returned_after_wait() -> None:
    w = BackgroundWriter()
    w.submit(3, lambda: "done")
    pending = w.wait(DEADLINE)
    assert pending is not None and pending.done.is_set()
    assert pending.result == "done" and pending.step == 3
    assert not w.busy and w.take_failure() is None


def test_error_is_kept_until_taken() -> None:
    w = BackgroundWriter()

    def boom() -> None:
        raise RuntimeError("injected")

    w.submit(5, boom)
    w.wait(DEADLINE)
    failed = w.take_failure()
    assert failed is not None and isinstance(failed.error, RuntimeError)
    assert failed.step == 5
    assert w.take_failure() is None  # raised once, not twice


def test_second_submit_while_busy_is_refused() -> None:
    w = BackgroundWriter()
    release = threading.Event()
    w.submit(1, lambda: release.wait(DEADLINE))
    try:
        assert w.busy
        with pytest.raises(RuntimeError, match="already in flight"):
            w.submit(2, lambda: None)
    finally:
        release.set()
    w.wait(DEADLINE)
    assert not w.busy
    w.submit(2, lambda: None)
    assert w.wait(DEADLINE).done.is_set()


def test_abandon_stops_a_job_that_checks() -> None:
    w = BackgroundWriter()
    started = threading.Event()

    def job() -> None:
        started.set()
        while True:  # a writer loop: checks between chunks
            w.check_abandon()
            threading.Event().wait(0.001)

    w.submit(7, job)
    assert started.wait(DEADLINE)
    assert w.abandon(timeout=DEADLINE)
    pending = w.wait(0)
    assert pending is not None and isinstance(pending.error, SaveAbandoned)


def test_stop_joins_the_thread_and_a_later_submit_restarts_it() -> None:
    w = BackgroundWriter(name="safepoint-writer-test")
    w.submit(1, lambda: 1)
    w.wait(DEADLINE)
    w.stop()
    assert not [t for t in threading.enumerate() if t.name == "safepoint-writer-test"]
    w.submit(2, lambda: 2)
    assert w.wait(DEADLINE).result == 2
    w.stop()


def test_a_held_job_waits_for_release_or_any_wait() -> None:
    """``held``: the writer thread is not even woken until the save call is over
    (``release``); a wait for the job, or an abandon, hands it over too: never a hang."""
    w = BackgroundWriter()
    ran = threading.Event()
    pending = w.submit(1, lambda: ran.set() or "ok", held=True)
    assert w.busy and not ran.wait(0.2)  # held: not started
    w.release()
    w.release()  # idempotent: one run
    assert pending.wait(5) and pending.result == "ok" and ran.is_set()

    pending = w.submit(2, lambda: "waited", held=True)
    assert pending.wait(5) and pending.result == "waited"  # a wait releases it

    def job() -> None:
        w.check_abandon()

    pending = w.submit(3, job, held=True)
    assert w.abandon(5)  # released, then stopped at its first check
    assert isinstance(pending.error, SaveAbandoned)
    w.stop()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_the_writer_waits_under_sched_batch_and_works_under_the_normal_policy() -> None:
    """Woken for a job, the writer must not preempt the training thread (SCHED_BATCH
    while waiting), but must run the job at the normal policy: a whole small save kept in
    SCHED_BATCH took 155 ms to be durable instead of 10 (each I/O wake-up waited a tick)."""
    w = BackgroundWriter()
    try:
        w.submit(1, lambda: (threading.get_native_id(), os.sched_getscheduler(0)))
        pending = w.wait(DEADLINE)
        assert pending is not None
        tid, during = pending.result
        assert during == os.SCHED_OTHER
        deadline = time.monotonic() + DEADLINE
        while os.sched_getscheduler(tid) != os.SCHED_BATCH:  # set just after the job
            assert time.monotonic() < deadline, "the idle writer is not in SCHED_BATCH"
            time.sleep(0.001)
    finally:
        w.stop()
