"""The disk pre-flight of real runs (issue #12): the estimate matches the first real
checkpoint of `safepoint train` (LoRA, --full), of the Trainer callback and of a plain
Checkpointer loop; on a real small tmpfs a run that cannot fit is refused before it
writes a checkpoint, and one that fits runs to the end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer
from safepoint.disk import used_bytes
from safepoint.records import read_events


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SAFEPOINT_HOME shared by the module, so the tiny model is built once."""
    return tmp_path_factory.getbasetemp() / "safepoint-home"


def train(home: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "safepoint", "train", "--output-dir", str(out), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SAFEPOINT_HOME": str(home)},
        timeout=300,
    )


def files_size(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.iterdir())


def preflight(out: Path) -> dict:
    return next(e for e in read_events(out) if e["event"] == "preflight")


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["--lora", "--full"])
def test_train_estimate_within_10_percent(home: Path, tmp_path: Path, mode: str) -> None:
    out = tmp_path / "run"
    proc = train(home, out, mode, "--max-steps", "20", "--save-every", "10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    check = preflight(out)
    first = out / "checkpoint-10"
    real = files_size(first)
    assert abs(check["checkpoint_bytes"] - real) <= 0.10 * real, (check, real)
    # the space it takes on this disk (whole blocks) is what the check compares
    assert abs(check["disk_bytes"] - used_bytes(first)) <= 0.10 * used_bytes(first)
    # trainer_state.json grows: the estimate is sized for the last checkpoint
    assert check["checkpoint_bytes"] >= 0.99 * files_size(out / "checkpoint-20")


def test_plain_loop_estimate_within_10_percent(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": model, "optimizer": opt}
    with Checkpointer(tmp_path, save_every="1", keep_last=2) as ckpt:
        ckpt.restore(state)  # runs the pre-flight: no optimizer state exists yet
        for step in range(1, 3):
            model(torch.randn(4, 64)).sum().backward()
            opt.step()
            ckpt.step(step, state, metrics={"loss": 1.0 / step})
    real = files_size(tmp_path / "checkpoint-1")
    estimate = preflight(tmp_path)["checkpoint_bytes"]
    assert abs(estimate - real) <= 0.10 * real, (estimate, real)


def test_callback_estimate_within_10_percent(home: Path, tmp_path: Path) -> None:
    """A plain transformers Trainer with the callback (accelerate wraps its AdamW)."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from safepoint import SafepointCallback
    from safepoint.app.tiny import tiny_model_path

    os.environ["SAFEPOINT_HOME"] = str(home)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path())
    ids = torch.randint(0, model.config.vocab_size, (16, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = SafepointCallback(save_every="2", keep_last=2)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    real = files_size(tmp_path / "run" / "checkpoint-2")
    estimate = preflight(tmp_path / "run")["checkpoint_bytes"]
    assert abs(estimate - real) <= 0.10 * real, (estimate, real)


@pytest.mark.slow
def test_refused_before_any_checkpoint_then_a_fitting_budget_runs(
    home: Path, tmpfs: Callable[[int], Path]
) -> None:
    disk = tmpfs(300 * 1024)
    out = disk / "run"
    # default keep_last=3 + keep_best=1: 3 LoRA checkpoints of ~106 KB on disk + 1 in flight
    proc = train(home, out, "--max-steps", "30", "--save-every", "10")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "free" in line and "KB" in line, line
    assert "--keep-last 1 --keep-best 0" in line, line
    assert checkpoints(out) == []
    # the option it suggests fits, and the run goes to the end
    proc = train(home, out, "--max-steps", "30", "--save-every", "10", "--keep-last", "1",
                 "--keep-best", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert checkpoints(out) == ["checkpoint-30"]


@pytest.mark.slow
def test_full_refused_on_a_disk_for_2_5_checkpoints(
    home: Path, tmpfs: Callable[[int], Path]
) -> None:
    disk = tmpfs(int(2.5 * 2_150_000))
    out = disk / "run"
    proc = train(home, out, "--full", "--max-steps", "40", "--keep-last", "3")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "MB" in proc.stderr and "free" in proc.stderr
    assert checkpoints(out) == []
