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

import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from safepoint.app.chaos_compare import compare
from safepoint.app.chaos_events import last_column_below
from safepoint.app.chaos_process import Runner, kill, last_line, resumed_from, watch
from safepoint.errors import ConfigError
from safepoint.powercut import PowerCutFS, available, tree_digest
from safepoint.powercut.journal import Event, Journal
from safepoint.units import format_table
from safepoint.validity import latest_checkpoint


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


_TENSOR_FILE = re.compile(r"\.(safetensors|pt|pth|bin|ckpt)$")


def in_a_save(event: Event) -> bool:
    """Whether ``event`` is part of writing a checkpoint: in a checkpoint-N folder (or
    its staging folder), or on a tensor file (a script that saves its own way)."""
    return "checkpoint-" in event.path or bool(_TENSOR_FILE.search(event.path))


def cut_points(events: Sequence[Event], k: int | None) -> list[int]:
    """The events to cut the power before (1-based; ``len(events) + 1``: after the end).

    All of them and the end when ``k`` is None; else ``k`` spread evenly over the events
    of the saves (``in_a_save``), each in the middle of its share: a sample of 2 once
    chose the write probe and the end, and no cut fell inside a save. Empty when no
    event is part of a save."""
    if k is None:
        return list(range(1, len(events) + 2))
    saves = [i + 1 for i, e in enumerate(events) if in_a_save(e)]
    if len(saves) <= k:
        return saves
    return sorted({saves[int((i + 0.5) * len(saves) / k)] for i in range(k)})


def record(run: Runner, name: str) -> tuple[Path, Journal, float]:
    """The fault-free run on the power-cut file system: (its output, journal, seconds)."""
    backing, mnt, journal = run.work / name, run.work / "mnt", run.work / f"{name}.journal"
    log = run.logs / f"{name}.log"
    t0 = time.monotonic()
    with PowerCutFS(backing, mnt, journal=journal):
        rc = run.wait(run.start(mnt, log), run.timeout)
    if rc != 0:
        raise ConfigError(
            f"the fault-free run failed ({'timeout' if rc is None else f'exit {rc}'}): "
            f"{last_line(log)}; see {log}"
        )
    j = Journal(journal)
    if not j.count:
        raise ConfigError(f"the fault-free run wrote nothing under {{out}}; see {log}")
    return backing, j, time.monotonic() - t0


def live_cut(run: Runner, name: str, after: float) -> tuple[Journal, float]:
    """A fresh run, power cut ``after`` seconds after its first file event, SIGKILLed."""
    backing, mnt, journal = run.work / name, run.work / "mnt", run.work / f"{name}.journal"
    with PowerCutFS(backing, mnt, journal=journal) as fs:
        proc = run.start(mnt, run.logs / f"{name}.crash.log")
        t0 = time.monotonic()
        first: list[float] = []  # when it made its first file event

        def due() -> bool:
            if not first and fs.events:
                first.append(time.monotonic())
            return bool(first) and time.monotonic() - first[0] >= after

        watch(proc, t0 + run.timeout, due, poll=0.02)
        fs.freeze()
        kill(proc)
        at = time.monotonic() - t0
    return Journal(journal), at


def rerun(run: Runner, case: Case, state: Path, ref: Path, pattern: str | None) -> None:
    """Rerun the command on a surviving ``state``; fills in the case's verdict."""
    newest = latest_checkpoint(state)
    case.expected = newest.name if newest is not None else "start"
    log = run.logs / f"{state.name}.rerun.log"
    rc = run.wait(run.start(state, log), run.timeout)
    text = log.read_text(errors="replace")
    case.resumed = resumed_from(text, state)
    if rc != 0:
        case.verdict = f"FAIL: rerun {'timeout' if rc is None else f'exit {rc}'}: {last_line(log)}"
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
    jobs: int = 1,
    warm: bool = True,
    echo: Callable[[str], None] = print,
) -> bool:
    """The whole power-cut test of ``command`` in ``work``; True if it passed.

    ``jobs``: reruns at a time; ``warm``: fork a Python command's runs from a process
    that has imported its libraries (``chaos_zygote``), else every run is fresh."""
    why = available()
    if why is not None:
        raise ConfigError(f"--power-cut: {why}")
    with Runner(command, work, timeout or 3600, warm=warm, jobs=jobs) as run:
        return _power_cut(run, work, k, samples, kills, seed, timeout, pattern, jobs, echo)


def _power_cut(
    run: Runner,
    work: Path,
    k: int | None,
    samples: int,
    kills: int,
    seed: int,
    timeout: float | None,
    pattern: str | None,
    jobs: int,
    echo: Callable[[str], None],
) -> bool:
    if run.warm:
        echo("chaos: runs start warm, forked from a Python with torch and transformers loaded")
    elif run.asked_warm:
        echo("chaos: not a Python program started plainly: every run is a fresh process")
    echo(f"chaos: fault-free run on the power-cut file system, output in {work / 'reference'}")
    ref, journal, seconds = record(run, "reference")
    run.timeout = timeout or 3 * seconds + 60
    events = journal.numbered()
    echo(f"chaos: {len(events)} file events in {seconds:.1f} s")
    chosen = cut_points(events, k)
    if not chosen:
        echo(
            f"chaos: none of the {len(events)} file events writes a checkpoint (a "
            "checkpoint-N folder or a tensor file): no cut fell inside a save"
        )
        return False
    points = [
        (j, f"k={j}", str(events[j - 1]) if j <= len(events) else "(after the end)") for j in chosen
    ]
    # (journal, cut before, label, what it came before, the states' folder prefix)
    sources: list[tuple[Journal, int | None, str, str, str]] = [
        (journal, before, label, what, f"k-{before}") for before, label, what in points
    ]
    rng = random.Random(seed)
    first, last = events[0].rec["t"], events[-1].rec["t"]
    for i in range(kills):
        live, at = live_cut(run, f"live-{i + 1}", rng.uniform(0, last - first))
        tail = live.numbered()
        what = f"after {tail[-1]}" if tail else "(no event yet)"
        sources.append((live, None, f"t={at:.1f}s", what, f"live-{i + 1}"))
    # Every surviving state first (cheap), then one rerun per distinct state.
    cases: list[Case] = []
    states: dict[str, tuple[Case, Path]] = {}
    twins: list[tuple[Case, str]] = []
    for journal_, before, label, what, prefix in sources:
        for mode, s in _modes(samples, seed):
            name = f"{prefix}-{mode}" + (f"-{s}" if mode == "reordered" else "")
            case = Case(label, what, mode if mode == "strict" else f"reordered#{s}")
            state = journal_.materialise(work / "states" / name, before=before, mode=mode, seed=s)
            digest = tree_digest(state)
            if digest in states:
                twins.append((case, digest))
                shutil.rmtree(state)
            else:
                states[digest] = (case, state)
            cases.append(case)
    echo(
        f"chaos: {len(cases)} surviving states, {len(states)} distinct"
        + (f", {jobs} reruns at a time" if jobs > 1 else "")
    )

    def one(item: tuple[Case, Path]) -> Case:
        case, state = item
        rerun(run, case, state, ref, pattern)
        if not case.failed:  # the rerun has trained on in it: nothing left to look at
            shutil.rmtree(state, ignore_errors=True)
        return case

    # Each state has its own folder and log; threads only wait on child processes.
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="chaos-cut") as pool:
        for i, case in enumerate(pool.map(one, states.values()), 1):
            echo(f"  {i}/{len(states)} {case.point} {case.mode} ({case.what[:60]}): {case.verdict}")
    for case, digest in twins:
        done = states[digest][0]
        case.expected, case.resumed, case.verdict = done.expected, done.resumed, done.verdict
        case.same_as = f"{done.point} {done.mode}"
    for line in table(cases):
        echo(line)
    failed = sum(c.failed for c in cases)
    resumed = sum(c.resumed not in ("start", "?") for c in cases)
    echo(
        f"chaos: {len(cases) - failed} of {len(cases)} surviving states passed "
        f"({len(states)} distinct, rerun), {resumed} resumed from a checkpoint"
    )
    if not failed and not resumed:
        echo("chaos: no surviving state held a checkpoint: no resume was tested")
        return False
    return not failed


def table(cases: Sequence[Case]) -> list[str]:
    """The surviving states as a table: the event cut before last (whole, on the next
    line where the row would pass 80 columns), failures and twins below it."""
    head = ("point", "mode", "newest intact", "resumed", "verdict", "cut before")
    rows = [
        (c.point, c.mode, c.expected, c.resumed, "FAIL" if c.failed else "ok", c.what)
        for c in cases
    ]
    lines = last_column_below(format_table(head, rows))
    lines += [f"{c.point} {c.mode}: {c.verdict}" for c in cases if c.failed]
    lines += [f"{c.point} {c.mode}: the same state as {c.same_as}" for c in cases if c.same_as]
    return lines
