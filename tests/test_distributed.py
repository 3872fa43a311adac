"""Multi-process runs under torchrun (gloo on CPU): replicated state written by rank 0,
per-rank RNG, agreement on resume and on stop signals, killed mid-save and rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safepoint.distributed import RANKS_NAME
from safepoint.validity import inspect
from tests.conftest import launcher, same_tensors

pytestmark = [pytest.mark.distributed, pytest.mark.crash]

SCRIPT = Path(__file__).parent / "programs" / "dist_train.py"


def torchrun(
    out: Path, *args: str, nproc: int = 2, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), str(SCRIPT), str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_two_ranks_killed_mid_save_rerun_ends_identical(tmp_path: Path, mode: str) -> None:
    extra = ("--async-save",) if mode == "async" else ()
    reference = tmp_path / "reference"
    ok(torchrun(reference, "--steps", "20", "--save-every", "5"))
    ckpt = inspect(reference / "checkpoint-20")
    assert ckpt.valid and RANKS_NAME in ckpt.manifest.files  # type: ignore[union-attr]
    ranks = json.loads((reference / "checkpoint-20" / RANKS_NAME).read_bytes())
    assert ranks["world_size"] == 2 and ranks["rng"][0] != ranks["rng"][1]

    run = tmp_path / "run"
    # Rank 0 dies by SIGKILL on its second save (step 10), after the files, before the
    # manifest; torchrun then takes rank 1 down too.
    crashed = torchrun(
        run,
        "--steps",
        "20",
        "--save-every",
        "5",
        *extra,
        env={"SAFEPOINT_CRASH_AT": "after_files@2"},
    )
    assert crashed.returncode != 0
    assert not (run / "checkpoint-10").exists() and inspect(run / "checkpoint-5").valid

    rerun = ok(torchrun(run, "--steps", "20", "--save-every", "5", *extra))
    assert "rank 0 pid" in rerun.stdout and "start 5" in rerun.stdout
    assert rerun.stdout.count("start 5") == 2  # both ranks agreed on checkpoint-5
    assert same_tensors(reference / "final.safetensors", run / "final.safetensors")


@pytest.mark.slow
def test_resume_with_other_world_size_warns(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(torchrun(run, "--steps", "10", "--save-every", "5"))
    single = subprocess.run(
        [sys.executable, str(SCRIPT), str(run), "--steps", "15", "--save-every", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert "start 10" in single.stdout
    assert "saved by 2 process(es), this run has 1" in single.stderr
    assert "order in which data reaches each process changes" in single.stderr


@pytest.mark.slow
@pytest.mark.parametrize("state", ["replicated", "sharded"])
def test_signal_to_one_rank_stops_all_at_same_step(tmp_path: Path, state: str) -> None:
    """SIGTERM to rank 1 alone: both ranks save the same step and stop (with a sharded
    state, the emergency checkpoint is written by both, in pieces)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    cmd += ["2", str(SCRIPT), str(run), "--steps", "400", "--save-every", "1000"]
    cmd += ["--sharded"] if state == "sharded" else []
    cmd += ["--step-sleep", "0.02"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pid1 = None
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while pid1 is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("rank 1 pid"):
            pid1 = int(line.split()[3])
    assert pid1 is not None
    while time.monotonic() < deadline:
        if proc.stdout.readline().startswith("rank 1 step 20"):
            break
    os.kill(pid1, signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    valid = [d for d in run.iterdir() if d.name.startswith("checkpoint-") and inspect(d).valid]
    assert len(valid) == 1, err[-3000:]
    step = inspect(valid[0]).step
    assert 20 <= step < 400
    events = [json.loads(line) for line in (run / "safepoint.log.jsonl").read_text().splitlines()]
    assert any(e["event"] == "signal" and e["step"] == step for e in events)
    files = inspect(valid[0]).manifest.files  # type: ignore[union-attr]
    assert ("shards.json" in files) == (state == "sharded")


@pytest.mark.parametrize("state", ["replicated", pytest.param("sharded", marks=pytest.mark.slow)])
def test_an_exception_on_one_rank_tries_no_collective_save(tmp_path: Path, state: str) -> None:
    """Rank 0 fails alone: an emergency save there would wait in a collective the other
    ranks never join (a hang until the 30-minute gloo timeout). It says why it did not
    save, and the job ends within seconds, the last scheduled checkpoint intact."""
    run = tmp_path / "run"
    extra = ("--sharded",) if state == "sharded" else ()
    args = ("--steps", "20", "--save-every", "5", "--fail-at-step", "8", *extra)
    proc = torchrun(run, *args)
    assert proc.returncode != 0 and "a failure on rank 0 at step 8" in proc.stderr
    assert inspect(run / "checkpoint-5").valid and not (run / "checkpoint-7").exists()
    events = [json.loads(line) for line in (run / "safepoint.log.jsonl").read_text().splitlines()]
    (failure,) = [e for e in events if e["event"] == "exception"]
    assert failure["saved"] is None and "several processes" in failure["why_not"]


LAUNCHERS = {name: launcher(name) for name in ("torchrun", "accelerate")}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_hf_callback_two_ranks_killed_mid_save_rerun_ends_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    from safepoint.app.tiny import tiny_model_path

    monkeypatch.setenv("SAFEPOINT_HOME", str(tmp_path / "home"))
    model = tiny_model_path()
    script = Path(__file__).parent / "programs" / "hf_user_train.py"

    def launch(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
        nproc = "--nproc_per_node" if launcher == "torchrun" else "--num_processes"
        cmd = [*LAUNCHERS[launcher], nproc, "2", str(script), str(out), str(model)]
        cmd += ["--limit", "16", "--steps", "8", "--save-every", "3"]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)

    reference, run = tmp_path / "reference", tmp_path / "run"
    ok(launch(reference))
    assert RANKS_NAME in inspect(reference / "checkpoint-8").manifest.files  # type: ignore[union-attr]
    assert launch(run, SAFEPOINT_CRASH_AT="after_files@2").returncode != 0  # at step 6
    assert inspect(run / "checkpoint-3").valid and not (run / "checkpoint-6").exists()
    ok(launch(run))
    assert same_tensors(reference / "final.safetensors", run / "final.safetensors")


@pytest.mark.slow
def test_fsdp_full_state_killed_mid_save_rerun_ends_identical(tmp_path: Path) -> None:
    reference, run = tmp_path / "reference", tmp_path / "run"
    args = ("--fsdp", "--steps", "20", "--save-every", "5")
    ok(torchrun(reference, *args))
    assert "sharded.safetensors" in inspect(reference / "checkpoint-20").manifest.files  # type: ignore[union-attr]
    assert torchrun(run, *args, env={"SAFEPOINT_CRASH_AT": "after_files@2"}).returncode != 0
    assert inspect(run / "checkpoint-5").valid and not (run / "checkpoint-10").exists()
    rerun = ok(torchrun(run, *args))
    assert rerun.stdout.count("start 5") == 2
    assert same_tensors(reference / "final.safetensors", run / "final.safetensors")
