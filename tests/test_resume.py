"""``engine.resume``: which checkpoint a run resumes from, and the one error for each
kind of checkpoint that cannot be resumed (the same through every entry point:
tests/test_one_engine.py runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safepoint import (
    Checkpointer,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from safepoint.engine.resume import check_resumable
from safepoint.manifest import MANIFEST_NAME
from safepoint.records import read_events


def _state() -> dict:
    model = torch.nn.Linear(3, 3)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def _run(directory: Path, steps: list[int], **options: object) -> None:
    with Checkpointer(directory, signals=None, **options) as ckpt:  # type: ignore[arg-type]
        for step in steps:
            ckpt.save(step, _state()).wait()


def test_check_resumable_says_why(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run, [1, 2])
    assert check_resumable(run / "checkpoint-2", run, deep=True).step == 2
    with pytest.raises(CheckpointNotFoundError, match=r"valid checkpoints in .*checkpoint-1"):
        check_resumable(run / "checkpoint-9", run, deep=True)
    with pytest.raises(CheckpointNotFoundError, match=r"valid checkpoints in .*: none"):
        check_resumable(tmp_path / "nope" / "checkpoint-1", tmp_path / "nope", deep=True)
    (run / "checkpoint-3").mkdir()
    (run / "checkpoint-3" / "trainer_state.json").write_text("{}")  # the stock Trainer's
    with pytest.raises(IncompatibleCheckpointError, match="not written by safepoint"):
        check_resumable(run / "checkpoint-3", run, deep=True)
    (run / "checkpoint-2" / MANIFEST_NAME).unlink()
    with pytest.raises(CorruptCheckpointError, match="checkpoint-2 is"):
        check_resumable(run / "checkpoint-2", run, deep=True)


def test_the_newest_loadable_one_is_picked_and_the_skipped_are_recorded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run, [1, 2, 3])
    weights = run / "checkpoint-3" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum can tell
    weights.write_bytes(bytes(data))
    with Checkpointer(run, signals=None) as ckpt:
        assert ckpt.restore(_state()) == 2
    resumed = [e for e in read_events(run) if e["event"] == "resume"]
    assert [s["checkpoint"] for s in resumed[-1]["skipped"]] == ["checkpoint-3"]
    assert "checksum" in resumed[-1]["skipped"][0]["problem"]


def test_another_configuration_is_never_resumed_from(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(run, [1], fingerprint="aaaa")
    with Checkpointer(run, signals=None, fingerprint="bbbb") as ckpt:
        with pytest.raises(IncompatibleCheckpointError, match="another configuration"):
            ckpt.restore(_state())
        with pytest.raises(IncompatibleCheckpointError, match="another configuration"):
            ckpt.restore(_state(), checkpoint=1)
