"""``safepoint chaos --file-events``: crash a command at every file event of its saves.

A fault-free run of the command counts the file events under its output directory
(numbered 1..N: ``chaos_hook`` lists what counts). Then each point (k, mode) is a fresh
run stopped at the k-th event:

- ``kill``: SIGKILL just before the event;
- ``torn``: (write events only) half of the data written, then SIGKILL;
- ``term``: SIGTERM at the event, SIGKILL ``grace`` seconds later if still running; the
  run must exit with 3 (an emergency checkpoint, nothing lost) or finish (0).

The same command is then rerun, plain. It must resume from the newest committed
checkpoint left by the crash (what it prints: ``resuming from <path> (step N)``), or
start from scratch when there is none, and end with the same final artifacts as the
fault-free run, bit for bit. A point passes only then; the whole passes only if every
point passes and at least one resumed from a checkpoint.

The child processes: ``chaos_process``; comparing the artifacts: ``chaos_compare``.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from safepoint.app.chaos_compare import compare
from safepoint.app.chaos_process import (
    Process,
    Runner,
    exit_text,
    finish,
    last_line,
    last_process,
    progress,
    resumed_from,
    watch,
)
from safepoint.errors import ConfigError
from safepoint.units import format_table
from safepoint.validity import checkpoint_step, latest_checkpoint

MODES = ("kill", "torn", "term")
_RANDOM_SUFFIX = re.compile(r"(/?\.[^/]*?-)[0-9a-f]{8}(?=/|$)")  # .staging-checkpoint-5-1a2b3c4d


@dataclass(frozen=True)
class FileEvent:
    """One file event of the fault-free run: its number, kind and path (relative)."""

    number: int
    kind: str
    path: str
    nth: int = 1
    """Which occurrence of this kind and path it is: the point's target in a crash run.

    A run may write a few events the reference did not (a warning in the run record
    that depends on measured timing): numbering by (kind, path, nth) is not shifted by
    them, a global number would be."""

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"

    @property
    def target(self) -> str:
        """The hook's K: kind, occurrence and path, joined by the unit separator."""
        return f"{self.kind}\x1f{self.nth}\x1f{self.path}"


@dataclass
class Point:
    """One crash point: a run stopped at ``event`` in ``mode``, then a plain rerun."""

    event: FileEvent
    mode: str
    exit: str = ""
    expected: str = "start"  # the newest committed checkpoint after the crash
    resumed: str = "start"  # what the rerun resumed from
    verdict: str = "ok"
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.verdict != "ok"

    def fail(self, why: str) -> None:
        if not self.failed:
            self.verdict = f"FAIL: {why}"


def normalized(path: str) -> str:
    """``path`` with the random part of staging and trash folder names replaced by ``*``."""
    return _RANDOM_SUFFIX.sub(r"\1*", path)


def read_event_log(path: Path) -> list[FileEvent]:
    events = []
    seen: dict[tuple[str, str], int] = {}
    for line in path.read_text(errors="replace").splitlines():
        number, kind, rel = line.split("\t", 2)
        key = (kind, normalized(rel))
        seen[key] = seen.get(key, 0) + 1
        events.append(FileEvent(int(number), kind, key[1], seen[key]))
    return events


def parse_points(text: str) -> set[int]:
    """``--points``: event numbers and ranges, e.g. ``58-274`` or ``3,7,10-12``."""
    numbers: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        low, dash, high = part.partition("-")
        if not (low.isdigit() and (high.isdigit() if dash else True)) or int(low) < 1:
            raise ConfigError(f"--points {text}: use event numbers and ranges, e.g. 58-274")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ConfigError(f"--points {text}: the range {part} is empty")
        numbers.update(range(first, last + 1))
    return numbers


def sample(events: Sequence[FileEvent], k: int | None) -> list[FileEvent]:
    """``k`` events spread evenly over ``events`` (the middle of each k-th), or all of
    them when ``k`` is None or not smaller."""
    if k is None or k >= len(events):
        return list(events)
    return [events[(2 * i + 1) * len(events) // (2 * k)] for i in range(k)]


def points_for(
    events: Sequence[FileEvent],
    modes: Sequence[str],
    k: int | None,
    only: Collection[int] | None = None,
) -> list[Point]:
    """The crash points: for each mode, ``k`` of the events it applies to (of ``only``,
    event numbers, when given)."""
    points = []
    for mode in modes:
        eligible = [
            e
            for e in events
            if (mode != "torn" or e.kind == "write") and (only is None or e.number in only)
        ]
        points += [Point(e, mode) for e in sample(eligible, k)]
    return points


# ----------------------------------------------------------------------- the run


@dataclass
class Reference:
    """The fault-free run: its output folder and its file events."""

    out: Path
    events: list[FileEvent]
    seconds: float


def count_events(runner: Runner, out: Path, *, timeout: float) -> Reference:
    """Run the command fault-free with the hook counting; raises ``ConfigError`` if it fails."""
    log = runner.logs / "reference.log"
    event_log = runner.work / "reference.events"
    t0 = time.monotonic()
    proc = runner.start(out, log, f"count:0:{out}:{event_log}:{runner.work / 'unused'}")
    rc = finish(proc, t0 + timeout)
    if rc != 0:
        raise ConfigError(
            f"the fault-free run failed ({exit_text(rc)}): {last_line(log)}; see {log}"
        )
    events = read_event_log(event_log) if event_log.exists() else []
    if not events:
        raise ConfigError(
            f"the fault-free run made no file event under {out}: is {{out}} its output "
            "directory, and is it a Python program?"
        )
    return Reference(out, events, time.monotonic() - t0)


def run_point(
    runner: Runner, ref: Reference, point: Point, *, grace: float, pattern: str | None
) -> None:
    """Crash at ``point``, rerun plain, judge; fills in the point."""
    name = f"{point.mode}-{point.event.number}"
    out = runner.work / "points" / name
    fired = runner.work / "points" / f"{name}.fired"
    event_log = runner.work / "points" / f"{name}.events"
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{point.mode}:{point.event.target}:{out}:{event_log}:{fired}"
    log = runner.logs / f"{name}.crash.log"
    t0 = time.monotonic()
    proc = runner.start(out, log, spec)
    rc = _crash(proc, fired, point, grace=grace, deadline=t0 + runner.timeout)
    point.exit = exit_text(rc)
    if not fired.exists():
        point.fail(f"event {point.event.number} never came (exit {point.exit}); see {log}")
        return
    seen = fired.read_text(errors="replace").strip().split("\t")
    got = normalized(seen[2]) if len(seen) == 3 else "?"
    if len(seen) != 3 or (seen[1], got) != (point.event.kind, point.event.path):
        point.fail(f"event {point.event.number} was {' '.join(seen[1:])}: the run differs")
        return
    _judge_crash(point, rc, out, log)
    newest = latest_checkpoint(out) if out.is_dir() else None
    point.expected = newest.name if newest is not None else "start"
    _rerun(runner, ref, point, out, pattern)


def _crash(
    proc: Process, fired: Path, point: Point, *, grace: float, deadline: float
) -> int | None:
    if point.mode != "term":
        return finish(proc, deadline)
    rc = watch(proc, deadline, fired.exists, poll=0.02)
    if rc is not None:
        return rc
    if not fired.exists():
        return finish(proc, deadline)  # the deadline passed: killed
    rc = finish(proc, time.monotonic() + grace)  # the hook sent SIGTERM at the event
    if rc is None:
        point.notes.append(f"SIGKILL {grace:g} s after SIGTERM")
        return -signal.SIGKILL
    return rc


def _judge_crash(point: Point, rc: int | None, out: Path, log: Path) -> None:
    if point.mode != "term":
        if rc not in (-signal.SIGKILL, 0):
            point.fail(f"exit {point.exit} instead of being killed: {last_line(log)}")
        return
    process = last_process(out)
    trained = any(e["event"] == "metrics" for e in process)
    if rc == -signal.SIGTERM and trained:
        point.fail("SIGTERM ended it mid-training without a handler")
    elif rc == -signal.SIGKILL:
        point.fail(f"still running {point.notes[-1].split()[1]} s after SIGTERM")
    elif rc not in (0, 3, -signal.SIGTERM):
        point.fail(f"exit {point.exit} after SIGTERM: {last_line(log)}")
    elif rc == 3:
        reached = progress(process)[1] or 0
        newest = latest_checkpoint(out) if out.is_dir() else None
        saved = checkpoint_step(newest.name) or 0 if newest is not None else 0
        if saved < reached:
            point.fail(f"exit 3 but steps {saved + 1}-{reached} are lost (no emergency save)")


def _rerun(runner: Runner, ref: Reference, point: Point, out: Path, pattern: str | None) -> None:
    name = f"{point.mode}-{point.event.number}"
    log = runner.logs / f"{name}.rerun.log"
    rc = runner.wait(runner.start(out, log), runner.timeout)
    point.resumed = resumed_from(log.read_text(errors="replace"), out)
    if rc != 0:
        point.fail(f"rerun exit {exit_text(rc)}: {last_line(log)}")
    elif point.resumed != point.expected:
        point.fail(f"rerun resumed from {point.resumed}, not {point.expected}")
    else:
        same, lines = compare(pattern, ref.out, out)
        if not same:
            point.fail("; ".join(line for line in lines if "same" not in line) or "differs")
    if point.failed:
        point.notes.append(f"logs: {runner.logs / name}.*.log")


def table(points: Sequence[Point]) -> list[str]:
    """The points as a table: the event last, so that a long one (up to 60 characters)
    breaks onto a line of its own at 80 columns, never cut; failures' reasons and notes
    below the table."""
    head = ("event", "mode", "exit", "newest", "resumed", "verdict", "what")
    rows = [
        (
            str(p.event.number),
            p.mode,
            p.exit,
            p.expected,
            p.resumed,
            "FAIL" if p.failed else "ok",
            str(p.event),
        )
        for p in points
    ]
    lines = last_column_below(format_table(head, rows))
    lines += [
        f"event {p.event.number} {p.mode}: {p.verdict}"
        + (f" ({'; '.join(p.notes)})" if p.notes else "")
        for p in points
        if p.failed or p.notes
    ]
    return lines


def last_column_below(lines: list[str], width: int = 80) -> list[str]:
    """A table's rows wider than ``width`` with their last column (a path with spaces,
    which ``wrap_text`` would break inside) whole on the next line, indented."""
    at = lines[0].rindex("  ") + 2 if "  " in lines[0] else 0
    fitted = []
    for line in lines:
        if len(line) > width and at:
            fitted += [line[:at].rstrip(), "  " + line[at:]]
        else:
            fitted.append(line)
    return fitted


def file_events(
    command: Sequence[str],
    work: Path,
    *,
    modes: Sequence[str] = MODES,
    k: int | None = None,
    grace: float = 10.0,
    timeout: float | None = None,
    pattern: str | None = None,
    only: Collection[int] | None = None,
    jobs: int = 1,
    warm: bool = True,
    echo: Callable[[str], None] = print,
) -> bool:
    """The whole file-event test of ``command`` in ``work``; True if it passed.

    ``only``: event numbers to crash at (default all); ``jobs``: points run at a time;
    ``warm``: fork a Python command's runs from a process that has imported its
    libraries (``chaos_zygote``), else every run is a fresh process."""
    with Runner(command, work, timeout or 3600, warm=warm, jobs=jobs) as runner:
        return _file_events(runner, work, modes, k, grace, timeout, pattern, only, jobs, echo)


def _file_events(
    runner: Runner,
    work: Path,
    modes: Sequence[str],
    k: int | None,
    grace: float,
    timeout: float | None,
    pattern: str | None,
    only: Collection[int] | None,
    jobs: int,
    echo: Callable[[str], None],
) -> bool:
    if runner.warm:
        echo("chaos: runs start warm, forked from a Python with torch and transformers loaded")
    elif runner.asked_warm:
        echo("chaos: not a Python program started plainly: every run is a fresh process")
    echo(f"chaos: fault-free run in {work / 'reference'}, counting file events")
    ref = count_events(runner, work / "reference", timeout=runner.timeout)
    runner.timeout = timeout or 3 * ref.seconds + 60
    kinds: dict[str, int] = {}
    for e in ref.events:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    echo(
        f"chaos: {len(ref.events)} file events in {ref.seconds:.1f} s ("
        + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
        + ")"
    )
    if only is not None and max(only, default=0) > len(ref.events):
        raise ConfigError(
            f"--points goes up to {max(only)} but the run made {len(ref.events)} file events"
        )
    points = points_for(ref.events, modes, k, only)
    runner.install_hook()
    if jobs > 1:
        echo(f"chaos: {len(points)} points, {jobs} at a time")

    def one(point: Point) -> Point:
        run_point(runner, ref, point, grace=grace, pattern=pattern)
        return point

    # Each point has its own folders and logs; threads only wait on child processes.
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="chaos-point") as pool:
        for i, point in enumerate(pool.map(one, points), 1):
            echo(
                f"  {i}/{len(points)} {point.mode} at {point.event.number} ({point.event}): "
                f"{point.verdict}"
            )
    for line in table(points):
        echo(line)
    ok = bool(points) and not any(p.failed for p in points)
    resumed = sum(p.resumed != "start" for p in points)
    if ok and not resumed:
        echo("chaos: no point resumed from a checkpoint: no resume was tested")
        ok = False
    failed = sum(p.failed for p in points)
    echo(
        f"chaos: {len(points) - failed} of {len(points)} points passed, {resumed} resumed "
        "from a checkpoint"
    )
    return ok


__all__ = ["MODES", "Runner", "compare", "file_events"]
