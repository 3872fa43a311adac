"""``safepoint chaos``: crash-test a training command by killing it and resuming it.

Runs the command once uninterrupted, then again, killing it at N random instants spread
over the run (SIGKILL; with ``--signals`` every other kill is a SIGTERM that must end in
exit code 3) and rerunning it after each kill until it completes. Then it compares the
final artifact of both runs. ``{out}`` in the command and in ``--compare`` stands for
the run's output directory (one per run, in the chaos folder).

Where the run resumed and how far it had got come from the safepoint run record of the
output directory; a command that keeps none is still killed and compared.

Also here, for every mode: the checks of the command and of ``--workdir`` and
``--modes``, and the chaos folder. The other modes: ``chaos_events`` (``--file-events``),
``chaos_powercut`` (``--power-cut``).
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from safepoint.app.chaos_attempts import WHY_NOT, Attempt, exit_said, judge, table
from safepoint.app.chaos_compare import compare
from safepoint.app.chaos_events import MODES
from safepoint.app.chaos_process import (
    Process,
    Runner,
    finish,
    kill,
    kill_group,
    last_line,
    processes,
    progress,
    step_seconds,
    watch,
)
from safepoint.errors import ConfigError
from safepoint.validity import checkpoint_step, latest_checkpoint

_TERM_WAIT = 120.0  # seconds a SIGTERM'ed run may take to save and exit
_MAX_ROUNDS = 6  # fresh output directories tried when a run ends before its kills land


def check_command(command: Sequence[str]) -> None:
    if not any("{out}" in arg for arg in command):
        raise ConfigError(
            "put {out} where the command takes its output directory, e.g. "
            "safepoint chaos -- safepoint train --output-dir {out}"
        )


def parse_modes(text: str) -> list[str]:
    """The ``--modes`` of ``--file-events``: some of ``MODES``, comma-separated."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise ConfigError(f"--modes {text}: use some of {','.join(MODES)}")
    return modes


def make_workdir(workdir: str | None) -> Path:
    """The chaos folder, with its ``logs``: ``workdir`` (holding no earlier chaos run)
    or a new temporary folder."""
    if workdir:
        for d in (Path(workdir) / "reference", Path(workdir) / "chaos"):
            if d.exists():
                raise ConfigError(f"{d} already exists; give an empty --workdir")
    try:
        work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="safepoint-chaos-"))
        (work / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = f"--workdir {workdir}" if workdir else f"the temporary folder {e.filename}"
        raise ConfigError(
            f"{where}: cannot create it ({e.strerror}); give a writable --workdir"
        ) from None
    return work


def kill_plan(kills: int, seed: int) -> list[float]:
    """N kill instants as fractions of the run, one at random in each N-th of it."""
    rng = random.Random(seed)
    return [(k + rng.uniform(0.05, 0.95)) / kills for k in range(kills)]


@dataclass
class Kill:
    """When and how to kill one attempt.

    A safepoint run (one with a run record) is killed ``fraction`` of the way through
    the training, by steps: once the attempt's own record reaches that step, after a
    random part of a step, so kills stay spread over the run however slow the machine
    is and however much each restart costs. Any other command is
    killed ``after`` seconds (the gap since the previous instant) from the moment it
    first writes into its output directory.
    """

    fraction: float
    sig: signal.Signals
    span: float  # seconds of training in the uninterrupted run (or its whole duration)
    total: int | None  # steps of the uninterrupted run; None: no run record
    after: float = 0.0  # seconds after its first write, for a command without a record

    @property
    def step(self) -> int:
        """The step after which this kill is due (a run with a record). At most 85% of
        the run: progress is seen at the record's logging steps, and a kill due later
        tends to find the run already saving its final checkpoint (it would not count)."""
        assert self.total
        return max(int(min(self.fraction, 0.85) * self.total), 1)

    def jitter(self, step_seconds: float | None) -> float:
        """Seconds into the next step: a kill lands anywhere inside a step, not only at
        its boundary (reproducible per kill). A step lasts ``step_seconds``, the
        attempt's own, else the reference run's: the two differed 40-fold when the
        reference ran beside other work, and a kill so late lands after the run."""
        assert self.total
        step = step_seconds if step_seconds is not None else self.span / self.total
        return random.Random(self.fraction).uniform(0, step)


@dataclass
class _Timing:
    duration: float  # seconds of the uninterrupted run
    startup: float  # of which before training
    span: float
    total: int | None  # steps of the uninterrupted run; None: no run record


# ----------------------------------------------------------------------- the run


def random_kills(
    command: Sequence[str],
    work: Path,
    *,
    kills: int = 5,
    seed: int = 0,
    use_signals: bool = False,
    timeout: float | None = None,
    pattern: str | None = None,
    echo: Callable[[str], None] = print,
) -> bool:
    """The whole random-kill test of ``command`` in ``work``; True if it passed."""
    runner = Runner(command, work, timeout or 3600)
    ref, run = work / "reference", work / "chaos"
    echo(f"chaos: uninterrupted run in {ref}")
    rc, duration, startup = _reference(runner, ref)
    if rc != 0:
        log = runner.logs / "reference.log"
        raise ConfigError(
            f"the uninterrupted run failed ({'timeout' if rc is None else f'exit {rc}'}): "
            f"{last_line(log)}; see {log}"
        )
    runner.timeout = timeout or 3 * duration + 60
    ref_runs = processes(ref)
    total = progress(ref_runs[-1])[1] if ref_runs else None
    span = duration - startup if total else duration
    echo(f"chaos: {duration:.1f} s (startup {startup:.1f} s); {kills} kills in {run}")
    return _kill_and_rerun(
        runner,
        [run, *(work / f"chaos-{n}" for n in range(2, _MAX_ROUNDS + 1))],
        ref,
        kills=kills,
        seed=seed,
        use_signals=use_signals,
        timing=_Timing(duration, startup, span, total or None),
        pattern=pattern,
        echo=echo,
    )


def _reference(runner: Runner, out: Path) -> tuple[int | None, float, float]:
    """Run to completion: (exit code or None on timeout, seconds, startup seconds).

    Startup: until the run record's ``start`` event, or else until the first file
    appears in ``out``: kills before that would only test the imports."""
    t0, wall0 = time.monotonic(), time.time()
    proc = runner.start(out, runner.logs / "reference.log")
    first: float | None = None

    def note_first_file() -> bool:
        nonlocal first
        if first is None and out.is_dir() and os.listdir(out):
            first = time.monotonic() - t0
        return False

    rc = watch(proc, t0 + runner.timeout, note_first_file)
    if rc is None:
        kill(proc)
    duration = time.monotonic() - t0
    starts = (run[0].get("t") for run in processes(out))
    start = next((t for t in starts if isinstance(t, (int, float))), None)
    if start is not None:
        first = min(max(float(start) - wall0, 0.0), duration)
    return rc, duration, first or 0.0


def _kill_and_rerun(
    runner: Runner,
    runs: list[Path],
    ref: Path,
    *,
    kills: int,
    seed: int,
    use_signals: bool,
    timing: _Timing,
    pattern: str | None,
    echo: Callable[[str], None],
) -> bool:
    """Kill and rerun until ``kills`` kills landed after a checkpoint and before the end
    (a run that ends first is compared, then another starts in a fresh directory); then
    the last one runs to the end. Prints the table; True if it passed."""
    rng = random.Random(seed)
    attempts: list[Attempt] = []
    landed, round_, previous = 0, 0, 0.0
    run, pending = runs[0], kill_plan(kills, seed) if kills else []
    ok, compared = True, False
    last = 2 * kills + 3  # attempts in all; the last one runs to the end unkilled
    for number in range(1, last + 1):
        kill_ = None
        if landed < kills and number < last:
            f = pending.pop(0) if pending else _later(rng, run, timing.total, previous)
            sig = signal.SIGTERM if use_signals and number % 2 == 0 else signal.SIGKILL
            gap = max(f - previous, 0.01) * (timing.duration - timing.startup)
            kill_ = Kill(f, sig, timing.span, timing.total, after=gap)
            previous = f
        a = _attempt(runner, number, run, kill_)
        a.round = round_ + 1
        attempts.append(a)
        landed += a.landed
        why = f" (not counted: {WHY_NOT[a.why_not]})" if a.why_not else ""
        echo(f"  attempt {number}: {exit_said(a.exit) or 'done'}{why}")
        if a.failed:
            ok = False
            break
        if not (a.exit.startswith("0") or _finished(run, timing.total)):
            continue
        # this directory's run is complete (a kill that lands after its final checkpoint
        # finds it complete too: more attempts in it could never land a counted kill)
        same, lines = compare(pattern, ref, run)
        for line in lines:
            echo(f"{line} [{run.name}]")
        compared, ok = True, ok and same
        round_ += 1
        if not same or landed >= kills or round_ >= len(runs):
            break
        echo(f"chaos: the run ended with {landed} of {kills} kills landed; again in {runs[round_]}")
        run, previous = runs[round_], 0.0
        pending = kill_plan(kills - landed, seed + round_)
    for r in range(1, round_ + 2):
        judge([a for a in attempts if a.round == r])
    ok = ok and not any(a.failed for a in attempts)
    for line in table(attempts, kills):
        echo(line)
    if not attempts or not (attempts[-1].exit.startswith("0") or _finished(run, timing.total)):
        echo(f"chaos: the run did not complete; logs in {runner.logs}")
        ok = False
    elif landed < kills:
        echo(
            f"chaos: only {landed} of {kills} kills landed after a checkpoint and before the "
            "end; lengthen the run, save more often or ask fewer --kills"
        )
        ok = False
    elif kills and not any(a.resumed_from for a in attempts):
        echo("chaos: no attempt resumed from a checkpoint: no resume was tested")
        ok = False
    return ok and compared


def _finished(run: Path, total: int | None) -> bool:
    """Whether ``run`` holds the final checkpoint of a run of ``total`` steps."""
    newest = latest_checkpoint(run, deep=False) if total and run.is_dir() else None
    return newest is not None and checkpoint_step(newest.name) == total


def _later(rng: random.Random, run: Path, total: int | None, previous: float) -> float:
    """A kill instant (fraction of the run) past the newest checkpoint of ``run``."""
    newest = latest_checkpoint(run, deep=False) if run.is_dir() else None
    done = (checkpoint_step(newest.name) or 0) / total if newest and total else previous
    low = min(max(done, previous) + 0.02, 0.95)
    return rng.uniform(low, max(low, 0.97))


# ------------------------------------------------------------------ one attempt


def _attempt(runner: Runner, number: int, out: Path, kill_: Kill | None) -> Attempt:
    log = runner.logs / f"attempt-{number}.log"
    a = Attempt(number, None, log=log)
    before = len(processes(out))
    proc = runner.start(out, log)
    rc, at = _wait(proc, out, before, kill_, runner.timeout)
    if rc is None and at is not None and kill_ is not None:
        a.kill_at, a.signal = at, kill_.sig.name.removeprefix("SIG")
        # Counts only between the first checkpoint and the last: a kill before any
        # checkpoint or after the final one tests no resume.
        newest = latest_checkpoint(out, deep=False)
        done = checkpoint_step(newest.name) if newest is not None else None
        if done is None:
            a.why_not = "no checkpoint"
        elif kill_.total is not None and done >= kill_.total:
            a.why_not = "after the end"
        _deliver(proc, a, kill_.sig, log)
        if a.exit.startswith("0") and not a.why_not:
            a.why_not = "ended first"
        a.landed = not a.why_not
    elif rc is None:
        kill(proc)
        a.exit, a.verdict = "timeout", f"FAIL: did not finish within {runner.timeout:.0f} s"
    else:
        a.exit = "0" if rc == 0 else str(rc)
        if rc == 0 and kill_ is not None:
            a.why_not = "ended first"
        elif rc != 0:
            a.verdict = f"FAIL: exit {rc}: {last_line(log)}"
    runs = processes(out)
    closed = False
    if len(runs) > before:
        a.resumed_from, a.reached = progress(runs[-1])
        if a.resumed_from is None and a.reached is not None:
            a.resumed_from = 0  # it trained without resuming: a fresh start
        # else it was stopped before it chose where to resume from: unknown, not step 0
        closed = any(e["event"] == "close" for e in runs[-1])
    early_or_late = a.reached == a.resumed_from or closed
    if a.signal == "TERM" and a.exit == str(-signal.SIGTERM) and early_or_late:
        a.verdict = "ok"  # before its handlers were in place, or after training: nothing to save
    return a


def _wait(
    proc: Process, out: Path, before: int, kill_: Kill | None, timeout: float
) -> tuple[int | None, float | None]:
    """(exit code, None) once ``proc`` ends, or (None, seconds since launch) when it is
    time to kill it, or (None, None) on timeout."""
    t0, wall0 = time.monotonic(), time.time()
    due: float | None = None
    at: float | None = None

    def time_to_kill() -> bool:
        nonlocal due, at
        assert kill_ is not None
        now = time.monotonic()
        if due is None and kill_.total and out.is_dir():
            # By the attempt's own progress, not the reference run's clock: on a loaded
            # machine the attempts run slower and timed kills landed before any
            # checkpoint. Due once this process's record reaches the kill's step.
            runs = processes(out)
            reached = progress(runs[-1])[1] if len(runs) > before else None
            if reached is not None and reached >= kill_.step:
                due = now + kill_.jitter(step_seconds(runs[-1]))
        elif due is None and not kill_.total and _wrote_since(out, wall0):
            due = now + kill_.after  # this process has begun to write its output
        if due is not None and now >= due:
            at = now - t0
        return at is not None

    rc = watch(proc, t0 + timeout, None if kill_ is None else time_to_kill)
    return rc, at


def _wrote_since(out: Path, since: float) -> bool:
    try:
        with os.scandir(out) as entries:
            return any(e.stat(follow_symlinks=False).st_mtime >= since for e in entries)
    except OSError:
        return False


def _deliver(proc: Process, a: Attempt, sig: signal.Signals, log: Path) -> None:
    """Kill the attempt with ``sig``; a SIGTERM must end it with exit code 3 (or 0)."""
    kill_group(proc, sig)
    rc = finish(proc, time.monotonic() + (_TERM_WAIT if sig == signal.SIGTERM else 60))
    if rc is None:
        a.exit, a.verdict = "hung", f"FAIL: still running {_TERM_WAIT:g} s after {sig.name}"
        return
    a.exit = "killed" if rc == -signal.SIGKILL else str(rc)
    if rc not in ((3, 0) if sig == signal.SIGTERM else (-sig, 0)):
        a.verdict = f"FAIL: exit {rc} after {sig.name}: {last_line(log)}"
