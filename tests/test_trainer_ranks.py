"""#13: SafepointCallback in a user's SFTTrainer script under two processes (gloo on CPU),
hundreds of steps, time-based and ``auto`` schedules, launched by torchrun and by
``accelerate launch``: every rank exits 0 and all ranks commit the same steps.

A time-based schedule (``1s``, ``auto``) read from each rank's own clock lets one rank
decide to save at a step where the other does not; the save's collectives then meet the
other rank's gradient all-reduce and the run dies (or hangs) in a gloo collective. The
program (tests/programs/sft_ranks.py) records, per rank, the steps its callback committed
(the public ``committed`` hook) in ``commits-rank<R>.json`` beside the output directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from safepoint.records import read_events
from safepoint.validity import inspect, newest_first
from tests.conftest import launcher

pytestmark = [pytest.mark.distributed, pytest.mark.crash]

PROGRAM = Path(__file__).parent / "programs" / "sft_ranks.py"
NPROC = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(name: str) -> list[str]:
    return launcher(name, port=None if name == "torchrun" else _free_port())


def launch(
    launcher: str, out: Path, model: Path, *args: str, timeout: float
) -> tuple[int | str, str]:
    """Run the program on ``NPROC`` ranks: (exit code or "timeout", stdout+stderr).

    Ranks stuck in mismatched collectives hang (the Trainer's ``ddp_timeout`` does not
    always end them) and defer SIGTERM to a step end they never reach: when ``timeout``
    runs out, the launcher and every process under it are killed (SIGKILL, by pid).
    """
    nproc = "--nproc_per_node" if launcher == "torchrun" else "--num_processes"
    cmd = [*_launcher(launcher), nproc, str(NPROC), str(PROGRAM), str(out), str(model), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid, dump_first=True)
        output, _ = proc.communicate(timeout=60)
        return "timeout", output


def _kill_tree(pid: int, *, dump_first: bool = False) -> None:
    """SIGKILL ``pid`` and its descendants (the launcher's workers run in sessions of
    their own, so a process-group kill would miss them). ``dump_first``: ask the workers
    for their stacks first (the program prints them on SIGUSR2), to show where they hang."""
    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    if dump_first:
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                if any(str(PROGRAM) in part for part in p.cmdline()):
                    p.send_signal(signal.SIGUSR2)
        time.sleep(3)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=30)


def _records(parent: Path) -> dict[int, dict]:
    found = {}
    for rank in range(NPROC):
        path = parent / f"commits-rank{rank}.json"
        if path.is_file():
            found[rank] = json.loads(path.read_text())
    return found


def _explain(code: int | str, output: str, records: dict[int, dict]) -> str:
    noise = ("{'loss'", "Loading weights", "warnings.warn(", "  warnings.warn")
    lines = [
        ln
        for ln in output.splitlines()
        if ln.strip() and not ln.startswith(noise) and "Warning" not in ln
    ]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln or "safepoint:" in ln]
    commits = {r: (d["steps"], d["finished"], d["global_step"]) for r, d in records.items()}
    return (
        f"exit {code}; per rank (committed steps, finished, global_step): {commits}\n"
        + "error lines:\n"
        + "\n".join(errors[-20:])
        + "\n--- output tail ---\n"
        + "\n".join(lines[-90:])
    )


def check_ranks_agree(
    launcher: str, tmp_path: Path, model: Path, *args: str, steps: int, timeout: float
) -> None:
    out = tmp_path / "run"
    code, output = launch(launcher, out, model, "--steps", str(steps), *args, timeout=timeout)
    records = _records(tmp_path)
    why = _explain(code, output, records)
    assert code == 0, why
    assert sorted(records) == list(range(NPROC)), why
    for data in records.values():
        assert data["finished"] and data["global_step"] == steps, why
    committed = [records[r]["steps"] for r in range(NPROC)]
    assert all(c == committed[0] for c in committed), why  # the same steps on every rank
    first = committed[0]
    assert first == sorted(set(first)), why  # each step once, in order
    assert len(first) >= 2 and first[-1] == steps, why  # saved mid-run, and at the end
    # What rank 0 (the writer) committed is what the run record and the folder say.
    saves = [
        e["step"]
        for e in read_events(out)
        if e.get("event") == "save" and e.get("result") == "committed"
    ]
    assert saves == first, why
    newest = next(newest_first(out), None)
    assert newest is not None and newest.step == steps and inspect(newest.path, deep=True).valid


# One case small enough for the default run (< 90 s when it passes, on 2 CPU cores).
def test_torchrun_two_ranks_save_every_second_commit_the_same_steps(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    check_ranks_agree(
        "torchrun", tmp_path, tiny_model_dir, "--save-every", "1s", steps=120, timeout=150
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("launcher", "save_every", "extra"),
    [
        ("torchrun", "1s", ()),
        ("torchrun", "auto", ()),
        ("accelerate", "1s", ()),
        ("accelerate", "auto", ()),
        ("torchrun", "1s", ("--async-save",)),
    ],
    ids=["torchrun-1s", "torchrun-auto", "accelerate-1s", "accelerate-auto", "torchrun-1s-async"],
)
def test_two_ranks_hundreds_of_steps_commit_the_same_steps(
    tmp_path: Path, tiny_model_dir: Path, launcher: str, save_every: str, extra: tuple[str, ...]
) -> None:
    if save_every == "auto":
        # A tiny model saves in milliseconds: with the default 24 h MTBF, auto would save
        # once a minute or so; a 60 s MTBF makes it save every few seconds of this run.
        extra = (*extra, "--mtbf", "60s", "--max-overhead", "0.1")
    check_ranks_agree(
        launcher,
        tmp_path,
        tiny_model_dir,
        "--save-every",
        save_every,
        *extra,
        steps=400,
        timeout=420,
    )
