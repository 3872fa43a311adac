"""The command under test as a child process, for every mode of ``safepoint chaos``.

``Runner`` starts the user's command with ``{out}`` replaced by an output directory, its
output into a log, in a session of its own so that a kill reaches every process the
command starts; with a ``chaos_hook`` spec, under the file-event hook. Started warm, a
Python command is forked from a ``chaos_zygote`` that has imported its libraries already
(``Zygote``, ``Forked``); otherwise it is a fresh process. The functions watch it, kill it
and read back what it did: its log's last line, whether it said ``resuming from <path>
(step N)``, and its run record, split per process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from safepoint.errors import ConfigError, SafepointError
from safepoint.records import read_events

HOOK_ENV = "SAFEPOINT_CHAOS_HOOK"
RESUMING = re.compile(r"resuming from (\S+) \(step (\d+)\)")

# What a warm start imports before forking: the field's libraries and safepoint's own
# training path. A module the command's interpreter lacks is skipped.
WARM_MODULES = (
    "torch",
    "safetensors.torch",
    "transformers",
    "transformers.trainer",
    "accelerate",
    "datasets",
    "peft",
    "safepoint.cli",
    "safepoint.app.job",
    "safepoint.app.progress",
    "safepoint.integrations.hf",
)
_PYTHON = re.compile(r"python[0-9.]*$")


# Every run and zygote started here: a stopped chaos ends them (a forked run trained on).
_started: list[Any] = []
_zygotes: list[Zygote] = []
_ended = threading.Event()  # set by end_all: no run starts after it


def end_all(*, reap: bool = True) -> None:
    """SIGKILL every run started here (its session) and the zygotes; no run starts
    after. ``reap``: wait for them too (not in a signal handler: the main thread waits)."""
    _ended.set()
    for proc in list(_started):
        if getattr(proc, "returncode", None) is None:
            kill_group(proc, signal.SIGKILL)
            if reap and isinstance(proc, subprocess.Popen):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
    for zygote in list(_zygotes):
        with contextlib.suppress(ProcessLookupError):
            zygote.proc.kill()  # its forked run, killed above, is reaped by init then
        if reap:
            with contextlib.suppress(subprocess.TimeoutExpired):
                zygote.proc.wait(10)


class ChaosStopped(SafepointError, RuntimeError):
    """A run was to start after ``end_all``: chaos is being stopped."""


class Process(Protocol):
    """A started run: a ``subprocess.Popen`` or a ``Forked`` one."""

    @property
    def pid(self) -> int: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Runner:
    """Starts the command in output directories; one folder of logs (and of the hook).

    ``warm``: start a Python command forked from zygotes (one per run at a time) when
    ``python_target`` can say how to run it; ``self.warm`` says whether it does."""

    def __init__(
        self,
        command: Sequence[str],
        work: Path,
        timeout: float,
        *,
        warm: bool = False,
        jobs: int = 1,
    ) -> None:
        self.command = list(command)
        self.jobs = jobs
        self.work = work
        self.timeout = timeout  # seconds a run may take
        self.hook_dir = work / "hook"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.asked_warm = warm
        self.target = python_target(self.command) if warm else None
        self._idle: list[Zygote] = []
        self._all: list[Zygote] = []
        self._lock = threading.Lock()

    @property
    def warm(self) -> bool:
        return self.target is not None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the zygotes (each exits once its stdin closes)."""
        with self._lock:
            zygotes, self._all, self._idle = self._all, [], []
        for zygote in zygotes:
            zygote.close()
            with contextlib.suppress(ValueError):
                _zygotes.remove(zygote)

    def argv(self, out: Path) -> list[str]:
        return [arg.replace("{out}", str(out)) for arg in self.command]

    def env(self, spec: str | None) -> dict[str, str]:
        """The child's environment: with ``spec``, the hook first on its ``PYTHONPATH``
        as ``sitecustomize`` (installed on first use) and told ``spec``."""
        env = {k: v for k, v in os.environ.items() if k != HOOK_ENV}
        if self.jobs > 1:  # runs side by side: each its share of the cores (torch would
            # start a thread per core in each: a 2-job sweep on 2 cores took 4.6x as long)
            env.setdefault("OMP_NUM_THREADS", str(threads_per_job(self.jobs)))
        if spec is not None:
            self.install_hook()
            path = env.get("PYTHONPATH")
            env["PYTHONPATH"] = str(self.hook_dir) + (os.pathsep + path if path else "")
            env[HOOK_ENV] = spec
        return env

    def install_hook(self) -> None:
        """Put the hook in place (once; atomically, for runs started from several threads)."""
        hook = self.hook_dir / "sitecustomize.py"
        if hook.exists():
            return
        self.hook_dir.mkdir(parents=True, exist_ok=True)
        part = hook.with_name(f".sitecustomize.{os.getpid()}.{threading.get_ident()}")
        shutil.copyfile(Path(__file__).with_name("chaos_hook.py"), part)
        os.replace(part, hook)

    def start(self, out: Path, log: Path, spec: str | None = None) -> Process:
        """The command started in ``out``, its stdout and stderr into ``log``."""
        if _ended.is_set():
            raise ChaosStopped("chaos is stopping: no run starts")
        argv = self.argv(out)
        proc: Process
        if self.target is not None:
            python, kind, what, argv0, skip = self.target
            here = str(out)
            run = (python, kind, what.replace("{out}", here), argv0.replace("{out}", here), skip)
            proc = self._zygote().start(run, argv, log, spec, self._release)
        else:
            with open(log, "wb") as f:
                try:
                    # A session of its own: a kill reaches every process the command starts.
                    proc = subprocess.Popen(
                        argv,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        env=self.env(spec),
                    )
                except OSError as e:
                    raise ConfigError(
                        f"cannot run {argv[0]!r} ({e.strerror}); check the command"
                    ) from None
        _started[:] = [*(p for p in _started if getattr(p, "returncode", 0) is None), proc]
        return proc

    def wait(self, proc: Process, seconds: float) -> int | None:
        """Exit code, or None after killing it ``seconds`` from now."""
        return finish(proc, time.monotonic() + seconds)

    def _zygote(self) -> Zygote:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            number = len(self._all) + 1
        assert self.target is not None
        zygote = Zygote(self.target[0], self.env(None), self.logs / f"zygote-{number}.log")
        with self._lock:
            self._all.append(zygote)
            _zygotes.append(zygote)
        return zygote

    def _release(self, zygote: Zygote) -> None:
        with self._lock:
            if zygote in self._all:
                self._idle.append(zygote)


def threads_per_job(jobs: int) -> int:
    """Threads each of ``jobs`` runs side by side gets: this machine's cores shared."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // jobs)


# interpreter, kind, what to run, the program's argv[0], where the rest of argv starts
Target = tuple[str, str, str, str, int]


def python_target(command: Sequence[str]) -> Target | None:
    """How a zygote runs ``command``: (interpreter, kind, target, argv[0], start of the
    arguments in ``command``), or None when it is not a Python program started plainly
    (kind: ``path``, ``module``, ``code``).

    ``python script.py ...``, ``python -m mod ...``, ``python -c code ...``, and a script
    whose ``#!`` names a Python (a console script such as ``safepoint``) are; a Python
    started with other options, a shell script or a binary are not."""
    first = shutil.which(command[0]) if command else None
    if first is None:
        return None
    if _PYTHON.match(Path(command[0]).name):
        rest = list(command[1:])
        if rest[:1] in (["-m"], ["-c"]) and len(rest) >= 2:
            kind = "module" if rest[0] == "-m" else "code"
            return first, kind, rest[1], rest[1] if kind == "module" else "-c", 3
        if rest and not rest[0].startswith("-"):
            return first, "path", rest[0], rest[0], 2
        return None
    try:
        with open(first, "rb") as f:
            line = f.readline(512)
    except OSError:
        return None
    words = line[2:].decode(errors="replace").split() if line.startswith(b"#!") else []
    if words and Path(words[0]).name == "env" and len(words) == 2:
        words = [shutil.which(words[1]) or words[1]]
    if len(words) != 1 or not _PYTHON.match(Path(words[0]).name):
        return None
    return words[0], "path", first, command[0], 1


class Zygote:
    """A ``chaos_zygote`` process: forks one run at a time from warm imports."""

    def __init__(self, python: str, env: dict[str, str], log: Path) -> None:
        here = Path(__file__).parent
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [python, str(here / "chaos_zygote.py"), str(here / "chaos_hook.py"), *WARM_MODULES],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=f,
                env=env,
            )
        self._buffer = b""

    def start(
        self,
        target: Target,
        argv: list[str],
        log: Path,
        spec: str | None,
        release: Callable[[Zygote], None],
    ) -> Forked:
        _, kind, what, argv0, skip = target
        args = [argv0, *argv[skip:]]
        request = {"run": [kind, what], "argv": args, "log": str(log), "spec": spec}
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None
        line = self.readline(None)
        return Forked(int(line), self, release)

    def readline(self, timeout: float | None) -> str:
        """The zygote's next answer; ``TimeoutExpired`` if none comes in ``timeout`` s."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not select.select([fd], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.proc.args, timeout or 0.0)
            chunk = os.read(fd, 4096)
            if not chunk:
                raise self._died()
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def _died(self) -> ConfigError:
        return ConfigError(
            f"the warm-start process ended ({last_line(self.log)}); see {self.log}, or rerun "
            "with --cold"
        )

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Forked:
    """A run forked by a zygote, waited on through the zygote's answers."""

    def __init__(self, pid: int, zygote: Zygote, release: Callable[[Zygote], None]) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._zygote = zygote
        self._release = release

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = int(self._zygote.readline(timeout))
            self._release(self._zygote)
        return self.returncode


def kill_group(proc: Process, sig: signal.Signals) -> None:
    """Send ``sig`` to every process of the command (gone already: nothing to do)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def kill(proc: Process) -> None:
    """SIGKILL every process of the command and reap it."""
    kill_group(proc, signal.SIGKILL)
    proc.wait()


def finish(proc: Process, deadline: float) -> int | None:
    """Exit code, or None after killing it at ``deadline`` (monotonic)."""
    try:
        return proc.wait(max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        kill(proc)
        return None


def watch(
    proc: Process,
    deadline: float,
    stop: Callable[[], bool] | None = None,
    *,
    poll: float = 0.05,
) -> int | None:
    """Exit code once ``proc`` ends; None, leaving it running, once ``stop()`` says so
    (asked every ``poll`` seconds) or at ``deadline`` (monotonic)."""
    while True:
        try:
            return proc.wait(poll)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline or (stop is not None and stop()):
                return None


def last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no output)"


def exit_text(rc: int | None) -> str:
    """``timeout``, a signal's name (``KILL``) or the exit code."""
    if rc is None:
        return "timeout"
    if rc < 0:
        return f"{signal.Signals(-rc).name.removeprefix('SIG')}"
    return str(rc)


# -------------------------------------------------------------------- run record


def processes(out: Path) -> list[list[dict[str, Any]]]:
    """The run record of ``out`` split into one list of events per process."""
    runs: list[list[dict[str, Any]]] = []
    for event in read_events(out) if out.is_dir() else ():
        if event["event"] == "start":
            runs.append([])
        if runs:
            runs[-1].append(event)
    return runs


def last_process(out: Path) -> list[dict[str, Any]]:
    runs = processes(out)
    return runs[-1] if runs else []


def progress(events: list[dict[str, Any]]) -> tuple[int | None, int | None]:
    """(step resumed from, last step reached) of one process's events."""
    resumed = next((e["step"] for e in events if e["event"] == "resume"), None)
    steps = [
        e["step"]
        for e in events
        if e["event"] in ("metrics", "save", "resume") and isinstance(e.get("step"), int)
    ]
    return resumed, max(steps) if steps else None


def step_seconds(events: list[dict[str, Any]]) -> float | None:
    """Median seconds per step of one process's ``metrics`` events (None: too few)."""
    points = [
        (e["step"], e["t"])
        for e in events
        if e["event"] == "metrics" and isinstance(e.get("step"), int) and "t" in e
    ]
    pairs = itertools.pairwise(points)
    rates = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in pairs if s1 > s0]
    return statistics.median(rates) if rates else None


def resumed_from(log_text: str, out: Path) -> str:
    """The checkpoint (folder name) the last run in ``out`` resumed from, or ``start``:
    what it printed (``resuming from <path> (step N)``), else its run record's resume."""
    found = RESUMING.search(log_text)
    if found:
        return Path(found.group(1)).name
    resume = next((e for e in last_process(out) if e["event"] == "resume"), None)
    checkpoint = resume.get("checkpoint") if resume else None
    return Path(checkpoint).name if isinstance(checkpoint, str) else "start"
