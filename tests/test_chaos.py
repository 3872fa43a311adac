"""``safepoint chaos``: passes on safepoint runs, fails on a script that saves in place."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safepoint.app.chaos import Kill, kill_plan
from safepoint.app.chaos_compare import same_file
from safepoint.app.chaos_process import processes, step_seconds
from safepoint.cli import main

PROGRAMS = Path(__file__).parent / "programs"
PY = sys.executable


def test_kill_plan_is_spread_over_the_run_and_seeded() -> None:
    plan = kill_plan(4, 7)
    assert plan == kill_plan(4, 7) and plan != kill_plan(4, 8)
    for k, f in enumerate(plan):  # one instant in each quarter of the run
        assert k / 4 < f < (k + 1) / 4


def test_same_file_compares_bytes_then_tensors(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    save_file({"x": torch.ones(3), "y": torch.zeros(2)}, str(a))
    save_file({"y": torch.zeros(2), "x": torch.ones(3)}, str(b), metadata={"note": "other"})
    save_file({"x": torch.ones(3), "y": torch.ones(2)}, str(c))
    assert same_file(a, a) == (True, "identical bytes")
    assert same_file(a, b) == (True, "identical tensors")
    assert same_file(a, c)[0] is False and "y" in same_file(a, c)[1]


def test_command_without_out_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "--", PY, "-c", "pass"]) == 2
    assert "put {out} where the command takes its output directory" in capsys.readouterr().err


@pytest.mark.crash
def test_chaos_fails_on_a_writer_without_the_protocol(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["chaos", "--kills", "3", "--seed", "1", "--workdir", str(tmp_path)]
    args += ["--compare", "{out}/final.safetensors", "--"]
    args += [PY, str(PROGRAMS / "broken_train.py"), "{out}", "--steps", "60"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "chaos: FAIL" in out
    assert "FAIL: exit" in out or "DIFFERENT" in out, out


@pytest.mark.crash
def test_chaos_passes_on_safepoint_train_with_kills_and_sigterm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["chaos", "--kills", "2", "--seed", "3", "--signals", "--workdir", str(tmp_path)]
    # a rerun after the end trains nothing, so checkpoint-30 is the last one. Saves every
    # 3 steps: a kill counts only after a checkpoint, and on a loaded machine the
    # attempts start slower than the reference run whose timing places the kills.
    args += ["--compare", "{out}/checkpoint-30/adapter_model.safetensors", "--"]
    args += [PY, "-m", "safepoint", "train", "--max-steps", "30", "--save-every", "3"]
    args += ["--output-dir", "{out}"]
    rc = main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "chaos: PASS" in out
    assert "compare adapter_model.safetensors: same" in out
    rows = [ln for ln in out.splitlines() if ln[:2] in ("1 ", "2 ", "3 ")]
    # the first kill lands mid-run (a later one may come after a fast resume finished)
    assert "killed" in rows[0] and "ok" in rows[0]


@pytest.mark.slow
@pytest.mark.crash
def test_chaos_on_the_toy_loop_with_many_kills(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["chaos", "--kills", "8", "--seed", "5", "--signals", "--workdir", str(tmp_path)]
    args += ["--compare", "{out}/final.safetensors", "--"]
    args += [PY, str(PROGRAMS / "toy_train.py"), "{out}", "--steps", "60", "--save-every", "4"]
    args += ["--step-sleep", "0.1"]
    rc = main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "compare final.safetensors: same (identical bytes)" in out


@pytest.mark.crash
def test_random_kills_never_pass_without_a_kill_after_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no checkpoint before the end: no kill can land after one
    args = ["chaos", "--kills", "1", "--seed", "0", "--workdir", str(tmp_path)]
    args += ["--compare", "{out}/final.safetensors", "--"]
    args += [PY, str(PROGRAMS / "toy_train.py"), "{out}", "--steps", "6", "--save-every", "100"]
    args += ["--step-sleep", "0.2"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "only 0 of 1 kills landed after a checkpoint" in out, out
    assert "chaos: FAIL" in out


def test_a_kill_lands_within_the_attempts_own_step(tmp_path: Path) -> None:
    """The random delay into a step is one step of the attempt, read from its run
    record; the reference run's step (here 100 times longer) only when it has none."""
    out = tmp_path / "run"
    run_program("toy_train.py", out, "--steps", "6", "--step-sleep", "0.02")
    seconds = step_seconds(processes(out)[-1])
    assert seconds is not None and 0.02 <= seconds < 0.5
    kill = Kill(0.5, signal.SIGKILL, span=12.0, total=6)
    delays = [Kill(f / 10, signal.SIGKILL, 12.0, 6).jitter(seconds) for f in range(1, 10)]
    assert all(0 <= d <= seconds for d in delays) and len(set(delays)) > 1
    assert kill.jitter(None) <= 2.0 and kill.jitter(seconds) == kill.jitter(seconds)
    assert step_seconds([]) is None


@pytest.mark.slow
@pytest.mark.crash
def test_kills_land_when_the_reference_run_was_much_slower(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hunt below failed when its reference run shared the machine (1.2 s per step)
    and the attempts did not (0.03 s): kills delayed by a reference step came after the
    run's end, and all six output directories ran out before the kills landed."""
    args = ["chaos", "--kills", "3", "--seed", "2", "--workdir", str(tmp_path)]
    args += ["--compare", "{out}/final.safetensors", "--"]
    args += [PY, str(PROGRAMS / "toy_train.py"), "{out}", "--steps", "8", "--save-every", "2"]
    args += ["--step-sleep", "0.1", "--reference-step-sleep", "2.0"]
    rc = main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "compare final.safetensors: same (identical bytes) [chaos]" in out, out


@pytest.mark.slow
@pytest.mark.crash
@pytest.mark.parametrize("seed", range(6))
def test_hunt_sigterm_resumes_on_safepoint_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int
) -> None:
    """Hunting loop for #12 part 4 (a SIGTERM at the wrong instant resumed into other
    weights): SIGKILL and SIGTERM at many seeded instants of a 30-step run."""
    args = ["chaos", "--kills", "6", "--seed", str(seed), "--signals"]
    args += ["--workdir", str(tmp_path), "--"]
    args += [PY, "-m", "safepoint", "train", "--max-steps", "30", "--save-every", "5"]
    args += ["--seed", str(seed), "--output-dir", "{out}"]
    rc = main(args)
    out = capsys.readouterr().out
    assert rc == 0, out


def test_a_power_cut_sample_falls_inside_the_saves() -> None:
    """#29 item 7: ``--power-cut --sample 2`` on a 10-step run cut before the write
    probe and after the end, so no cut fell inside a save, and it said PASS."""
    from safepoint.app.chaos_powercut import cut_points
    from safepoint.powercut.journal import Event

    paths = [".safepoint-probe", "safepoint.log"]
    for step in (5, 10):
        staging = f".staging-checkpoint-{step}-ab12"
        paths += [staging, f"{staging}/adapter_model.safetensors", f"{staging}/state.json"]
        paths += [f"checkpoint-{step}", "safepoint.log"]
    events = [Event(n, "write", p, {}) for n, p in enumerate(paths, 1)]
    for k in (1, 2, 3):
        cuts = cut_points(events, k)
        assert len(cuts) == k
        assert all("checkpoint-" in events[c - 1].path for c in cuts), cuts
    assert cut_points(events, None) == list(range(1, len(events) + 2))  # all, and the end
    assert cut_points(events[:2], 2) == []  # no save: no sample (the run says so, FAIL)


# A run that says it started (its pid, in its output directory) and then trains long.
SLEEPER = (
    "import os, sys, time; os.makedirs(sys.argv[1]); "
    "open(os.path.join(sys.argv[1], 'pid.part'), 'w').write(str(os.getpid())); "
    "os.rename(os.path.join(sys.argv[1], 'pid.part'), os.path.join(sys.argv[1], 'pid')); "
    "time.sleep(300)"
)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # dead, not reaped
    except FileNotFoundError:
        return True


@pytest.mark.crash
@pytest.mark.parametrize(
    "mode", [pytest.param([], id="kills"), pytest.param(["--file-events"], id="forked")]
)
def test_a_stopped_chaos_ends_its_run_and_removes_its_folder(
    tmp_path: Path, mode: list[str]
) -> None:
    """#29 item 7: SIGTERM once chaos has started a run (a fresh process, or one forked
    from a warm zygote) ends that run at once, removes chaos's temporary folder, exits 3."""
    argv = [PY, "-m", "safepoint", "chaos", *mode, "--kills", "1", "--", PY, "-c", SLEEPER]
    proc = subprocess.Popen(
        [*argv, "{out}"],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (started := list(tmp_path.glob("safepoint-chaos-*/reference/pid"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    pid = int(started[0].read_text())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, out + err
    assert "chaos: stopped by SIGTERM; ended its runs and removed" in err, err
    assert list(tmp_path.glob("safepoint-chaos-*")) == []
    deadline = time.monotonic() + 10  # SIGKILL'ed before chaos exited: gone at once
    while not _gone(pid):
        assert time.monotonic() < deadline, f"run {pid} still alive after chaos stopped"
        time.sleep(0.05)


def run_program(name: str, *args: object) -> None:
    subprocess.run([PY, str(PROGRAMS / name), *map(str, args)], check=True, capture_output=True)


def _fits_80(out: str) -> None:
    wide = [line for line in out.splitlines() if len(line) > 80]
    assert not wide, "\n".join(wide)


@pytest.mark.slow  # ~25 s on 2 loaded cores
@pytest.mark.crash
def test_random_kill_output_fits_80_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """#29 item 4: every line of the random-kill mode fits 80 columns: the lines naming
    its folders (a tmp_path passed 80) and an attempt's reason for not counting (92)."""
    monkeypatch.setenv("COLUMNS", "80")
    args = ["chaos", "--kills", "2", "--seed", "3", "--signals", "--workdir", str(tmp_path)]
    args += ["--compare", "{out}/final.safetensors", "--"]
    args += [PY, str(PROGRAMS / "toy_train.py"), "{out}", "--steps", "20", "--save-every", "3"]
    rc = main([*args, "--step-sleep", "0.05"])
    out = capsys.readouterr().out
    assert rc == 0, out
    _fits_80(out)
    assert str(tmp_path / "reference") in out
    assert "kills counted" in out and "chaos: PASS" in out


@pytest.mark.slow  # ~60 s: a run on the FUSE power-cut file system and 13 reruns
@pytest.mark.crash
def test_power_cut_output_fits_80_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """#29 item 4: ``chaos --power-cut --sample 2``: its table reached 113 columns (the
    event cut before, 50 wide and cut off); now every line fits, each event whole."""
    from safepoint.powercut import available

    if (why := available()) is not None:
        pytest.skip(f"power cuts: {why}")
    monkeypatch.setenv("COLUMNS", "80")
    args = ["chaos", "--power-cut", "--sample", "2", "--workdir", str(tmp_path)]
    args += ["--compare", "{out}/final.safetensors", "--"]
    args += [PY, str(PROGRAMS / "toy_train.py"), "{out}", "--steps", "10", "--save-every", "3"]
    rc = main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    _fits_80(out)
    assert "newest intact" in out and "chaos: PASS" in out
    assert re.search(r"^  write /\.staging-checkpoint-\d+-\w+/\S+\.safetensors$", out, re.M), out
