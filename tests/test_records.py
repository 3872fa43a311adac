"""The run record: crash-tolerant reading, atomic appends, and what the Checkpointer logs."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer, SaveFailedError
from safepoint.records import (
    RECORD_NAME,
    RunRecord,
    last_reached_step,
    reached_step,
    read_events,
    retention_rule,
    save_timings,
)
from safepoint.retention import RetentionPolicy

TESTS = Path(__file__).parent
REPORT_TRAIN = TESTS / "programs" / "report_train.py"


def kinds(directory: Path) -> list[str]:
    return [e["event"] for e in read_events(directory)]


def test_torn_last_line_and_garbage_are_skipped(tmp_path: Path) -> None:
    record = RunRecord(tmp_path)
    record.event("metrics", step=1, metrics={"loss": 1.0})
    record.event("metrics", step=2, metrics={"loss": 0.5})
    with open(tmp_path / RECORD_NAME, "ab") as f:
        f.write(b"\x00\xffnot json\n[1, 2]\n")  # garbage and a non-event line
    record.event("save", step=2, stall_s=0.1)
    with open(tmp_path / RECORD_NAME, "ab") as f:
        f.write(b'{"t": 1, "event": "metrics", "step": 3, "metr')  # torn by a crash
    assert [(e["event"], e.get("step")) for e in read_events(tmp_path)] == [
        ("metrics", 1),
        ("metrics", 2),
        ("save", 2),
    ]
    assert list(read_events(tmp_path / "nowhere")) == []


def test_a_new_process_after_a_torn_line_loses_only_the_torn_line(tmp_path: Path) -> None:
    (tmp_path / RECORD_NAME).write_bytes(b'{"t":1,"event":"start"}\n{"t":2,"event":"met')
    RunRecord(tmp_path).event("start", pid=1)
    RunRecord(tmp_path).event("close", step=None)
    assert kinds(tmp_path) == ["start", "start", "close"]


def test_non_finite_and_odd_values_are_written_as_text(tmp_path: Path) -> None:
    RunRecord(tmp_path).event(
        "metrics", step=1, metrics={"loss": float("nan"), "x": float("inf"), "p": Path("/a")}
    )
    (event,) = read_events(tmp_path)
    assert event["metrics"] == {"loss": "nan", "x": "inf", "p": "/a"}


def _append_many(directory: str, tag: int) -> None:
    record = RunRecord(directory)
    for i in range(300):
        record.event("metrics", step=i, metrics={"tag": tag, "pad": "x" * 200})


def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), t)) for t in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    lines = (tmp_path / RECORD_NAME).read_bytes().splitlines()
    assert len(lines) == 900
    assert all(json.loads(line)["event"] == "metrics" for line in lines)


def test_unwritable_record_warns_once_and_never_raises(tmp_path: Path, caplog) -> None:
    (tmp_path / RECORD_NAME).mkdir()  # a folder in the way: every append fails
    record = RunRecord(tmp_path)
    with caplog.at_level("WARNING", logger="safepoint"):
        record.event("metrics", step=1)
        record.event("metrics", step=2)
    assert sum("cannot append to the run record" in r.message for r in caplog.records) == 1


def test_reached_step_looks_at_the_last_process_only() -> None:
    events = [
        {"event": "start"},
        {"event": "metrics", "step": 40},
        {"event": "start"},
        {"event": "metrics", "step": 21},
        {"event": "save", "step": 25},
        {"event": "metrics", "step": 23},
    ]
    assert reached_step(events) == 25
    assert reached_step(events[:2]) == 40
    assert reached_step([{"event": "start"}]) is None


@pytest.mark.parametrize("lines", [0, 3, 5000])
def test_last_reached_step_reads_the_tail_and_agrees_with_the_whole(
    tmp_path: Path, lines: int
) -> None:
    assert last_reached_step(tmp_path) is None
    record = RunRecord(tmp_path)
    record.event("start")
    for i in range(lines):
        record.event("metrics", step=i, metrics={"pad": "x" * 80})
    assert last_reached_step(tmp_path) == reached_step(read_events(tmp_path))
    record.event("start")
    record.event("resume", step=2)
    assert last_reached_step(tmp_path) == 2 == reached_step(read_events(tmp_path))
    record.event("start")  # a process that logged nothing yet
    assert last_reached_step(tmp_path) is None
    # A background save's event lands after later steps' metrics: the max still counts.
    record.event("metrics", step=9)
    record.event("metrics", step=10)
    record.event("save", step=8)
    assert last_reached_step(tmp_path) == 10 == reached_step(read_events(tmp_path))


def test_retention_rule_in_words() -> None:
    policy = RetentionPolicy(keep_last=3, keep_best=1, max_bytes=1000, keep_every=50)
    assert retention_rule(policy) == (
        "keep_last=3, keep_best=1 by eval_loss (min), keep_every=50, max_disk=1000"
    )
    assert retention_rule(RetentionPolicy()) == "retention"


def _state() -> dict[str, object]:
    torch.manual_seed(0)
    return {"model": torch.nn.Linear(100, 100)}


def test_checkpointer_records_start_metrics_saves_deletions_close(tmp_path: Path) -> None:
    state = _state()
    # In line: the events in a known order (a background save's "save" lands after later
    # steps' metrics: test_last_reached_step_reads_the_tail_and_agrees_with_the_whole).
    kwargs = {"save_every": "2", "keep_last": 1, "max_disk": "10MB", "async_save": False}
    with Checkpointer(tmp_path, **kwargs) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.record.metrics(step, {"loss": 1.0 / step})
            ckpt.step(step, state, metrics={"loss": 1.0 / step, "eval_loss": 0.5})
    ours = {"start", "metrics", "save", "delete", "close"}  # others add their own kinds
    events = [e for e in read_events(tmp_path) if e["event"] in ours]
    assert [e["event"] for e in events] == [
        "start",
        *("metrics",) * 4,
        "save",
        *("metrics",) * 4,
        *("save", "delete"),
        "close",
    ]
    start = events[0]
    assert start["config"]["keep_last"] == 1
    assert start["config"]["max_disk"] == 10_000_000
    assert start["on_disk"] == [] and start["pid"] == os.getpid()
    # record.metrics then step() with the same loss: the loss is recorded once per step,
    # the eval_loss that only step() had is recorded too.
    assert events[1]["metrics"] == {"loss": 1.0}
    assert events[2]["metrics"] == {"eval_loss": 0.5}
    save = events[5]
    assert save["step"] == 2 and save["result"] == "committed"
    assert save["bytes"] > 40_000  # the 100x100 weights alone
    assert save["stall_s"] > 0 and save["write_s"] > 0
    delete = events[11]
    assert delete["checkpoint"] == "checkpoint-2" and delete["bytes"] == save["bytes"]
    assert delete["rule"] == "keep_last=1, max_disk=10000000"
    assert events[-1] == {**events[-1], "event": "close", "step": 4}
    assert set(save_timings(tmp_path)) == {2, 4}


def run_report_train(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPORT_TRAIN), str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.crash
def test_resume_records_steps_lost_and_why_a_newer_checkpoint_was_skipped(
    tmp_path: Path,
) -> None:
    killed = run_report_train(tmp_path, "--steps", "20", "--die-at", "17", "--keep-last", "3")
    assert killed.returncode == -9, killed.stderr
    # Damage the newest checkpoint: resume must fall back to checkpoint-10 and say why.
    victim = tmp_path / "checkpoint-15" / "model.safetensors"
    if not victim.exists():
        victim = next(p for p in (tmp_path / "checkpoint-15").iterdir() if p.suffix != ".json")
    victim.write_bytes(b"\0" * victim.stat().st_size)
    rerun = run_report_train(tmp_path, "--steps", "20", "--keep-last", "3")
    assert rerun.returncode == 0, rerun.stderr
    assert "start 10" in rerun.stdout
    (resume,) = [e for e in read_events(tmp_path) if e["event"] == "resume"]
    assert resume["step"] == 10 and resume["checkpoint"] == "checkpoint-10"
    assert resume["reached"] == 17 and resume["steps_lost"] == 7
    (skipped,) = resume["skipped"]
    assert skipped["checkpoint"] == "checkpoint-15"
    assert "checksum" in skipped["problem"]
    assert kinds(tmp_path).count("start") == 2
    assert kinds(tmp_path).count("close") == 1  # the killed process never closed


def test_failed_save_is_recorded(tmp_path: Path) -> None:
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        state = _state()  # ~67 KB a checkpoint: the first save fits, the second does not
        with Checkpointer(disk, save_every="1") as ckpt:
            ckpt.step(1, state)
            with pytest.raises(SaveFailedError):
                handle = ckpt.step(2, state)  # in line it would raise here
                assert handle is not None
                handle.wait()  # in the background: here
        events = list(read_events(disk))
        failed = [e for e in events if e["event"] == "save" and e["result"] == "failed"]
        assert [e["step"] for e in failed] == [2]
        (error,) = [e for e in events if e["event"] == "error"]
        assert error["where"] == "save" and error["step"] == 2
        assert "checkpoint-2" in error["error"]
        assert set(save_timings(disk)) == {1}
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _append_raw(directory: Path, data: bytes) -> None:
    with open(directory / RECORD_NAME, "ab") as f:
        f.write(data)


def _append_nuls(directory: Path, size: int) -> None:
    # A hole reads as NULs, as the blocks a power cut leaves do, without writing them.
    with open(directory / RECORD_NAME, "ab") as f:
        f.truncate(f.seek(0, os.SEEK_END) + size)


@pytest.mark.timeout(30)  # linear: well under 1 s; the old quadratic reader took ~80 s
def test_a_record_ending_in_a_nul_block_is_read_in_linear_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = RunRecord(tmp_path)
    record.event("start")
    for step in (1, 2, 3):
        record.event("metrics", step=step, metrics={"loss": 1.0})
    _append_nuls(tmp_path, 128 << 20)  # no newline in 128 MB: the power cut's block
    assert last_reached_step(tmp_path) == 3
    assert kinds(tmp_path) == ["start", "metrics", "metrics", "metrics"]
    assert caplog.text.count("longer than") == 1  # one warning, however often it is read


@pytest.mark.timeout(30)
def test_valid_lines_around_a_nul_block_and_an_overlong_line_are_all_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from safepoint.records import MAX_LINE

    record = RunRecord(tmp_path)
    record.event("start")
    record.event("metrics", step=3, metrics={"loss": 1.0})
    _append_nuls(tmp_path, 40 << 20)
    # The same process goes on after the damage (its next line starts on a fresh one);
    # the saves below are no metrics, so the backwards reader must cross the block.
    RunRecord(tmp_path).event("save", step=2, result="committed")
    _append_raw(tmp_path, b"x" * (MAX_LINE + 5) + b"\n")  # just over the cap: damage
    pad = "p" * (MAX_LINE - 200)  # just under the cap: a line to keep
    record.event("save", step=1, result="committed", pad=pad)
    assert last_reached_step(tmp_path) == 3 == reached_step(read_events(tmp_path))
    assert kinds(tmp_path) == ["start", "metrics", "save", "save"]
    assert [e.get("step") for e in read_events(tmp_path)] == [None, 3, 2, 1]
    record.event("start")  # a new process after all that
    record.event("metrics", step=7, metrics={"loss": 0.5})
    assert last_reached_step(tmp_path) == 7 == reached_step(read_events(tmp_path))
    assert caplog.text.count("longer than") == 1
