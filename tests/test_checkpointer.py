"""The Checkpointer in a plain PyTorch loop: restore, step, save, retention, lock."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from safepoint import (
    Checkpointer,
    CheckpointNotFoundError,
    ConfigError,
    IncompatibleCheckpointError,
    RunLockedError,
    latest_checkpoint,
)
from safepoint.validity import scan

sys.path.insert(0, str(Path(__file__).parent))
from toy_train import build, train_step


def seed_all() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_identical_to_never_stopping(tmp_path: Path) -> None:
    seed_all()
    model, opt, sched = build(32)
    for _ in range(10):
        train_step(model, opt, sched)
    expected = weights(model)

    seed_all()
    model, opt, sched = build(32)
    state = {"model": model, "optimizer": opt, "scheduler": sched}
    with Checkpointer(tmp_path, save_every=4) as ckpt:
        for step in range(6):
            train_step(model, opt, sched)
            ckpt.step(step + 1, state)
    # A new process would rebuild everything from scratch, RNGs included:
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    model, opt, sched = build(32)
    state = {"model": model, "optimizer": opt, "scheduler": sched}
    with Checkpointer(tmp_path, save_every=4) as ckpt:
        start = ckpt.restore(state)
        assert start == 4
        for _ in range(start, 10):
            train_step(model, opt, sched)
    assert sched.last_epoch == 10
    got = weights(model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_restore_returns_none_on_an_empty_directory(tmp_path: Path) -> None:
    model, _, _ = build(4)
    with Checkpointer(tmp_path / "new") as ckpt:
        assert ckpt.restore({"model": model}) is None
        assert ckpt.latest() is None and ckpt.list() == []


def test_values_tensors_and_dicts_are_restored(tmp_path: Path) -> None:
    t = torch.arange(4.0)
    state = {"t": t, "cfg": {"a": [1, 2], "b": None}, "n": 7, "d": {"x": torch.ones(2)}}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state)
    t2 = torch.zeros(4)
    fresh = {"t": t2, "cfg": None, "n": 0, "d": {}}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(fresh) == 3
    assert fresh["t"] is t2 and torch.equal(t2, t)  # copied in place
    assert fresh["cfg"] == {"a": [1, 2], "b": None} and fresh["n"] == 7
    assert torch.equal(fresh["d"]["x"], torch.ones(2))


@pytest.mark.parametrize(
    ("save_every", "total", "expected"),
    [("4", 10, [4, 8, 10]), ("25%", 12, [3, 6, 9, 12]), ("100", 5, [5]), (None, 3, [3])],
)
def test_step_saves_on_schedule_and_at_the_end(tmp_path, save_every, total, expected) -> None:
    model, _, _ = build(4)
    state = {"model": model}
    with Checkpointer(tmp_path, save_every=save_every, total_steps=total) as ckpt:
        saved = [s for s in range(1, total + 1) if ckpt.step(s, state)]
    assert saved == expected
    assert [i.step for i in scan(tmp_path)] == expected


def test_keep_last_prunes_after_commit(tmp_path: Path) -> None:
    model, _, _ = build(4)
    with Checkpointer(tmp_path, save_every=1, keep_last=2) as ckpt:
        for s in range(1, 6):
            ckpt.step(s, {"model": model})
        assert [i.step for i in ckpt.list()] == [4, 5]


def test_newest_corrupt_falls_back_with_a_warning(tmp_path: Path, caplog) -> None:
    model, _, _ = build(4)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        for s in (1, 2):
            ckpt.step(s, {"model": model})
    data = bytearray((tmp_path / "checkpoint-2" / "model.safetensors").read_bytes())
    data[-3] ^= 1
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(bytes(data))
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore({"model": model}) == 1
    assert "skipping" in caplog.text and "checkpoint-2" in caplog.text and "checksum" in caplog.text


def test_explicit_missing_checkpoint_lists_what_exists(tmp_path: Path) -> None:
    model, _, _ = build(4)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, {"model": model})
        with pytest.raises(CheckpointNotFoundError, match="checkpoint-5"):
            ckpt.restore({"model": model}, checkpoint=7)
        assert ckpt.restore({"model": model}, checkpoint=tmp_path / "checkpoint-5") == 5


def test_fingerprint_mismatch_is_refused(tmp_path: Path) -> None:
    model, _, _ = build(4)
    with Checkpointer(tmp_path, fingerprint="aaa") as ckpt:
        ckpt.save(1, {"model": model})
    with (
        Checkpointer(tmp_path, fingerprint="bbb") as ckpt,
        pytest.raises(IncompatibleCheckpointError, match="another configuration"),
    ):
        ckpt.restore({"model": model})


def test_state_that_does_not_fit_is_incompatible(tmp_path: Path) -> None:
    model, _, _ = build(4)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"model": model})
    other, _, _ = build(8)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(IncompatibleCheckpointError, match="same model"):
            ckpt.restore({"model": other})
        with pytest.raises(IncompatibleCheckpointError, match="has no 'optimizer'"):
            ckpt.restore({"model": model, "optimizer": torch.optim.SGD(model.parameters(), 1)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"save_every": 0}, "at least 1"),
        ({"save_every": "5x"}, "cannot read"),
        ({"keep_last": 0}, "keep at least 1"),
        ({"save_every": "10%"}, "needs the run length"),
        ({"mode": "best"}, "'min' or 'max'"),
        ({"max_disk": "lots"}, "not a size"),
    ],
)
def test_bad_options_raise_config_errors(tmp_path, kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Checkpointer(tmp_path, **kwargs)
    assert os.listdir(tmp_path) == []  # nothing written


def test_bad_state_key(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ConfigError, match="file name"):
        ckpt.save(1, {"../model": torch.ones(1)})


def test_unwritable_output_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        Checkpointer(tmp_path / "file")
    with pytest.raises(ConfigError, match="cannot create"):
        Checkpointer(tmp_path / "file" / "sub")


def test_second_checkpointer_on_a_directory_is_refused(tmp_path: Path) -> None:
    with Checkpointer(tmp_path), pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        Checkpointer(tmp_path)
    Checkpointer(tmp_path).close()  # released on close


def test_lock_of_a_killed_process_does_not_block(tmp_path: Path) -> None:
    code = (
        f"from safepoint import Checkpointer; c = Checkpointer({str(tmp_path)!r}); "
        "print('locked', flush=True); import time; time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
            Checkpointer(tmp_path)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            Checkpointer(tmp_path).close()
            break
        except RunLockedError:
            assert time.monotonic() < deadline, "lock of a dead process still held"
            time.sleep(0.05)


def test_closed_checkpointer_refuses_to_save(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.close()
    ckpt.close()
    with pytest.raises(ConfigError, match="closed"):
        ckpt.save(1, {"x": 1})
    assert latest_checkpoint(tmp_path) is None
