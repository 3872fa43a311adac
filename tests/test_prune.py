"""``safepoint prune`` and the retention view of ``safepoint ls`` on real directories that
mix safepoint checkpoints, stock Trainer folders, incomplete folders and other files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer
from safepoint.cli import main
from safepoint.records import read_events

LOSSES = {10: 0.5, 20: 0.9, 30: 0.8, 40: 0.7, 50: 0.95}


def _foreign(directory: Path, step: int, loss: float) -> None:
    """A checkpoint folder as the stock transformers Trainer writes it."""
    folder = directory / f"checkpoint-{step}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    history = [{"step": step, "loss": loss + 0.1}, {"step": step, "eval_loss": loss}]
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": step, "log_history": history})
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    state = {"model": torch.nn.Linear(3, 3)}
    with Checkpointer(tmp_path) as ckpt:
        for step, loss in LOSSES.items():
            ckpt.save(step, state, metrics={"eval_loss": loss})
    _foreign(tmp_path, 3, 0.99)
    _foreign(tmp_path, 7, 0.98)
    (tmp_path / "checkpoint-60").mkdir()  # incomplete: no manifest
    (tmp_path / "checkpoint-60" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "other").mkdir()
    return tmp_path


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("safepoint."))


def _ckpts(*steps: int) -> list[str]:
    return [f"checkpoint-{s}" for s in steps]


BASE = ["notes.txt", "other"]


def test_dry_run_deletes_nothing(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _names(run_dir)
    assert main(["prune", str(run_dir), "--keep-last", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _names(run_dir) == before
    assert "would delete 3 checkpoint(s)" in out
    assert "untouched (foreign" in out and "untouched (incomplete)" in out


@pytest.mark.parametrize(
    ("args", "left"),
    [
        # keep_best=0: keep_last=N means N, the best (10) is not protected
        (["--keep-last", "2"], [3, 40, 50, 60, 7]),
        (["--keep-last", "2", "--keep-best", "1"], [10, 3, 40, 50, 60, 7]),
        (["--keep-last", "1", "--keep-best", "2"], [10, 3, 40, 50, 60, 7]),
        (["--keep-last", "1", "--keep-best", "2", "--mode", "max"], [20, 3, 50, 60, 7]),
        (["--keep-last", "1", "--keep-every", "20"], [20, 3, 40, 50, 60, 7]),
        (["--keep-last", "2", "--include-foreign"], [40, 50, 60]),
    ],
)
def test_prune_table(
    run_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], left: list[int]
) -> None:
    assert main(["prune", str(run_dir), *args]) == 0
    assert _names(run_dir) == sorted(_ckpts(*left) + BASE)
    deleted = [e["checkpoint"] for e in read_events(run_dir) if e["event"] == "delete"]
    assert sorted(deleted) == sorted(set(_ckpts(*LOSSES, 3, 7)) - set(_ckpts(*left)))
    assert "deleted" in capsys.readouterr().out


def test_prune_refuses_while_a_run_is_live(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _names(run_dir)
    with Checkpointer(run_dir):
        assert main(["prune", str(run_dir), "--keep-last", "1"]) == 2
    assert "another run holds the lock" in capsys.readouterr().err
    assert _names(run_dir) == before


def test_prune_needs_a_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _foreign(tmp_path, 5, 0.5)
    assert main(["prune", str(tmp_path)]) == 2
    assert "--keep-last" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "missing"), "--keep-last", "1"]) == 2


def test_prune_uses_the_recorded_policy(tmp_path: Path) -> None:
    state = {"model": torch.nn.Linear(2, 2)}
    with Checkpointer(tmp_path, save_every="1", keep_last=3) as ckpt:
        for step in range(1, 5):
            ckpt.step(step, state)
    assert _names(tmp_path) == _ckpts(2, 3, 4)
    assert main(["prune", str(tmp_path)]) == 0  # keep_last=3 from the manifests
    assert _names(tmp_path) == _ckpts(2, 3, 4)
    assert main(["prune", str(tmp_path), "--keep-last", "1"]) == 0
    assert _names(tmp_path) == _ckpts(4)


def test_ls_explains_retention(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", str(run_dir), "--keep-last", "2", "--keep-best", "1", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["checkpoint-50"]["kept_because"] == "latest, last-2"
    assert rows["checkpoint-10"]["kept_because"] == "best"
    assert rows["checkpoint-40"]["kept_because"] == "last-2"
    assert rows["checkpoint-20"]["kept_because"] is None
    assert rows["checkpoint-3"]["kept_because"] is None  # foreign: not ours to judge
    assert [n for n, r in rows.items() if r["next_deletes"]] == ["checkpoint-40"]
    assert main(["ls", str(run_dir), "--keep-last", "2", "--keep-best", "1"]) == 0
    out = capsys.readouterr().out
    assert "next save would delete: checkpoint-40" in out
    assert "no longer keeps: checkpoint-20, checkpoint-30" in out
    # without options: the policy the run recorded (keep all)
    assert main(["ls", str(run_dir)]) == 0
    assert "next save would delete: nothing" in capsys.readouterr().out


def test_ls_reads_the_policy_the_run_used(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    state = {"model": torch.nn.Linear(2, 2)}
    with Checkpointer(tmp_path, save_every="1", keep_last=2, keep_every=2) as ckpt:
        for step in range(1, 6):
            ckpt.step(step, state)
    assert main(["ls", str(tmp_path), "--json"]) == 0
    rows = {r["name"]: r["kept_because"] for r in json.loads(capsys.readouterr().out)}
    assert rows == {
        "checkpoint-2": "milestone",
        "checkpoint-4": "last-2, milestone",
        "checkpoint-5": "latest, last-2",
    }


def test_checkpointer_deletes_only_its_own_committed_checkpoints(run_dir: Path) -> None:
    state = {"model": torch.nn.Linear(3, 3)}
    with Checkpointer(run_dir, fingerprint="other-config") as other:
        other.save(55, state)
    with Checkpointer(run_dir, save_every="1", keep_last=1, fingerprint="mine") as ckpt:
        for step in (70, 71, 72):
            ckpt.step(step, state)
    left = _names(run_dir)
    # ours: only the newest; everything else (unfingerprinted old ones are judged as
    # ours, another configuration's, foreign, incomplete, other files) untouched
    assert "checkpoint-72" in left and "checkpoint-70" not in left and "checkpoint-71" not in left
    for name in ("checkpoint-55", "checkpoint-3", "checkpoint-7", "checkpoint-60", *BASE):
        assert name in left
