"""Shared fixtures: running the toy training script as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import safepoint.store

TESTS = Path(__file__).parent
TOY = TESTS / "programs" / "toy_train.py"


def toy_cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(TOY), str(out), *args]


def run_toy(
    out: Path,
    *args: str,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run tests/programs/toy_train.py to completion (or to its death) and return the result."""
    proc = subprocess.run(
        toy_cmd(out, *args),
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"toy_train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def same_tensors(a: Path, b: Path) -> bool:
    """Bit-for-bit equality of two safetensors files' tensors."""
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(autouse=True)
def _signal_handlers_as_they_were() -> Iterator[None]:
    """``safepoint train`` holds its stop-signal handlers until the process exits (exit
    code 3 whenever a stop signal came); run in-process by a test, it must not leave them,
    nor the stop it saw, to the tests after it."""
    import signal

    from safepoint.signals import forget_stop

    stops = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
    before = {sig: signal.getsignal(sig) for sig in stops}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)
    forget_stop()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted toy run, cached per (args) for the whole session."""
    cache: dict[tuple[str, ...], Path] = {}

    def get(*args: str) -> Path:
        if args not in cache:
            out = tmp_path_factory.mktemp("reference")
            run_toy(out, *args)
            cache[args] = out / "final.safetensors"
        return cache[args]

    return get


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount a real tmpfs of a given size (and options) under tmp_path."""
    mounted: list[Path] = []

    def mount(size: int, *, options: str = "") -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            unavailable(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs root")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def unavailable(reason: str) -> None:
    """Skip a test whose real resource (a tmpfs, a mount) this machine cannot give, with
    the reason; under CI (root, everything installed by .ci/run) fail instead, so that a
    disk test can never pass CI by silently not running."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


def launcher(name: str, *, port: int | None = None) -> list[str]:
    """The command that starts a script on several processes: ``torchrun`` or
    ``accelerate``. accelerate 1.x has no --multi_cpu, and ``--cpu --num_processes 2``
    starts ONE process (its simple launcher) unless an MPI hostfile is given; its
    multi-process launcher is --multi_gpu (torchrun underneath) and the scripts set
    use_cpu, so the ranks use gloo on CPU. Both through this interpreter: a bare
    ``accelerate`` is found only with the venv on PATH. ``port``: one of its own, as
    accelerate's default 29500 may be taken by a concurrent run."""
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd + ([] if port is None else ["--main_process_port", str(port)])


GATE_DEADLINE = 60.0


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold every tensor-file write until the test sets the event (a slow disk, on cue)."""
    release = threading.Event()
    real = safepoint.store.write_safetensors

    def held(*args: object, **kwargs: object) -> tuple[int, str]:
        assert release.wait(GATE_DEADLINE), "the test never released the writer"
        return real(*args, **kwargs)

    monkeypatch.setattr(safepoint.store, "write_safetensors", held)
    yield release
    release.set()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny model, built once per test module in a home of its own."""
    from safepoint.app import tiny

    home = tmp_path_factory.mktemp("home")
    saved = os.environ.get("SAFEPOINT_HOME")
    os.environ["SAFEPOINT_HOME"] = str(home)
    try:
        return tiny.tiny_model_path()
    finally:
        if saved is None:
            os.environ.pop("SAFEPOINT_HOME")
        else:
            os.environ["SAFEPOINT_HOME"] = saved
