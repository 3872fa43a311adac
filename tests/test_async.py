"""async_save: the snapshot is a true copy, failures surface, busy policy, exit paths."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import safepoint.store
from safepoint import Checkpointer, SaveFailedError, latest_checkpoint
from safepoint.format import read_safetensors
from safepoint.records import read_events
from safepoint.snapshot import Snapshot, TensorFile, capture
from safepoint.staging import StagingBuffers

DEADLINE = 60.0


def _state(width: int = 64) -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)
    return {"model": model, "extra": {"note": "x"}}


def _weights(checkpoint: Path) -> torch.Tensor:
    tensors, _ = read_safetensors(checkpoint / "model.safetensors")
    return tensors["weight"]


def _cause_errnos(e: BaseException | None) -> list[int | None]:
    found = []
    while e is not None:
        found.append(getattr(e, "errno", None))
        e = e.__cause__
    return found


def _staging(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(".staging-")]


def test_snapshot_is_a_true_copy(tmp_path: Path, gate: threading.Event) -> None:
    state = _state()
    model = state["model"]
    before = model.weight.detach().clone()
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        pending = ckpt.save(1, state)
        assert not pending.done  # returned before the write (the gate holds it)
        with torch.no_grad():
            model.weight.add_(1.0)  # training goes on and changes the weights in place
        gate.set()
    assert torch.equal(_weights(tmp_path / "checkpoint-1"), before)
    assert not torch.equal(model.weight, before)


def _staged_weight(snapshot: Snapshot) -> torch.Tensor:
    weights = [
        t
        for f in snapshot.files.values()
        if isinstance(f, TensorFile)
        for name, t in f.tensors.items()
        if name.endswith("weight") and t.dim() == 2
    ]
    return weights[0]


def test_staging_buffers_are_reused(tmp_path: Path) -> None:
    state = _state()
    buffers = StagingBuffers()
    first = buffers.stage(capture(state, step=1, copy=False))
    with torch.no_grad():
        state["model"].weight.add_(1.0)
    again = buffers.stage(capture(state, step=2, copy=False))
    assert buffers.missing_bytes(capture(state, step=3, copy=False)) == 0
    old, new = (_staged_weight(s) for s in (first, again))
    assert old.data_ptr() == new.data_ptr()  # the same host buffer, refilled
    assert torch.equal(new, state["model"].weight.detach())
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state).wait(DEADLINE)
    assert torch.equal(_weights(tmp_path / "checkpoint-2"), state["model"].weight.detach())


def test_injected_writer_exception_surfaces_at_next_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _state()
    real = safepoint.store.write_safetensors
    calls = []

    def failing(fd: int, *args: object, **kwargs: object) -> tuple[int, str]:
        calls.append(1)
        if len(calls) == 2:  # the second save: write part of it, then fail
            os.write(fd, b"partial")
            raise RuntimeError("injected writer failure")
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(safepoint.store, "write_safetensors", failing)
    ckpt = Checkpointer(tmp_path, save_every=1, async_save=True)
    ckpt.step(1, state)
    ckpt.flush()
    pending = ckpt.step(2, state)  # fails in the background
    assert pending is not None and pending.wait_done(DEADLINE)
    with pytest.raises(SaveFailedError, match="checkpoint-2") as e:
        ckpt.step(3, state)
    assert isinstance(e.value.__cause__, RuntimeError)
    assert "injected writer failure" in str(e.value)
    assert _staging(tmp_path) == []
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    ckpt.close()  # raised once; close does not raise it again
    failed = [ev for ev in read_events(tmp_path) if ev.get("result") == "failed"]
    assert [ev["step"] for ev in failed] == [2]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 20 MB tmpfs: writes past it fail with ENOSPC."""
    where = tmp_path / "disk"
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(where)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield where / f"run-{uuid.uuid4().hex[:6]}"
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_enospc_in_background_surfaces_at_close(small_disk: Path) -> None:
    state = _state(width=1800)  # 13 MB of weights: one checkpoint fits, two do not
    ckpt = Checkpointer(small_disk, async_save=True, keep_last=1)
    ckpt.save(1, state)
    ckpt.save(2, state)  # waits for save 1, then fails in the background: disk full
    with pytest.raises(SaveFailedError, match="No space left") as e:
        ckpt.close()
    assert errno.ENOSPC in _cause_errnos(e.value)
    assert _staging(small_disk) == []
    assert latest_checkpoint(small_disk) == small_disk / "checkpoint-1"
    # closed means closed: the run lock is released
    Checkpointer(small_disk, async_save=True).close()


def test_skip_defers_the_save_to_the_next_step(tmp_path: Path, gate: threading.Event) -> None:
    state = _state()
    with Checkpointer(
        tmp_path, save_every=2, total_steps=8, async_save=True, on_busy="skip"
    ) as ckpt:
        ckpt.step(1, state)
        ckpt.step(2, state)  # in flight, held by the gate
        ckpt.step(3, state)
        assert ckpt.step(4, state) is None  # busy: skipped
        gate.set()
        ckpt.flush()
        pending = ckpt.step(5, state)  # the deferred save happens at the next step
        assert pending is not None and pending.step == 5
        for s in (6, 7, 8):
            ckpt.flush()  # a quick disk: never busy again
            ckpt.step(s, state)
    steps = [e["step"] for e in read_events(tmp_path) if e["event"] == "save"]
    skipped = [e["step"] for e in read_events(tmp_path) if e["event"] == "save_skipped"]
    assert skipped == [4]
    assert 2 in steps and 5 in steps and 8 in steps and 4 not in steps


def test_wait_policy_records_the_wait(tmp_path: Path, gate: threading.Event) -> None:
    state = _state()
    with Checkpointer(tmp_path, save_every=1, async_save=True) as ckpt:
        ckpt.step(1, state)
        threading.Timer(0.2, gate.set).start()
        ckpt.step(2, state)  # waits for save 1
    busy = [e for e in read_events(tmp_path) if e["event"] == "save_busy"]
    assert busy and busy[0]["action"] == "wait" and busy[0]["wait_s"] > 0.05
    saves = [e for e in read_events(tmp_path) if e["event"] == "save"]
    assert [e["step"] for e in saves] == [1, 2]
    assert all(e["mode"] == "async" and e["mb_per_s"] > 0 for e in saves)


def test_abandon_leaves_no_staging_and_previous_checkpoint(
    tmp_path: Path, gate: threading.Event
) -> None:
    state = _state(width=2048)  # 16 MB: several chunks
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        gate.set()
        ckpt.save(1, state)
        ckpt.flush()
        gate.clear()
        ckpt.save(2, state)
        threading.Timer(0.2, gate.set).start()  # the held write goes on shortly...
        ckpt.saver.abandon()  # ...and stops at its first chunk
        assert not ckpt.saver.background.writer.busy  # type: ignore[union-attr]
    assert _staging(tmp_path) == []
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    abandoned = [e for e in read_events(tmp_path) if e["event"] == "save_abandoned"]
    assert [(e["step"], e["stopped"]) for e in abandoned] == [(2, True)]


def test_short_of_memory_falls_back_to_inline_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = _state()
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.saver.background.reserve_bytes = 1 << 60  # type: ignore[union-attr]  # no machine has it
        with caplog.at_level(logging.WARNING, logger="safepoint"):
            first = ckpt.save(1, state)
            second = ckpt.save(2, state)
    assert first.done and second.done  # committed in-line
    warnings = [r for r in caplog.records if "not enough free memory" in r.getMessage()]
    assert len(warnings) == 1
    modes = [e["mode"] for e in read_events(tmp_path) if e["event"] == "save"]
    assert modes == ["inline", "inline"]


def test_exception_in_loop_still_commits_the_save_in_flight(
    tmp_path: Path, gate: threading.Event
) -> None:
    state = _state()
    with pytest.raises(KeyError, match="loop bug"), Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, state)
        threading.Timer(0.1, gate.set).start()
        raise KeyError("loop bug")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


def test_the_default_saves_in_the_background_at_every_size(tmp_path: Path) -> None:
    """The default since issue #14: the background measured cheaper at 0.1 MB too;
    "auto" (the default before) means the same now, and False saves in line."""
    from safepoint.options import Options

    assert Options().async_save is True
    assert Options(async_save="auto").async_save is True  # stored and reported as True
    small, large = _state(64), _state(2048)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, small).wait()
        ckpt.save(2, large).wait()
    with Checkpointer(tmp_path, async_save="auto") as ckpt:
        ckpt.save(3, small).wait()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(4, small).wait()
    modes = {e["step"]: e["mode"] for e in read_events(tmp_path) if e["event"] == "save"}
    assert modes == {1: "async", 2: "async", 3: "async", 4: "sync"}
    assert torch.equal(_weights(tmp_path / "checkpoint-2"), large["model"].weight.detach())  # type: ignore[attr-defined]


def test_queries_and_restore_see_the_save_in_flight(tmp_path: Path, gate: threading.Event) -> None:
    """A save returns before its checkpoint is written; list(), latest() and restore()
    answer for the run as it will be once that save has landed, not the one before."""
    state = _state()
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(3, state)
        threading.Timer(0.2, gate.set).start()  # the disk is slow: held 0.2 s
        assert [i.step for i in ckpt.list()] == [3]
        gate.clear()
        ckpt.save(4, state)
        threading.Timer(0.2, gate.set).start()
        assert ckpt.latest() is not None and ckpt.latest().step == 4  # type: ignore[union-attr]
        gate.clear()
        ckpt.save(5, state)
        threading.Timer(0.2, gate.set).start()
        assert ckpt.restore(_state(), checkpoint=5) == 5
