"""``engine.decide``: one decision per completed step, the end of the run said once."""

from __future__ import annotations

from pathlib import Path

import pytest

from safepoint import ConfigError, Options, SaveFailedError
from safepoint.distributed import Ranks
from safepoint.engine.decide import END_OF_RUN, Decider
from safepoint.records import RunRecord, read_events


def _decider(tmp_path: Path, **options: object) -> Decider:
    return Decider(Options(**options), Ranks(), RunRecord(tmp_path))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "steps", "saved"),
    [
        ({"save_every": "3", "total_steps": 10}, range(0, 11), [3, 6, 9, 10]),
        ({"save_every": "5", "total_steps": 10}, range(0, 11), [5, 10]),
        ({"save_every": "50%", "total_steps": 10}, range(1, 11), [5, 10]),
        ({"total_steps": 4}, range(1, 5), [4]),  # no schedule: the end of the run only
        ({"save_every": "2"}, range(0, 5), [2, 4]),  # no length: no end-of-run save
    ],
)
def test_due_steps(tmp_path: Path, options: dict, steps: range, saved: list[int]) -> None:
    d = _decider(tmp_path, **options)
    got = []
    for step in steps:
        reason = d.due(step)
        if reason is not None:
            got.append(step)
            d.saved(step, stall=0.0)
    assert got == saved


def test_the_end_of_the_run_is_said_once(tmp_path: Path) -> None:
    d = _decider(tmp_path, save_every="4", total_steps=6)
    assert [d.due(s) for s in (5, 6)] == [None, END_OF_RUN]
    assert d.end_of_run(6)
    d.saved(6, stall=0.0)
    assert not d.end_of_run(6) and d.due(6) is None  # the Trainer's epoch end: no second


def test_the_run_length_may_come_at_train_start(tmp_path: Path) -> None:
    """The Trainer knows max_steps only once training starts: a fraction waits for it."""
    with pytest.raises(ConfigError, match="needs the run length"):
        Decider.check(Options(save_every="25%"))
    Decider.check(Options(save_every="25%"), length_later=True)
    d = _decider(tmp_path, save_every="25%")
    d.begin(step=0, total_steps=8)
    assert [s for s in range(1, 9) if d.due(s) and d.saved(s, stall=0.0) is None] == [2, 4, 6, 8]


def test_a_resumed_run_saves_at_the_same_steps(tmp_path: Path) -> None:
    d = _decider(tmp_path, save_every="3", total_steps=10)
    d.begin(step=6)
    assert d.last_saved == 6
    assert [s for s in range(7, 11) if d.due(s)] == [9, 10]


def test_on_save_error_continue_goes_on_but_never_past_the_last_step(tmp_path: Path) -> None:
    d = _decider(tmp_path, save_every="2", total_steps=4, on_save_error="continue")
    error = SaveFailedError("disk full")
    d.save_failed(2, error, reason="step 2", newest=None)  # logged, training goes on
    with pytest.raises(SaveFailedError, match="WITHOUT its final checkpoint"):
        d.save_failed(4, error, reason=END_OF_RUN, newest=None)
    skipped = [e["step"] for e in read_events(tmp_path) if e["event"] == "save_skipped"]
    assert skipped == [2, 4]
    with pytest.raises(SaveFailedError, match="disk full"):
        _decider(tmp_path, on_save_error="stop").save_failed(2, error, reason="x", newest=None)
