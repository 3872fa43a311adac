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

Also here, shared with the random-kill mode: ``compare`` and ``same_file``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safepoint.errors import ConfigError
from safepoint.records import read_events
from safepoint.store import checkpoint_step, latest_checkpoint
from safepoint.units import format_table

MODES = ("kill", "torn", "term")
HOOK_ENV = "SAFEPOINT_CHAOS_HOOK"
_RESUMING = re.compile(r"resuming from (\S+) \(step (\d+)\)")
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


# --------------------------------------------------------------------- processes


class Runner:
    """Starts the command with or without the hook; one folder of logs and hook files."""

    def __init__(self, command: Sequence[str], work: Path, *, timeout: float) -> None:
        self.command = list(command)
        self.work = work
        self.timeout = timeout
        self.hook_dir = work / "hook"
        self.logs = work / "logs"
        self.hook_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        hook = Path(__file__).with_name("chaos_hook.py")
        shutil.copyfile(hook, self.hook_dir / "sitecustomize.py")

    def argv(self, out: Path) -> list[str]:
        return [arg.replace("{out}", str(out)) for arg in self.command]

    def env(self, spec: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != HOOK_ENV}
        if spec is not None:
            path = env.get("PYTHONPATH")
            env["PYTHONPATH"] = str(self.hook_dir) + (os.pathsep + path if path else "")
            env[HOOK_ENV] = spec
        return env

    def start(self, out: Path, log: Path, spec: str | None) -> subprocess.Popen[bytes]:
        with open(log, "wb") as f:
            try:
                # A session of its own: a kill reaches every process the command starts.
                return subprocess.Popen(
                    self.argv(out),
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=self.env(spec),
                )
            except OSError as e:
                raise ConfigError(
                    f"cannot run {self.command[0]!r} ({e.strerror}); check the command"
                ) from e

    def finish(self, proc: subprocess.Popen[bytes], deadline: float) -> int | None:
        """Exit code, or None after killing it at ``deadline`` (monotonic)."""
        try:
            return proc.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            kill_group(proc, signal.SIGKILL)
            proc.wait()
            return None


def kill_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no output)"


def _exit_text(rc: int | None) -> str:
    if rc is None:
        return "timeout"
    if rc < 0:
        return f"{signal.Signals(-rc).name.removeprefix('SIG')}"
    return str(rc)


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
    rc = runner.finish(proc, t0 + timeout)
    if rc != 0:
        raise ConfigError(
            f"the fault-free run failed ({_exit_text(rc)}): {last_line(log)}; see {log}"
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
    rc = _crash(runner, proc, fired, point, grace=grace, deadline=t0 + runner.timeout)
    point.exit = _exit_text(rc)
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
    runner: Runner,
    proc: subprocess.Popen[bytes],
    fired: Path,
    point: Point,
    *,
    grace: float,
    deadline: float,
) -> int | None:
    if point.mode != "term":
        return runner.finish(proc, deadline)
    while not fired.exists():
        try:
            return proc.wait(0.02)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                return runner.finish(proc, deadline)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        kill_group(proc, signal.SIGKILL)
        proc.wait()
        point.notes.append(f"SIGKILL {grace:g} s after SIGTERM")
        return -signal.SIGKILL


def _judge_crash(point: Point, rc: int | None, out: Path, log: Path) -> None:
    if point.mode != "term":
        if rc not in (-signal.SIGKILL, 0):
            point.fail(f"exit {point.exit} instead of being killed: {last_line(log)}")
        return
    process = _last_process(out)
    trained = any(e["event"] == "metrics" for e in process)
    if rc == -signal.SIGTERM and trained:
        point.fail("SIGTERM ended it mid-training without a handler")
    elif rc == -signal.SIGKILL:
        point.fail(f"still running {point.notes[-1].split()[1]} s after SIGTERM")
    elif rc not in (0, 3, -signal.SIGTERM):
        point.fail(f"exit {point.exit} after SIGTERM: {last_line(log)}")
    elif rc == 3:
        reached = max(
            (
                e["step"]
                for e in process
                if e["event"] in ("metrics", "save", "resume") and isinstance(e.get("step"), int)
            ),
            default=0,
        )
        newest = latest_checkpoint(out) if out.is_dir() else None
        saved = checkpoint_step(newest.name) or 0 if newest is not None else 0
        if saved < reached:
            point.fail(f"exit 3 but steps {saved + 1}-{reached} are lost (no emergency save)")


def _last_process(out: Path) -> list[dict[str, Any]]:
    runs: list[list[dict[str, Any]]] = []
    for event in read_events(out) if out.is_dir() else ():
        if event["event"] == "start":
            runs.append([])
        if runs:
            runs[-1].append(event)
    return runs[-1] if runs else []


def _rerun(runner: Runner, ref: Reference, point: Point, out: Path, pattern: str | None) -> None:
    name = f"{point.mode}-{point.event.number}"
    log = runner.logs / f"{name}.rerun.log"
    proc = runner.start(out, log, None)
    rc = runner.finish(proc, time.monotonic() + runner.timeout)
    text = log.read_text(errors="replace")
    found = _RESUMING.search(text)
    point.resumed = Path(found.group(1)).name if found else _resumed_in_record(out)
    if rc != 0:
        point.fail(f"rerun exit {_exit_text(rc)}: {last_line(log)}")
    elif point.resumed != point.expected:
        point.fail(f"rerun resumed from {point.resumed}, not {point.expected}")
    else:
        same, lines = compare(pattern, ref.out, out)
        if not same:
            point.fail("; ".join(line for line in lines if "same" not in line) or "differs")
    if point.failed:
        point.notes.append(f"logs: {runner.logs / name}.*.log")


def _resumed_in_record(out: Path) -> str:
    """For a command that does not print ``resuming from``: the run record's resume."""
    resume = next((e for e in _last_process(out) if e["event"] == "resume"), None)
    checkpoint = resume.get("checkpoint") if resume else None
    return Path(checkpoint).name if isinstance(checkpoint, str) else "start"


def table(points: Sequence[Point]) -> list[str]:
    head = ("event", "mode", "what", "exit", "newest", "resumed", "verdict")
    rows = [
        (
            str(p.event.number),
            p.mode,
            str(p.event)[:60],
            p.exit,
            p.expected,
            p.resumed,
            p.verdict + (f" ({'; '.join(p.notes)})" if p.notes else ""),
        )
        for p in points
    ]
    return format_table(head, rows)


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
    echo: Callable[[str], None] = print,
) -> bool:
    """The whole file-event test of ``command`` in ``work``; True if it passed."""
    runner = Runner(command, work, timeout=timeout or 3600)
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
    points = points_for(ref.events, modes, k, only)
    for i, point in enumerate(points, 1):
        run_point(runner, ref, point, grace=grace, pattern=pattern)
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


# ---------------------------------------------------------------------- comparing


def _natural(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def _artifacts(pattern: str | None, out: Path) -> dict[str, Path]:
    """Relative name -> file of the artifact(s) to compare in one run's output."""
    if pattern is None:
        newest = latest_checkpoint(out) if out.is_dir() else None
        if newest is None:
            return {}
        return {p.name: p for p in sorted(newest.glob("*.safetensors"))}
    matches = sorted(glob.glob(pattern.replace("{out}", str(out))), key=_natural)
    if not matches:
        return {}
    last = Path(matches[-1])
    files = sorted(p for p in last.rglob("*") if p.is_file()) if last.is_dir() else [last]
    return {_relative(f, out): f for f in files}


def _relative(path: Path, out: Path) -> str:
    # checkpoint-40/x and checkpoint-40/x of the two runs are the same artifact
    try:
        rel = path.relative_to(out)
    except ValueError:
        return path.name
    return str(Path(*rel.parts[1:]) if len(rel.parts) > 1 else rel)


def same_file(a: Path, b: Path) -> tuple[bool, str]:
    """(equal, how): bytes, else tensors for safetensors files."""
    if a.read_bytes() == b.read_bytes():
        return True, "identical bytes"
    if a.suffix == ".safetensors" and b.suffix == ".safetensors":
        import torch
        from safetensors.torch import load_file

        try:
            ta, tb = load_file(str(a)), load_file(str(b))
        except Exception as e:  # a damaged artifact is a difference, not a crash
            return False, f"unreadable ({e})"
        if ta.keys() != tb.keys():
            return False, "different tensor names"
        diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
        if not diff:
            return True, "identical tensors"
        worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in diff)
        return False, (
            f"{len(diff)} of {len(ta)} tensors differ (e.g. {diff[0]}; max abs diff {worst:.3g})"
        )
    return False, "bytes differ"


def compare(pattern: str | None, ref: Path, run: Path) -> tuple[bool, list[str]]:
    """Compare the final artifacts of the two runs; (all equal, lines to print)."""
    want, got = _artifacts(pattern, ref), _artifacts(pattern, run)
    what = pattern or "the newest checkpoint's *.safetensors"
    if not want:
        return False, [f"compare: nothing matches {what} in the uninterrupted run {ref}"]
    lines, ok = [], True
    for name, a in want.items():
        b = got.get(name)
        if b is None:
            ok = False
            lines.append(f"compare {name}: missing in the chaos run")
            continue
        equal, how = same_file(a, b)
        ok = ok and equal
        lines.append(f"compare {name}: {'same' if equal else 'DIFFERENT'} ({how})")
    return ok, lines


__all__ = ["MODES", "compare", "file_events", "same_file"]
