"""What to keep: the retention rules as tables, their combinations, and the engine's use of
them (deletion only after a commit, the policy stored for ``ls``)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer, ConfigError
from safepoint.retention import (
    Candidate,
    RetentionPolicy,
    free_before_commit,
    next_deletions,
    plan,
    policy_from_json,
    policy_to_json,
    thin_steps,
)
from tests.conftest import run_toy

LOSS = {10: 0.9, 20: 0.5, 30: 0.7, 40: 0.3, 50: 0.8, 60: 0.6}


def cands(steps: list[int], *, size: int = 100, metric: str = "eval_loss") -> list[Candidate]:
    return [Candidate(s, size, {metric: LOSS[s]} if s in LOSS else {}) for s in steps]


ALL = [10, 20, 30, 40, 50, 60]

# policy kwargs -> (kept steps, {step: reasons that must be among its reasons})
TABLE = [
    ({}, ALL, {60: ["latest", "all"], 40: ["all"]}),
    # keep_best=0: keep_last=N means N, the best is not protected (issue #12)
    ({"keep_last": 1}, [60], {60: ["latest", "last-1"]}),
    ({"keep_last": 1, "keep_best": 1}, [40, 60], {60: ["latest", "last-1"], 40: ["best"]}),
    ({"keep_last": 2}, [50, 60], {50: ["last-2"]}),
    ({"keep_last": 2, "keep_best": 1}, [40, 50, 60], {50: ["last-2"], 40: ["best"]}),
    ({"keep_last": 1, "keep_best": 3}, [20, 40, 60], {20: ["best-3"], 60: ["best-3"]}),
    ({"keep_last": 1, "keep_best": 2, "mode": "max"}, [10, 50, 60], {10: ["best"]}),
    ({"keep_last": 1, "keep_every": 20}, [20, 40, 60], {20: ["milestone"]}),
    ({"keep_last": 1, "keep_every": 25}, [50, 60], {50: ["milestone"]}),
    ({"keep_last": 1, "metric": "accuracy"}, [60], {}),  # unknown metric: no best
    ({"max_bytes": 300}, [40, 50, 60], {}),  # the budget trims the oldest
    ({"max_bytes": 200}, [50, 60], {}),
    ({"max_bytes": 200, "keep_best": 1}, [40, 60], {40: ["best"]}),
    ({"max_bytes": 1}, [60], {}),  # never below latest
    ({"max_bytes": 1, "keep_best": 1}, [40, 60], {}),  # nor below the best, when asked for
    ({"keep_last": 2, "keep_every": 20, "max_bytes": 400}, [20, 40, 50, 60], {}),
    ({"keep_last": 2, "keep_every": 20, "max_bytes": 300}, [40, 50, 60], {}),
    ({"keep_last": 4, "keep_best": 2, "max_bytes": 300}, [40, 50, 60], {}),
    # keep_after_step: the rule added as the proof of #13 (one class, one Options field)
    ({"keep_last": 1, "keep_after_step": 30}, [40, 50, 60], {40: ["after-30"]}),
    ({"keep_last": 1, "keep_after_step": 60}, [60], {}),
    ({"keep_last": 1, "keep_after_step": 0}, ALL, {10: ["after-0"]}),
    ({"keep_last": 1, "keep_after_step": 30, "max_bytes": 200}, [50, 60], {}),
]


@pytest.mark.parametrize(("kwargs", "kept", "reasons"), TABLE)
def test_retention_table(kwargs: dict, kept: list[int], reasons: dict[int, list[str]]) -> None:
    decision = plan(cands(ALL), RetentionPolicy(**kwargs))
    assert sorted(decision.keep) == kept
    assert sorted(decision.delete) == sorted(set(ALL) - set(kept))
    for step, want in reasons.items():
        assert set(want) <= set(decision.keep[step]), decision.keep[step]


def test_over_budget_flag() -> None:
    assert plan(cands(ALL), RetentionPolicy(max_bytes=1)).over_budget
    assert not plan(cands(ALL), RetentionPolicy(max_bytes=200)).over_budget


def test_empty_and_single() -> None:
    assert plan([], RetentionPolicy(keep_last=1)).keep == {}
    only = plan(cands([10]), RetentionPolicy(keep_last=1, max_bytes=1))
    assert list(only.keep) == [10] and only.delete == ()


def test_ties_prefer_the_newer_checkpoint() -> None:
    same = [Candidate(s, 1, {"eval_loss": 0.5}) for s in (1, 2, 3)]
    decision = plan(same, RetentionPolicy(keep_last=1, keep_best=1))
    assert "best" in decision.keep[3]
    assert decision.delete == (1, 2)


def test_next_deletions() -> None:
    policy = RetentionPolicy(keep_last=2)
    assert next_deletions(cands([40, 50, 60]), policy, step=70) == (40, 50)
    best = RetentionPolicy(keep_last=2, keep_best=1)
    assert next_deletions(cands([40, 50, 60]), best, step=70) == (50,)  # 40 is best
    assert next_deletions(cands([50, 60]), policy, step=70) == (50,)
    assert next_deletions(cands([50, 60]), RetentionPolicy(keep_last=3), step=70) == ()


def test_free_before_commit_spares_newest_and_best() -> None:
    policy = RetentionPolicy(keep_last=2, keep_best=1)
    incoming = Candidate(70, 100, {"eval_loss": 0.1})  # will be the new best
    assert free_before_commit(cands([20, 40, 50, 60]), policy, incoming) == (20, 50)
    # without keep_best only the newest is spared
    plain = RetentionPolicy(keep_last=2)
    assert free_before_commit(cands([20, 40, 50, 60]), plain, incoming) == (20, 40, 50)
    # keep_last=1: the policy would delete all older ones, but newest and best stay
    one = RetentionPolicy(keep_last=1, keep_best=1)
    assert free_before_commit(cands([50, 60]), one, incoming) == (50,)
    assert free_before_commit(cands([60]), one, incoming) == ()
    assert free_before_commit([], one, incoming) == ()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": 0},
        {"keep_best": -1},
        {"mode": "median"},
        {"keep_every": 0},
        {"max_bytes": 0},
    ],
)
def test_bad_policies(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        RetentionPolicy(**kwargs)


def test_policy_json_round_trip() -> None:
    policy = RetentionPolicy(keep_last=3, keep_best=2, metric="acc", mode="max", max_bytes=9)
    assert policy_from_json({**policy_to_json(policy), "unknown": 1}) == policy
    with pytest.raises(ConfigError):
        policy_from_json({"keep_last": -3})


# ------------------------------------------------------------- with the Checkpointer


def test_checkpointer_applies_combined_rules(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    state = {"model": model}
    losses = {1: 0.9, 2: 0.2, 3: 0.8, 4: 0.7, 5: 0.6, 6: 0.95}
    with Checkpointer(
        tmp_path, save_every="1", keep_last=2, keep_best=1, keep_every=3, metric="eval_loss"
    ) as ckpt:
        ckpt.restore(state)
        for step, loss in losses.items():
            ckpt.step(step, state, metrics={"eval_loss": loss})
        assert [i.step for i in ckpt.list()] == [2, 3, 5, 6]
    doc = json.loads((tmp_path / "checkpoint-6" / "safepoint.json").read_text())
    stored = policy_from_json(doc["info"]["policy"])
    assert stored == RetentionPolicy(keep_last=2, keep_best=1, keep_every=3)


def test_retention_only_after_commit(tmp_path: Path) -> None:
    """Killed after writing the new manifest but before the rename: the old checkpoint,
    which keep_last=1 would delete, is still there and valid."""
    proc = run_toy(
        tmp_path,
        "--steps",
        "20",
        "--save-every",
        "5",
        "--keep-last",
        "1",
        env={"SAFEPOINT_CRASH_AT": "after_manifest@2"},
        check=False,
    )
    assert proc.returncode == -9
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-5"]
    ckpt = Checkpointer(tmp_path)
    try:
        assert ckpt.latest() is not None and ckpt.latest().step == 5
    finally:
        ckpt.close()


def test_warns_when_keep_best_metric_is_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = {"model": torch.nn.Linear(2, 2)}
    with Checkpointer(tmp_path, save_every="1", keep_best=2, keep_last=1) as ckpt:
        for step in (1, 2, 3):
            ckpt.step(step, state, metrics={"loss": 1.0 / step})
    notes = [r.getMessage() for r in caplog.records if "keep_best=2" in r.getMessage()]
    assert len(notes) == 1 and "'eval_loss'" in notes[0] and "it has: loss" in notes[0]


@pytest.mark.parametrize(
    ("kwargs", "count", "total", "every", "kept"),
    [
        ({"keep_last": 3}, 10, 100, 10, 3),
        ({"keep_last": 3, "keep_best": 2, "keep_every": 25}, 10, 100, 10, 9),
        ({"keep_last": 3, "keep_best": 2}, 2, 20, 10, 2),  # never more than are saved
        ({}, None, None, None, None),  # keeps all of a run of unknown length
        ({}, 7, 70, 10, 7),
        # the saves after step 55 of a 100-step run every 10: 60..100 = 5, plus keep_last
        ({"keep_last": 1, "keep_after_step": 55}, 10, 100, 10, 6),
        ({"keep_last": 1, "keep_after_step": 55}, 11, 105, 10, 7),  # and the final 105
        ({"keep_last": 2, "keep_after_step": 200}, 10, 100, 10, 2),
        ({"keep_last": 2, "keep_after_step": 50}, None, None, None, None),  # unknown: all
    ],
)
def test_kept_count_is_the_worst_case_of_the_rules(
    kwargs: dict, count: int | None, total: int | None, every: int | None, kept: int | None
) -> None:
    """What the disk pre-flight budgets for: checked against the planner itself."""
    from safepoint.plan import Saves

    policy = RetentionPolicy(**kwargs)
    assert policy.kept_count(Saves(count, total, every)) == kept
    if count and total and every:  # the planner, run over the whole schedule, never holds more
        steps = [*range(every, total + 1, every)]
        steps += [] if total % every == 0 else [total]
        held = max(
            len(plan([Candidate(s, 1, {"eval_loss": -s}) for s in steps[:n]], policy).keep)
            for n in range(1, len(steps) + 1)
        )
        assert held <= kept


def test_keep_after_step_end_to_end(tmp_path: Path) -> None:
    """A rule added by one class and one Options field works through the engine: the
    checkpoints after step 6 of a 10-step run stay, besides the newest one."""
    model = torch.nn.Linear(2, 2)
    state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    with Checkpointer(
        tmp_path, save_every=2, total_steps=10, keep_last=1, keep_after_step=6, signals=None
    ) as ckpt:
        for step in range(1, 11):
            ckpt.step(step, state)
    assert [i.step for i in ckpt.list()] == [8, 10]
    with pytest.raises(ConfigError, match="keep_after_step=-1"):
        Checkpointer(tmp_path, keep_after_step=-1)


def _on_disk(directory: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in directory.glob("checkpoint-*"))


def test_a_checkpoint_removed_by_hand_mid_run_is_seen(tmp_path: Path) -> None:
    """Retention knows the checkpoints from its own commits and deletes; one removed by a
    person between two saves makes it look again, and keep_last=2 still keeps two."""
    state = {"model": torch.nn.Linear(2, 2)}
    with Checkpointer(tmp_path, save_every="1", keep_last=2) as ckpt:
        for step in (1, 2):
            ckpt.step(step, state)
        ckpt.flush()  # a save returns before its checkpoint is written
        shutil.rmtree(tmp_path / "checkpoint-2")
        ckpt.step(3, state)
        ckpt.flush()
        assert _on_disk(tmp_path) == [1, 3]
        ckpt.step(4, state)
    assert _on_disk(tmp_path) == [3, 4]


def test_a_checkpoint_put_back_by_hand_mid_run_is_seen(tmp_path: Path) -> None:
    """A checkpoint copied back into the folder (from a backup) between two saves is
    one of this run's again: the policy covers it as a scan of the folder would."""
    state = {"model": torch.nn.Linear(2, 2)}
    with Checkpointer(tmp_path, save_every="1", keep_last=2) as ckpt:
        ckpt.step(1, state)
        ckpt.flush()  # a save returns before its checkpoint is written
        shutil.copytree(tmp_path / "checkpoint-1", tmp_path.parent / "backup-1")
        for step in (2, 3):
            ckpt.step(step, state)
        ckpt.flush()
        assert _on_disk(tmp_path) == [2, 3]
        shutil.copytree(tmp_path.parent / "backup-1", tmp_path / "checkpoint-1")
        ckpt.step(4, state)
    assert _on_disk(tmp_path) == [3, 4]


def test_a_kept_checkpoint_damaged_mid_run_is_not_counted(tmp_path: Path) -> None:
    """A file of a kept checkpoint truncated between two saves: retention does not delete
    the good checkpoint it would replace (it never touches the damaged one either)."""
    state = {"model": torch.nn.Linear(2, 2)}
    with Checkpointer(tmp_path, save_every="1", keep_last=2) as ckpt:
        for step in (1, 2):
            ckpt.step(step, state)
        ckpt.flush()  # a save returns before its checkpoint is written
        with open(tmp_path / "checkpoint-2" / "state.json", "r+b") as f:
            f.truncate(10)
        ckpt.step(3, state)
        ckpt.flush()
        assert _on_disk(tmp_path) == [1, 2, 3]
        assert [i.step for i in ckpt.list() if i.valid] == [1, 3]


def test_a_deleted_checkpoint_leaves_the_run_at_once_and_its_files_follow(
    tmp_path: Path,
) -> None:
    """Retention renames an old checkpoint out of the run in line and removes its files on
    the store's reaper thread; by the next save (or close) nothing of it is left."""
    state = {"model": torch.nn.Linear(2, 2)}
    with Checkpointer(tmp_path, save_every="1", keep_last=1) as ckpt:
        ckpt.step(1, state)
        ckpt.step(2, state)
        ckpt.flush()  # the background save of checkpoint-2 and its retention are done
        assert _on_disk(tmp_path) == [2]  # out of the run when the save is done
        ckpt.step(3, state)
        ckpt.flush()  # the commit waits for the last one's removal first
        assert not list(tmp_path.glob(".trash-checkpoint-1-*"))
    assert _on_disk(tmp_path) == [3]
    assert not list(tmp_path.glob(".trash-*"))
    deletes = [
        json.loads(line)
        for line in (tmp_path / "safepoint.log.jsonl").read_text().splitlines()
        if '"delete"' in line
    ]
    assert [d["step"] for d in deletes] == [1, 2]


def test_runs_made_one_after_another_share_one_reaper_thread(tmp_path: Path) -> None:
    """Each run's deletions finish on the process's one reaper thread: a notebook that
    makes a Checkpointer per run does not collect an idle thread per run."""
    state = {"model": torch.nn.Linear(2, 2)}
    for run in range(3):
        with Checkpointer(tmp_path / str(run), save_every="1", keep_last=1) as ckpt:
            for step in (1, 2, 3):
                ckpt.step(step, state)
        assert _on_disk(tmp_path / str(run)) == [3]
    reapers = [t for t in threading.enumerate() if t.name.startswith("safepoint-reaper")]
    assert len(reapers) == 1


def test_thin_steps_spares_the_newest_full_ones_and_the_best() -> None:
    """keep_full: of what the plan keeps, all full ones but the newest N and the best are
    thinned; thin ones are not counted among the newest full; 0 or None thins nothing."""
    policy = RetentionPolicy(keep_last=5, keep_best=1, metric="loss")
    cands = [Candidate(s, 10, {"loss": 1.0 if s == 2 else 5.0}, thin=s == 1) for s in range(1, 8)]
    decision = plan(cands, policy)
    assert sorted(decision.keep) == [2, 3, 4, 5, 6, 7]
    assert thin_steps(cands, decision, policy, 2) == (3, 4, 5)
    assert thin_steps(cands, decision, policy, 9) == ()
    assert thin_steps(cands, decision, policy, 0) == thin_steps(cands, decision, policy, None) == ()
    no_best = RetentionPolicy(keep_last=5)
    assert thin_steps(cands, plan(cands, no_best), no_best, 1) == (3, 4, 5, 6)
