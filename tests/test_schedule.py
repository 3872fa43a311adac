"""When to save: parsing, the decision table, ``auto``, the final save, start-up warnings,
and a real time-based run."""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer, ConfigError
from safepoint.plan import optimal_interval
from safepoint.records import read_events
from safepoint.schedule import AutoInterval, Schedule, Trigger, parse_save_every
from tests.conftest import run_toy


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, ()),
        ("500", (Trigger("steps", 500),)),
        (500, (Trigger("steps", 500),)),
        ("10%", (Trigger("fraction", 10),)),
        ("2.5 %", (Trigger("fraction", 2.5),)),
        ("30s", (Trigger("time", 30),)),
        ("15m", (Trigger("time", 900),)),
        ("2h", (Trigger("time", 7200),)),
        ("epoch", (Trigger("epoch"),)),
        ("AUTO", (Trigger("auto"),)),
        ("500, 30m", (Trigger("steps", 500), Trigger("time", 1800))),
        ("auto,epoch", (Trigger("auto"), Trigger("epoch"))),
    ],
)
def test_parse_save_every(spec: object, expected: tuple[Trigger, ...]) -> None:
    assert parse_save_every(spec) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["0", "-5", "abc", "150%", "0%", "", "500,", "10 steps", True])
def test_parse_save_every_rejects(spec: object) -> None:
    with pytest.raises(ConfigError, match="save_every"):
        parse_save_every(spec)  # type: ignore[arg-type]


def test_fraction_needs_total_steps() -> None:
    with pytest.raises(ConfigError, match="total_steps"):
        Schedule(parse_save_every("10%"))


# Each row: spec, total_steps, then (step, now, epoch_end) -> due?; saves happen when due.
TABLE = [
    ("5", None, [(1, 0, False, 0), (4, 0, False, 0), (5, 0, False, 1), (10, 0, False, 1)]),
    ("10%", 50, [(4, 0, False, 0), (5, 0, False, 1), (9, 0, False, 0), (10, 0, False, 1)]),
    ("33%", 10, [(2, 0, False, 0), (3, 0, False, 1), (6, 0, False, 1), (7, 0, False, 0)]),
    ("30s", None, [(1, 10, False, 0), (2, 29.9, False, 0), (3, 30, False, 1), (4, 59, False, 0)]),
    ("30s", None, [(1, 10, False, 0), (5, 60, False, 1), (6, 90, False, 1)]),
    ("epoch", None, [(1, 100, False, 0), (2, 100, True, 1), (3, 1e6, False, 0)]),
    ("100,1m", None, [(50, 61, False, 1), (100, 62, False, 1), (101, 63, False, 0)]),
    ("7,epoch", None, [(3, 0, True, 1), (7, 0, False, 1), (8, 0, True, 1), (9, 0, False, 0)]),
    (None, None, [(1, 1e9, True, 0), (100, 1e9, False, 0)]),
]


@pytest.mark.parametrize(("spec", "total", "rows"), TABLE)
def test_due_table(spec: str | None, total: int | None, rows: list[tuple]) -> None:
    schedule = Schedule(parse_save_every(spec), total_steps=total)
    schedule.start(0.0)
    for step, now, epoch_end, want in rows:
        reason = schedule.due(step, now, epoch_end=epoch_end)
        assert bool(reason) == bool(want), (step, now, reason)
        if reason:
            schedule.saved(step, now)


def test_same_step_never_due_twice() -> None:
    schedule = Schedule(parse_save_every("1"))
    schedule.start(0.0)
    assert schedule.due(1, 0.0)
    schedule.saved(1, 0.0)
    assert schedule.due(1, 0.0, epoch_end=True) is None


def test_resumed_run_saves_on_the_same_steps() -> None:
    fresh, resumed = Schedule(parse_save_every("4")), Schedule(parse_save_every("4"))
    fresh.start(0.0)
    resumed.start(0.0, step=6)  # restored from a checkpoint at step 6
    assert [s for s in range(7, 13) if fresh.due(s, 0.0)] == [8, 12]
    assert [s for s in range(7, 13) if resumed.due(s, 0.0)] == [8, 12]


def test_failed_save_waits_a_full_interval() -> None:
    schedule = Schedule(parse_save_every("10s"))
    schedule.start(0.0)
    assert schedule.due(1, 10.0)
    schedule.failed(10.0)
    assert schedule.due(2, 15.0) is None
    assert schedule.due(3, 20.0)


def test_step_time_is_measured_without_the_saves() -> None:
    schedule = Schedule(parse_save_every("2"))
    schedule.start(100.0)
    schedule.due(1, 101.0)  # 1 s per step
    assert schedule.due(2, 102.0)
    schedule.saved(2, 150.0)  # a 48 s save: not step time
    schedule.due(3, 151.0)
    assert schedule.step_time == pytest.approx(1.0)
    assert schedule.step_samples == 3


def test_interval_seconds() -> None:
    schedule = Schedule(parse_save_every("100,1m"), total_steps=1000)
    assert schedule.interval_seconds(0.5) == 50.0
    assert schedule.interval_seconds(1.0) == 60.0
    assert Schedule(parse_save_every("epoch")).interval_seconds(1.0) is None


# ----------------------------------------------------------------------------- auto


def test_auto_starts_from_an_assumed_stall_and_follows_measurements() -> None:
    auto = AutoInterval(mtbf=6 * 3600, max_overhead=0.02)
    auto.assume(2_000_000_000)  # 2 GB at the assumed 200 MB/s: 10 s
    assert auto.stall == pytest.approx(10.0)
    assert auto.interval == pytest.approx(optimal_interval(10.0, 6 * 3600, 0.02)[0])
    note = auto.observe(stall=40.0, step_time=2.0)
    assert note is not None and "measured 40 s per save" in note
    assert "(was 10.8 min)" in note and "overhead bound (2% of the run)" in note
    assert auto.interval == pytest.approx(optimal_interval(40.0, 6 * 3600, 0.02)[0])
    assert "~" in note and "steps" in note
    # a similar measurement moves the median little: no change, no message
    assert auto.observe(stall=41.0) is None
    # stalls so short that the overhead bound does not bite, then ones where it does
    tight = AutoInterval(mtbf=1e9, max_overhead=0.5)
    tight.observe(stall=100.0)
    assert tight.rule == "Daly optimum"
    loose = AutoInterval(mtbf=60.0, max_overhead=0.01)
    loose.observe(stall=1.0)
    assert loose.rule.startswith("overhead bound")
    assert loose.interval == pytest.approx(99.0)


def test_auto_uses_the_median_of_recent_stalls() -> None:
    auto = AutoInterval(mtbf=3600.0)
    for stall in (1.0, 1.0, 30.0):  # one slow save does not triple the interval
        auto.observe(stall=stall)
    assert auto.stall == 1.0


@pytest.mark.parametrize(("mtbf", "overhead"), [(0, 0.02), (-1, 0.02), (10, 0), (10, 1)])
def test_auto_rejects_bad_settings(mtbf: float, overhead: float) -> None:
    with pytest.raises(ConfigError):
        AutoInterval(mtbf=mtbf, max_overhead=overhead)


def test_auto_due_after_interval() -> None:
    schedule = Schedule(parse_save_every("auto"), mtbf=50.0, max_overhead=0.5)
    schedule.start(0.0)
    schedule.auto.observe(stall=1.0)  # type: ignore[union-attr]
    interval = schedule.auto.interval  # type: ignore[union-attr]
    assert interval == pytest.approx(10 * (1 + math.sqrt(0.01) / 3 + 0.01 / 9) - 1)
    assert schedule.due(1, interval - 0.01) is None
    reason = schedule.due(2, interval)
    assert reason is not None and reason.startswith("auto")


# ------------------------------------------------------------- with the Checkpointer


def _state() -> dict[str, object]:
    model = torch.nn.Linear(4, 2)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def test_final_checkpoint_always_saved(tmp_path: Path) -> None:
    state = _state()
    for spec in ("7", None, "1h", "epoch", "auto"):
        out = tmp_path / str(spec)
        with Checkpointer(out, save_every=spec, total_steps=10) as ckpt:
            ckpt.restore(state)
            for step in range(1, 11):
                ckpt.step(step, state)
            steps = [i.step for i in ckpt.list()]
        assert steps[-1] == 10, (spec, steps)
        assert steps == ([7, 10] if spec == "7" else [10])


def test_warns_at_start_about_costly_schedule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Saving every step of a 1 ms step costs far more than 10% of the run.
    state = _state()
    with (
        caplog.at_level(logging.WARNING, logger="safepoint"),
        Checkpointer(tmp_path, save_every="1", keep_last=1) as ckpt,
    ):
        ckpt.restore(state)
        for step in range(1, 4):
            ckpt.step(step, state)
    warnings = [r.getMessage() for r in caplog.records if "spends ~" in r.getMessage()]
    assert len(warnings) == 1
    # the library names the option; only the CLI speaks of --flags
    assert "saving every 1 steps" in warnings[0] and "save_every" in warnings[0]
    events = [e for e in read_events(tmp_path) if e["event"] == "warning"]
    assert any("spends ~" in e["message"] for e in events)


def test_no_warning_for_a_cheap_schedule(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = _state()
    with (
        caplog.at_level(logging.WARNING, logger="safepoint"),
        Checkpointer(tmp_path, save_every="1000", keep_last=1, total_steps=3) as ckpt,
    ):
        ckpt.restore(state)
        for step in range(1, 4):
            ckpt.step(step, state)
    assert not [r for r in caplog.records if "spends" in r.getMessage()]


def test_auto_logs_each_change_with_its_reason(tmp_path: Path) -> None:
    state = _state()
    with Checkpointer(
        tmp_path, save_every="auto", mtbf="1s", max_overhead=0.5, total_steps=40
    ) as ckpt:
        ckpt.restore(state)
        for step in range(1, 41):
            time.sleep(0.02)
            ckpt.step(step, state)
    events = list(read_events(tmp_path))
    changes = [e for e in events if e["event"] == "schedule"]
    assert changes[0]["reason"].startswith("auto save interval")
    assert "assuming" in changes[0]["reason"]
    assert any("measured" in e["reason"] for e in changes[1:])
    saves = [e for e in events if e["event"] == "save"]
    assert len(saves) >= 2 and saves[-1]["step"] == 40
    policy = json.loads((tmp_path / "checkpoint-40" / "safepoint.json").read_text())["info"]
    assert policy["policy"]["save_every"] == "auto"
    assert policy["policy"]["mtbf"] == 1.0


def test_time_based_run_saves_every_3_seconds(tmp_path: Path) -> None:
    """A real run with --save-every 3s: commits 3 s apart, within one step."""
    step = 0.25
    run_toy(tmp_path, "--steps", "28", "--save-every", "3s", "--step-sleep", str(step))
    events = list(read_events(tmp_path))
    saves = [
        (e["t"] - e["commit_s"], e["t"])  # (began, ended)
        for e in events
        if e["event"] == "save" and e["reason"] != "end of training"
    ]
    assert len(saves) >= 2, saves
    # the measured step time (sleep + compute), at least the sleep
    step_time = max([step] + [e["step_time_s"] for e in events if e["event"] == "pace"])
    assert step_time < 2 * step  # a step is what the test thinks it is
    # 3 s of training from the end of one save, plus at most the step in progress
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(saves)]
    assert all(3.0 <= gap <= 3.0 + step_time + 0.05 for gap in gaps), (gaps, step_time)
