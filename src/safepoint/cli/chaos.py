"""``safepoint chaos``: crash-test a training command by killing it and resuming it.

Runs the command once uninterrupted, then again, killing it at N random instants spread
over the run (SIGKILL; with ``--signals`` every other kill is a SIGTERM that must end in
exit code 3) and rerunning it after each kill until it completes. Then it compares the
final artifact of both runs. ``{out}`` in the command and in ``--compare`` stands for
the run's output directory (one per run, under ``--workdir``).

Where the run resumed and how far it had got come from the safepoint run record of the
output directory; a command that keeps none is still killed and compared.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from safepoint.app.chaos_events import MODES, compare, file_events
from safepoint.errors import ConfigError
from safepoint.records import read_events
from safepoint.store import checkpoint_step, latest_checkpoint
from safepoint.units import format_table, parse_duration

_TERM_WAIT = 120.0  # seconds a SIGTERM'ed run may take to save and exit


@dataclass
class Attempt:
    """One run of the command in the chaos directory."""

    number: int
    kill_at: float | None  # seconds after launch, None: run to the end
    signal: str | None = None
    exit: str = ""
    resumed_from: int | None = None
    reached: int | None = None
    lost: int | None = None
    verdict: str = "ok"
    log: Path | None = None
    landed: bool = False  # killed after a checkpoint existed and before the end
    round: int = 1  # which fresh output directory (a run that ends early starts another)

    @property
    def failed(self) -> bool:
        return self.verdict != "ok"


def _substitute(command: tuple[str, ...], out: Path) -> list[str]:
    return [arg.replace("{out}", str(out)) for arg in command]


def _starts(out: Path) -> list[list[dict[str, Any]]]:
    """The run record of ``out`` split into one list of events per process."""
    runs: list[list[dict[str, Any]]] = []
    for event in read_events(out):
        if event["event"] == "start":
            runs.append([])
        if runs:
            runs[-1].append(event)
    return runs


def _progress(events: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """(step resumed from, last step reached) of one process's events."""
    resumed = next((e["step"] for e in events if e["event"] == "resume"), None)
    steps = [
        e["step"]
        for e in events
        if e["event"] in ("metrics", "save", "resume") and isinstance(e.get("step"), int)
    ]
    return resumed, max(steps) if steps else None


def _launch(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        try:
            # A session of its own: a kill reaches every process the command starts.
            return subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as e:
            raise ConfigError(f"cannot run {argv[0]!r} ({e.strerror}); check the command") from e


def _kill(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _run(
    argv: list[str], log: Path, out: Path, *, timeout: float
) -> tuple[int | None, float, float]:
    """Run to completion: (exit code or None on timeout, seconds, startup seconds).

    Startup: until the run record's ``start`` event, or else until the first file
    appears in ``out``: kills before that would only test the imports."""
    t0, wall0 = time.monotonic(), time.time()
    proc = _launch(argv, log)
    first: float | None = None
    rc: int | None = None
    while rc is None and time.monotonic() - t0 < timeout:
        try:
            rc = proc.wait(0.05)
        except subprocess.TimeoutExpired:
            if first is None and out.is_dir() and os.listdir(out):
                first = time.monotonic() - t0
    if rc is None:
        _kill(proc, signal.SIGKILL)
        proc.wait()
    duration = time.monotonic() - t0
    for event in read_events(out):
        if event["event"] == "start" and isinstance(event.get("t"), (int, float)):
            first = min(max(float(event["t"]) - wall0, 0.0), duration)
            break
    return rc, duration, first or 0.0


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

    def jitter(self) -> float:
        """Seconds into the next step: a kill lands anywhere inside a step, not only at
        its boundary (the reference run's step time; reproducible per kill)."""
        assert self.total
        return random.Random(self.fraction).uniform(0, self.span / self.total)


def _wait(
    proc: subprocess.Popen[bytes], out: Path, before: int, kill: Kill | None, timeout: float
) -> tuple[int | None, float | None]:
    """(exit code, None) once ``proc`` ends, or (None, seconds since launch) when it is
    time to kill it, or (None, None) on timeout."""
    t0, wall0 = time.monotonic(), time.time()
    due = None
    while True:
        try:
            return proc.wait(0.05), None
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now - t0 > timeout:
            return None, None
        if kill is None:
            continue
        if due is None and kill.total and out.is_dir():
            # By the attempt's own progress, not the reference run's clock: on a loaded
            # machine the attempts run slower and timed kills landed before any
            # checkpoint. Due once this process's record reaches the kill's step.
            runs = _starts(out)
            reached = _progress(runs[-1])[1] if len(runs) > before else None
            if reached is not None and reached >= kill.step:
                due = now + kill.jitter()
        elif due is None and not kill.total and _wrote_since(out, wall0):
            due = now + kill.after  # this process has begun to write its output
        if due is not None and now >= due:
            return None, now - t0


def _wrote_since(out: Path, since: float) -> bool:
    try:
        with os.scandir(out) as entries:
            return any(e.stat(follow_symlinks=False).st_mtime >= since for e in entries)
    except OSError:
        return False


def _deliver(proc: subprocess.Popen[bytes], a: Attempt, sig: signal.Signals) -> None:
    """Kill the attempt with ``sig``; a SIGTERM must end it with exit code 3 (or 0)."""
    _kill(proc, sig)
    try:
        rc = proc.wait(_TERM_WAIT if sig == signal.SIGTERM else 60)
    except subprocess.TimeoutExpired:
        _kill(proc, signal.SIGKILL)
        proc.wait()
        a.exit, a.verdict = "hung", f"FAIL: still running {_TERM_WAIT:g} s after {sig.name}"
        return
    a.exit = "killed" if rc == -signal.SIGKILL else str(rc)
    if rc not in ((3, 0) if sig == signal.SIGTERM else (-sig, 0)):
        a.verdict = f"FAIL: exit {rc} after {sig.name}: {_last_line(a.log)}"


def _attempt(
    number: int, argv: list[str], out: Path, logs: Path, kill: Kill | None, timeout: float
) -> Attempt:
    a = Attempt(number, None)
    a.log = logs / f"attempt-{number}.log"
    before = len(_starts(out)) if out.is_dir() else 0
    proc = _launch(argv, a.log)
    rc, at = _wait(proc, out, before, kill, timeout)
    if rc is None and at is not None and kill is not None:
        a.kill_at, a.signal = at, kill.sig.name.removeprefix("SIG")
        # Counts only between the first checkpoint and the last: a kill before any
        # checkpoint or after the final one tests no resume.
        newest = latest_checkpoint(out, deep=False)
        done = checkpoint_step(newest.name) if newest is not None else None
        a.landed = done is not None and (kill.total is None or done < kill.total)
        _deliver(proc, a, kill.sig)
        a.landed = a.landed and not a.exit.startswith("0")
    elif rc is None:
        _kill(proc, signal.SIGKILL)
        proc.wait()
        a.exit, a.verdict = "timeout", f"FAIL: did not finish within {timeout:.0f} s"
    else:
        a.exit = "0" if rc == 0 else str(rc)
        if rc == 0 and kill is not None:
            a.exit = "0 (done before the kill)"
        elif rc != 0:
            a.verdict = f"FAIL: exit {rc}: {_last_line(a.log)}"
    runs = _starts(out) if out.is_dir() else []
    closed = False
    if len(runs) > before:
        a.resumed_from, a.reached = _progress(runs[-1])
        if a.resumed_from is None and a.reached is not None:
            a.resumed_from = 0  # it trained without resuming: a fresh start
        # else it was stopped before it chose where to resume from: unknown, not step 0
        closed = any(e["event"] == "close" for e in runs[-1])
    early_or_late = a.reached == a.resumed_from or closed
    if a.signal == "TERM" and a.exit == str(-signal.SIGTERM) and early_or_late:
        a.verdict = "ok"  # before its handlers were in place, or after training: nothing to save
    return a


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no output)"


# ------------------------------------------------------------------------- command


_MAX_ROUNDS = 3  # fresh output directories tried when a run ends before its kills land


@dataclass
class _Timing:
    duration: float  # seconds of the uninterrupted run
    startup: float  # of which before training
    span: float
    total: int | None  # steps of the uninterrupted run; None: no run record


def _random_kills(
    *,
    argv_for: Any,
    runs: list[Path],
    logs: Path,
    ref: Path,
    kills: int,
    fractions: list[float],
    seed: int,
    use_signals: bool,
    timing: _Timing,
    limit: float,
    pattern: str | None,
) -> tuple[list[Attempt], bool]:
    """Kill and rerun until ``kills`` kills landed after a checkpoint and before the end
    (a run that ends first is compared, then another starts in a fresh directory); then
    the last one runs to the end. Prints the table; returns (attempts, passed)."""
    rng = random.Random(seed)
    attempts: list[Attempt] = []
    landed, round_, previous = 0, 0, 0.0
    run, pending = runs[0], list(fractions)
    ok, compared = True, False
    last = 2 * kills + 3  # attempts in all; the last one runs to the end unkilled
    for number in range(1, last + 1):
        kill = None
        if landed < kills and number < last:
            f = pending.pop(0) if pending else _later(rng, run, timing.total, previous)
            sig = signal.SIGTERM if use_signals and number % 2 == 0 else signal.SIGKILL
            gap = max(f - previous, 0.01) * (timing.duration - timing.startup)
            kill = Kill(f, sig, timing.span, timing.total, after=gap)
            previous = f
        a = _attempt(number, argv_for(run), run, logs, kill, limit)
        a.round = round_ + 1
        attempts.append(a)
        landed += a.landed
        click.echo(f"  attempt {number}: {a.exit or 'done'}{'' if a.landed else ' (not counted)'}")
        if a.failed:
            ok = False
            break
        if not a.exit.startswith("0"):
            continue
        same, lines = compare(pattern, ref, run)  # this directory's run is complete
        for line in lines:
            click.echo(f"{line} [{run.name}]")
        compared, ok = True, ok and same
        round_ += 1
        if not same or landed >= kills or round_ >= len(runs):
            break
        click.echo(
            f"chaos: the run ended with {landed} of {kills} kills landed; again in {runs[round_]}"
        )
        run, previous = runs[round_], 0.0
        pending = kill_plan(kills - landed, seed + round_)
    for r in range(1, round_ + 2):
        _judge([a for a in attempts if a.round == r])
    ok = ok and not any(a.failed for a in attempts)
    for line in _table(attempts):
        click.echo(line)
    if not attempts or not attempts[-1].exit.startswith("0"):
        click.echo(f"chaos: the run did not complete; logs in {logs}")
        ok = False
    elif landed < kills:
        click.echo(
            f"chaos: only {landed} of {kills} kills landed after a checkpoint and before the "
            "end; lengthen the run, save more often or ask fewer --kills"
        )
        ok = False
    elif kills and not any(a.resumed_from for a in attempts):
        click.echo("chaos: no attempt resumed from a checkpoint: no resume was tested")
        ok = False
    return attempts, ok and compared


def _later(rng: random.Random, run: Path, total: int | None, previous: float) -> float:
    """A kill instant (fraction of the run) past the newest checkpoint of ``run``."""
    newest = latest_checkpoint(run, deep=False) if run.is_dir() else None
    done = (checkpoint_step(newest.name) or 0) / total if newest and total else previous
    low = min(max(done, previous) + 0.02, 0.95)
    return rng.uniform(low, max(low, 0.97))


def _table(attempts: list[Attempt]) -> list[str]:
    head = ("#", "kill at", "signal", "counts", "exit", "resumed from", "reached", "steps lost")
    head += ("verdict",)
    rows = [
        (
            str(a.number),
            "-" if a.kill_at is None else f"{a.kill_at:.1f} s",
            a.signal or "-",
            "yes" if a.landed else "-",
            a.exit,
            "?" if a.resumed_from is None else str(a.resumed_from or "start"),
            "?" if a.reached is None else str(a.reached),
            "?" if a.lost is None else str(a.lost),
            a.verdict,
        )
        for a in attempts
    ]
    return format_table(head, rows)


def _judge(attempts: list[Attempt]) -> None:
    """Steps lost per kill, and a verdict on each resume.

    An attempt stopped before it chose where to resume from (``resumed_from`` None: in
    its imports, or before its restore) says nothing about the one before it: each
    attempt that got somewhere is judged against the next one that resumed."""
    for i, prev in enumerate(attempts):
        if prev.reached is None:
            continue
        nxt = next(
            (i + 1 + j for j, x in enumerate(attempts[i + 1 :]) if x.resumed_from is not None), None
        )
        if nxt is None:
            continue
        a = attempts[nxt]
        prev.lost = max(prev.reached - a.resumed_from, 0)  # type: ignore[operator]
        earlier = [x.resumed_from for x in attempts[:nxt] if x.resumed_from]
        if earlier and a.resumed_from < max(earlier) and not a.failed:  # type: ignore[operator]
            a.verdict = f"FAIL: resumed from step {a.resumed_from}, older than {max(earlier)}"
        if prev.signal == "TERM" and prev.exit == "3" and prev.lost and not prev.failed:
            prev.verdict = f"FAIL: {prev.lost} steps lost after SIGTERM (no emergency save)"


@click.command(
    "chaos",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--kills",
    default=5,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="How many times to kill the run.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the kill instants.")
@click.option(
    "--compare",
    "pattern",
    help="Artifact to compare, e.g. '{out}/checkpoint-*/adapter_model.safetensors' (the "
    "last match); default: the newest checkpoint's tensor files.",
)
@click.option("--signals", "use_signals", is_flag=True, help="Every other kill is a SIGTERM.")
@click.option(
    "--file-events",
    is_flag=True,
    help="Crash at every file event of the run's saves instead of at random instants.",
)
@click.option(
    "--modes",
    default="kill,torn,term",
    show_default=True,
    help="With --file-events: kill (SIGKILL before the event), torn (half a write, then "
    "SIGKILL), term (SIGTERM at the event, SIGKILL after --grace).",
)
@click.option(
    "--sample",
    type=click.IntRange(1, None),
    help="With --file-events: K points per mode spread evenly over the events (default all); "
    "with --power-cut: K cut points.",
)
@click.option(
    "--grace",
    "grace_text",
    default="10s",
    show_default=True,
    help="With --file-events: SIGKILL this long after a SIGTERM.",
)
@click.option(
    "--power-cut",
    is_flag=True,
    help="Cut the power (a FUSE file system that forgets what was not fsync'ed) before "
    "every file event of the run (--sample K of them) and at --kills random instants; "
    "needs fuse3 and safepoint[chaos].",
)
@click.option(
    "--samples",
    default=1,
    show_default=True,
    type=click.IntRange(0, 100),
    help="With --power-cut: reordered samples per cut, besides the strict one.",
)
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep both runs here.")
@click.option("--timeout", "timeout_text", help="Per run (default: 3x the first run + 60s).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def chaos_cmd(
    kills: int,
    seed: int,
    pattern: str | None,
    use_signals: bool,
    file_events: bool,
    modes: str,
    sample: int | None,
    grace_text: str,
    power_cut: bool,
    samples: int,
    workdir: str | None,
    timeout_text: str | None,
    command: tuple[str, ...],
) -> int:
    """Crash-test COMMAND: kill it at random instants, resume it, compare the results.

    Put {out} where COMMAND takes its output directory, e.g.

    \b
        safepoint chaos --kills 5 -- safepoint train --max-steps 30 --output-dir {out}

    Exit code 0: every resume worked and the results are the same; 1 otherwise.
    """
    if not any("{out}" in arg for arg in command):
        raise ConfigError(
            "put {out} where the command takes its output directory, e.g. "
            "safepoint chaos -- safepoint train --output-dir {out}"
        )
    # Every check before the first directory is made: a refused command leaves nothing.
    limit = None if timeout_text is None else parse_duration(timeout_text, what="--timeout")
    if workdir:
        for d in (Path(workdir) / "reference", Path(workdir) / "chaos"):
            if d.exists():
                raise ConfigError(f"{d} already exists; give an empty --workdir")
    try:
        work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="safepoint-chaos-"))
        ref, run, logs = work / "reference", work / "chaos", work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = f"--workdir {workdir}" if workdir else f"the temporary folder {e.filename}"
        raise ConfigError(
            f"{where}: cannot create it ({e.strerror}); give a writable --workdir"
        ) from None

    if power_cut:
        return _power_cut(command, work, sample, samples, kills, seed, limit, pattern, workdir)
    if file_events:
        return _file_events(command, work, modes, sample, grace_text, limit, pattern, workdir)
    click.echo(f"chaos: uninterrupted run in {ref}")
    rc, duration, startup = _run(
        _substitute(command, ref), logs / "reference.log", ref, timeout=limit or 3600
    )
    if rc != 0:
        raise ConfigError(
            f"the uninterrupted run failed ({'timeout' if rc is None else f'exit {rc}'}): "
            f"{_last_line(logs / 'reference.log')}; see {logs / 'reference.log'}"
        )
    limit = limit or 3 * duration + 60
    ref_runs = _starts(ref)
    total = _progress(ref_runs[-1])[1] if ref_runs else None
    fractions = kill_plan(kills, seed) if kills else []
    span = duration - startup if total else duration
    click.echo(f"chaos: {duration:.1f} s (startup {startup:.1f} s); {kills} kills in {run}")

    timing = _Timing(duration, startup, span, total or None)
    _, ok = _random_kills(
        argv_for=lambda out: _substitute(command, out),
        runs=[run, *(work / f"chaos-{n}" for n in range(2, _MAX_ROUNDS + 1))],
        logs=logs,
        ref=ref,
        kills=kills,
        fractions=fractions,
        seed=seed,
        use_signals=use_signals,
        timing=timing,
        limit=limit,
        pattern=pattern,
    )
    return _verdict(ok, work, workdir, kept="both runs")


def _file_events(
    command: tuple[str, ...],
    work: Path,
    modes_text: str,
    sample: int | None,
    grace_text: str,
    limit: float | None,
    pattern: str | None,
    workdir: str | None,
) -> int:
    modes = [m.strip() for m in modes_text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"--modes {modes_text}: use some of {','.join(MODES)}")
    grace = parse_duration(grace_text, what="--grace")
    ok = file_events(
        command,
        work,
        modes=modes,
        k=sample,
        grace=grace,
        timeout=limit,
        pattern=pattern,
        echo=click.echo,
    )
    return _verdict(ok, work, workdir, kept="runs and logs")


def _power_cut(
    command: tuple[str, ...],
    work: Path,
    sample: int | None,
    samples: int,
    kills: int,
    seed: int,
    limit: float | None,
    pattern: str | None,
    workdir: str | None,
) -> int:
    from safepoint.app.chaos_powercut import power_cut

    ok = power_cut(
        command,
        work,
        k=sample,
        samples=samples,
        kills=kills,
        seed=seed,
        timeout=limit,
        pattern=pattern,
        echo=click.echo,
    )
    return _verdict(ok, work, workdir, kept="runs, surviving states and logs")


COMMANDS = [chaos_cmd]


def _verdict(ok: bool, work: Path, workdir: str | None, *, kept: str) -> int:
    """Print PASS/FAIL; a passed run's own temporary folder goes, a failed one's stays."""
    click.echo(f"chaos: {'PASS' if ok else 'FAIL'}")
    if ok and workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    elif not ok:
        click.echo(f"chaos: {kept} kept in {work}")
    return 0 if ok else 1
