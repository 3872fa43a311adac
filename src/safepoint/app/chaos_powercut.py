"""``safepoint chaos --power-cut``: cut the power under a command, then resume it.

The command runs once with its output directory (``{out}``) on the power-cut file
system (``safepoint.powercut``), which journals every file event. A power cut before
event ``k`` leaves on disk exactly what events ``1..k-1`` made durable, whatever the
process was doing at ``k`` (it is gone), so every event of that recorded run is a cut
point without running it again. ``--kills R`` adds R live cuts at random instants of
fresh runs (other thread timings, other executions): the file system freezes, the
command is SIGKILLed, the journal up to the freeze is what was written.

For each point, each mode (``strict``: only what was fsync'ed; ``reordered``, S seeded
samples: plus a random part of the rest, as writeback may have done) writes the
surviving state into a fresh folder and the command is rerun there, plain. It passes
when the rerun exits 0 with no traceback, resumed from the newest checkpoint that is
really intact there (safepoint's deep check) or started over when there is none, and
ends with the same final artifacts as the recorded run (``compare``). A surviving state
already tested (same paths, same bytes) is not rerun: the command is deterministic.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safepoint.app.chaos_events import compare
from safepoint.errors import ConfigError
from safepoint.powercut import PowerCutFS, available, tree_digest
from safepoint.powercut.journal import Journal
from safepoint.records import read_events
from safepoint.units import format_table
from safepoint.validity import latest_checkpoint

_RESUMING = re.compile(r"resuming from (\S+) \(step (\d+)\)")


@dataclass
class Case:
    """One surviving state (a point in a mode) and what the rerun did with it."""

    point: str  # "k=17" (before event 17 of the recorded run) or "t=3.2s" (a live cut)
    what: str  # the event the cut came before
    mode: str  # strict | reordered#<seed>
    expected: str = "start"
    resumed: str = "?"
    verdict: str = "ok"
    same_as: str | None = None

    @property
    def failed(self) -> bool:
        return self.verdict != "ok"


@dataclass
class _Run:
    command: list[str]
    work: Path
    timeout: float
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self, out: Path, log: Path) -> subprocess.Popen[bytes]:
        argv = [arg.replace("{out}", str(out)) for arg in self.command]
        with open(log, "wb") as f:
            try:
                # A session of its own: the kill reaches every process the command starts.
                return subprocess.Popen(
                    argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
                )
            except OSError as e:
                raise ConfigError(
                    f"cannot run {argv[0]!r} ({e.strerror}); check the command"
                ) from None

    def wait(self, proc: subprocess.Popen[bytes], seconds: float) -> int | None:
        try:
            return proc.wait(seconds)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return None


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no output)"


def spread(n: int, k: int | None) -> list[int]:
    """``k`` of the indices ``0..n-1`` spread evenly, first and last included (all when
    ``k`` is None or not smaller)."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 1:
        return [n // 2] if k == 1 else []
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def record(run: _Run, name: str) -> tuple[Path, Journal, float]:
    """The fault-free run on the power-cut file system: (its output, journal, seconds)."""
    backing, mnt, journal = run.work / name, run.work / "mnt", run.work / f"{name}.journal"
    log = run.logs / f"{name}.log"
    t0 = time.monotonic()
    with PowerCutFS(backing, mnt, journal=journal):
        rc = run.wait(run.start(mnt, log), run.timeout)
    if rc != 0:
        raise ConfigError(
            f"the fault-free run failed ({'timeout' if rc is None else f'exit {rc}'}): "
            f"{_last_line(log)}; see {log}"
        )
    j = Journal(journal)
    if not j.count:
        raise ConfigError(f"the fault-free run wrote nothing under {{out}}; see {log}")
    return backing, j, time.monotonic() - t0


def live_cut(run: _Run, name: str, after: float) -> tuple[Journal, float]:
    """A fresh run, power cut ``after`` seconds after its first file event, SIGKILLed."""
    backing, mnt, journal = run.work / name, run.work / "mnt", run.work / f"{name}.journal"
    with PowerCutFS(backing, mnt, journal=journal) as fs:
        proc = run.start(mnt, run.logs / f"{name}.crash.log")
        t0 = time.monotonic()
        first: float | None = None
        while proc.poll() is None and time.monotonic() - t0 < run.timeout:
            if first is None and fs.events:
                first = time.monotonic()
            if first is not None and time.monotonic() - first >= after:
                break
            time.sleep(0.02)
        fs.freeze()
        _kill(proc)
        at = time.monotonic() - t0
    return Journal(journal), at


def rerun(run: _Run, case: Case, state: Path, ref: Path, pattern: str | None) -> None:
    """Rerun the command on a surviving ``state``; fills in the case's verdict."""
    newest = latest_checkpoint(state)
    case.expected = newest.name if newest is not None else "start"
    log = run.logs / f"{state.name}.rerun.log"
    rc = run.wait(run.start(state, log), run.timeout)
    text = log.read_text(errors="replace")
    found = _RESUMING.search(text)
    case.resumed = Path(found.group(1)).name if found else _resumed_in_record(state)
    if rc != 0:
        case.verdict = f"FAIL: rerun {'timeout' if rc is None else f'exit {rc}'}: {_last_line(log)}"
    elif "Traceback (most recent call last)" in text:
        case.verdict = f"FAIL: a traceback in {log}"
    elif case.resumed != case.expected:
        case.verdict = f"FAIL: resumed from {case.resumed}, not {case.expected}"
    else:
        same, lines = compare(pattern, ref, state)
        if not same:
            case.verdict = "FAIL: " + ("; ".join(x for x in lines if "same" not in x) or "differs")
    if case.failed:
        case.verdict += f" (state kept in {state})"


def _resumed_in_record(out: Path) -> str:
    """For a command that does not print ``resuming from``: its run record's resume."""
    last: list[dict[str, Any]] = []
    for event in read_events(out):
        if event["event"] == "start":
            last = []
        last.append(event)
    resume = next((e for e in last if e["event"] == "resume"), None)
    checkpoint = resume.get("checkpoint") if resume else None
    return Path(checkpoint).name if isinstance(checkpoint, str) else "start"


def _modes(samples: int, seed: int) -> list[tuple[str, int]]:
    return [("strict", 0)] + [("reordered", seed + s) for s in range(samples)]


def power_cut(
    command: Sequence[str],
    work: Path,
    *,
    k: int | None = None,
    samples: int = 1,
    kills: int = 0,
    seed: int = 0,
    timeout: float | None = None,
    pattern: str | None = None,
    echo: Callable[[str], None] = print,
) -> bool:
    """The whole power-cut test of ``command`` in ``work``; True if it passed."""
    why = available()
    if why is not None:
        raise ConfigError(f"--power-cut: {why}")
    run = _Run(list(command), work, timeout or 3600)
    echo(f"chaos: fault-free run on the power-cut file system, output in {work / 'reference'}")
    ref, journal, seconds = record(run, "reference")
    run.timeout = timeout or 3 * seconds + 60
    events = journal.numbered()
    echo(f"chaos: {len(events)} file events in {seconds:.1f} s")
    # a cut before each event, and one after the last (nothing of the end flushed yet)
    points = [
        (j, f"k={j}", str(events[j - 1]) if j <= len(events) else "(after the end)")
        for j in (i + 1 for i in spread(len(events) + 1, k))
    ]
    sources: list[tuple[Journal, int | None, str, str]] = [
        (journal, before, label, what) for before, label, what in points
    ]
    rng = random.Random(seed)
    first, last = events[0].rec["t"], events[-1].rec["t"]
    for i in range(kills):
        live, at = live_cut(run, f"live-{i + 1}", rng.uniform(0, last - first))
        tail = live.numbered()
        what = f"after {tail[-1]}" if tail else "(no event yet)"
        sources.append((live, None, f"t={at:.1f}s", what))
    cases: list[Case] = []
    seen: dict[str, Case] = {}
    for journal_, before, label, what in sources:
        for mode, s in _modes(samples, seed):
            name = f"{label.replace('=', '-')}-{mode}" + (f"-{s}" if mode == "reordered" else "")
            case = Case(label, what, mode if mode == "strict" else f"reordered#{s}")
            state = journal_.materialise(work / "states" / name, before=before, mode=mode, seed=s)
            digest = tree_digest(state)
            if digest in seen:
                done = seen[digest]
                case.expected, case.resumed = done.expected, done.resumed
                case.verdict = done.verdict
                case.same_as = f"{done.point} {done.mode}"
            else:
                rerun(run, case, state, ref, pattern)
                seen[digest] = case
            cases.append(case)
            if case.same_as is None:
                echo(f"  {label} {case.mode} ({what[:60]}): {case.verdict}")
    for line in table(cases):
        echo(line)
    failed = sum(c.failed for c in cases)
    resumed = sum(c.resumed not in ("start", "?") for c in cases)
    echo(
        f"chaos: {len(cases) - failed} of {len(cases)} surviving states passed "
        f"({len(seen)} distinct, rerun), {resumed} resumed from a checkpoint"
    )
    if not failed and not resumed:
        echo("chaos: no surviving state held a checkpoint: no resume was tested")
        return False
    return not failed


def table(cases: Sequence[Case]) -> list[str]:
    head = ("point", "cut before", "mode", "newest intact", "resumed", "verdict")
    rows = [
        (
            c.point,
            c.what[:50],
            c.mode,
            c.expected,
            c.resumed,
            c.verdict + (f" (same state as {c.same_as})" if c.same_as else ""),
        )
        for c in cases
    ]
    return format_table(head, rows)
