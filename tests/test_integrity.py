"""What is on disk is what was committed: one rule for a checkpoint slot, and lineage.

A folder already at ``checkpoint-<step>`` is kept only when every checksum passes and it
holds exactly the new save; anything else is set aside (never deleted) and the new save
committed. A run that resumed from an older step sets every later folder aside at its
first commit, so that no later resume mixes two lines of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer, verify
from safepoint.cli import main
from safepoint.manifest import MANIFEST_NAME, Manifest
from safepoint.validity import aside_folders, inspect
from tests.hostile.helpers import body, sign


def flip_byte(path: Path, offset: int = -10) -> None:
    """Bit rot: one byte of ``path`` changed, its size intact, its manifest untouched."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def manifest_of(checkpoint: Path) -> Manifest:
    data = (checkpoint / MANIFEST_NAME).read_bytes()
    return Manifest.from_json(data, where=str(checkpoint))


def make_state(seed: int) -> dict[str, object]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def train(ckpt: Checkpointer, state: dict[str, object], steps: range) -> None:
    model, opt = state["model"], state["optimizer"]
    assert isinstance(model, torch.nn.Module) and isinstance(opt, torch.optim.Optimizer)
    for step in steps:
        loss = model(torch.ones(2, 4)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.step(step, state, metrics={"loss": loss.item()})


def files_of(checkpoint: Path) -> dict[str, bytes]:
    """Every file but the manifest (which has its own creation time)."""
    return {f.name: f.read_bytes() for f in checkpoint.iterdir() if f.name != MANIFEST_NAME}


def weights(checkpoint: Path) -> bytes:
    return next(checkpoint.glob("*.safetensors")).read_bytes()


@pytest.fixture(params=[False, True], ids=["inline", "background"])
def async_save(request: pytest.FixtureRequest) -> bool:
    return request.param


def test_a_damaged_newest_is_set_aside_and_its_step_saved_anew(tmp_path: Path, async_save: bool):
    opts = {"save_every": "1", "keep_last": 10, "total_steps": 3, "async_save": async_save}
    with Checkpointer(tmp_path, **opts) as ckpt:
        train(ckpt, make_state(0), range(1, 4))
    good = files_of(tmp_path / "checkpoint-3")
    tensor_file = next((tmp_path / "checkpoint-3").glob("*.safetensors"))
    flip_byte(tensor_file)

    state = make_state(0)
    with Checkpointer(tmp_path, **opts) as ckpt:
        assert ckpt.restore(state) == 2  # checkpoint-3 fails its checksums
        train(ckpt, state, range(3, 4))

    # The redone save is committed (bit-identical to the first), the damaged one kept aside.
    assert all(i.valid for i in verify(tmp_path))
    assert files_of(tmp_path / "checkpoint-3") == good
    (aside,) = aside_folders(tmp_path)
    assert (aside.step, aside.why) == (3, "corrupt")
    assert (aside.path / tensor_file.name).read_bytes() != good[tensor_file.name]


def test_a_rollback_sets_the_later_line_aside_at_its_first_commit(tmp_path: Path, async_save: bool):
    opts = {"save_every": "1", "keep_last": 10, "total_steps": 4, "async_save": async_save}
    opts["keep_full"] = None  # rolls back to an old one: every checkpoint stays full
    with Checkpointer(tmp_path, **opts) as ckpt:
        train(ckpt, make_state(0), range(1, 5))
    old3 = weights(tmp_path / "checkpoint-3")

    state = make_state(0)
    with Checkpointer(tmp_path, **opts) as ckpt:
        assert ckpt.restore(state, checkpoint=2) == 2
        # Another future: different data from step 3 on.
        state["model"].weight.data.add_(1.0)  # type: ignore[union-attr]
        train(ckpt, state, range(3, 5))
        assert [i.step for i in ckpt.list()] == [1, 2, 3, 4]

    assert weights(tmp_path / "checkpoint-3") != old3
    assert sorted((a.step, a.why) for a in aside_folders(tmp_path)) == [
        (3, "superseded"),
        (4, "superseded"),
    ]
    assert old3 in [weights(a.path) for a in aside_folders(tmp_path)]
    # Lineage: the new 3 descends from 2, the new 4 from the new 3.
    two, three, four = (manifest_of(tmp_path / f"checkpoint-{s}") for s in (2, 3, 4))
    assert three.parent is not None and four.parent is not None
    assert (three.parent.step, three.parent.manifest) == (2, two.digest)
    assert (four.parent.step, four.parent.manifest) == (3, three.digest)


def test_a_rollback_stopped_before_any_save_changes_nothing(tmp_path: Path):
    opts = {"save_every": "1", "keep_last": 10, "total_steps": 4, "keep_full": None}
    with Checkpointer(tmp_path, **opts) as ckpt:
        train(ckpt, make_state(0), range(1, 5))
    with Checkpointer(tmp_path, **opts) as ckpt:
        assert ckpt.restore(make_state(0), checkpoint=2) == 2
    assert [i.step for i in verify(tmp_path)] == [1, 2, 3, 4]
    assert aside_folders(tmp_path) == []


def test_the_same_save_again_keeps_the_folder_it_finds(tmp_path: Path):
    opts = {"save_every": "1", "keep_last": 10, "total_steps": 3, "async_save": False}
    with Checkpointer(tmp_path, **opts) as ckpt:
        train(ckpt, make_state(0), range(1, 4))
    before = (tmp_path / "checkpoint-3" / MANIFEST_NAME).stat().st_ino
    state = make_state(0)
    with Checkpointer(tmp_path, **opts) as ckpt:
        ckpt.restore(state, checkpoint=3)
        ckpt.save(3, state).wait()  # the same content: nothing to set aside
    assert (tmp_path / "checkpoint-3" / MANIFEST_NAME).stat().st_ino == before
    assert aside_folders(tmp_path) == []


def test_a_fresh_run_records_its_line_of_descent(tmp_path: Path):
    with Checkpointer(tmp_path, save_every="1", keep_last=5, total_steps=3, keep_full=0) as ckpt:
        train(ckpt, make_state(0), range(1, 4))
    one, two, three = (manifest_of(tmp_path / f"checkpoint-{s}") for s in (1, 2, 3))
    assert one.parent is None
    assert two.parent is not None and (two.parent.step, two.parent.manifest) == (1, one.digest)
    assert three.parent is not None and three.parent.manifest == two.digest
    # The digest is the manifest's own stored checksum.
    stored = json.loads((tmp_path / "checkpoint-2" / MANIFEST_NAME).read_text())
    assert stored["manifest_checksum"] == two.digest


def test_a_bad_parent_makes_the_manifest_corrupt(tmp_path: Path):
    with Checkpointer(tmp_path, save_every="1", total_steps=2) as ckpt:
        train(ckpt, make_state(0), range(1, 3))
    folder = tmp_path / "checkpoint-2"
    doc = body(folder)
    for bad in ({"step": -1, "manifest": "0" * 32}, {"step": 1, "manifest": "x"}, [1], "1"):
        sign(folder, {**doc, "parent": bad})  # re-signed: only the field itself is wrong
        info = inspect(folder)
        assert info.status == "corrupt" and "parent" in info.problems[0], info.problems
    sign(folder, {k: v for k, v in doc.items() if k != "parent"})  # an older manifest
    assert inspect(folder).valid and manifest_of(folder).parent is None


def test_ls_lists_what_was_set_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    opts = {"save_every": "1", "keep_last": 10, "total_steps": 3, "keep_full": None}
    with Checkpointer(tmp_path, **opts) as ckpt:
        train(ckpt, make_state(0), range(1, 4))
    with Checkpointer(tmp_path, **opts) as ckpt:
        state = make_state(1)
        ckpt.restore(state, checkpoint=1)
        train(ckpt, state, range(2, 3))
    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "set aside (never resumed from; delete them when no longer needed):" in lines
    assert any(
        "checkpoint-3.superseded-" in line and "a resume went back" in line for line in lines
    )
    start = next(i for i, line in enumerate(lines) if line.startswith("set aside"))
    assert all(len(line) <= 80 for line in lines[start:])
    assert main(["ls", "--json", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    aside = [(r["step"], r["why"]) for r in rows if r["status"] == "set aside"]
    assert aside == [(2, "superseded"), (3, "superseded")]


# ------------------------------------------------- the reproductions, CLI


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "safepoint-home"


def train_cli(out: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "safepoint",
            "train",
            "--output-dir",
            str(out),
            "--seed",
            "0",
            "--save-every",
            "5",
            "--keep-full",
            "0",  # the rollbacks here resume from old checkpoints: all stay full
            *args,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "SAFEPOINT_HOME": str(home)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Path:
    """``safepoint train --max-steps 15 --save-every 5``: checkpoint-5, 10 and 15."""
    out = tmp_path_factory.mktemp("base") / "run"
    train_cli(out, home, "--max-steps", "15")
    return out


def test_bit_rot_in_the_newest_is_redone_and_kept_by_safepoint_train(
    base_run: Path, home: Path, tmp_path: Path
):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    flip_byte(out / "checkpoint-15" / "optimizer.safetensors")
    proc = train_cli(out, home, "--max-steps", "15")
    said = " ".join((proc.stdout + proc.stderr).split())  # lines wrap at 80 columns
    assert f"resuming from {out / 'checkpoint-10'}" in said
    assert "1 checkpoint committed" in said
    assert all(i.valid for i in verify(out))  # `safepoint verify` passes again
    # The redone save, bit for bit (trainer_state.json differs: TRL's num_tokens log
    # counter restarts at a resume).
    for f in (base_run / "checkpoint-15").glob("*.safetensors"):
        assert (out / "checkpoint-15" / f.name).read_bytes() == f.read_bytes(), f.name
    assert [(a.step, a.why) for a in aside_folders(out)] == [(15, "corrupt")]
    # And the next rerun finds a finished run: nothing is redone, nothing set aside again.
    again = train_cli(out, home, "--max-steps", "15")
    assert "0 checkpoints committed" in again.stdout + again.stderr or "already" in again.stderr
    assert len(aside_folders(out)) == 1


def test_a_rollback_with_safepoint_train_never_keeps_the_other_future(
    base_run: Path, home: Path, tmp_path: Path
):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    old10 = (base_run / "checkpoint-10" / "optimizer.safetensors").read_bytes()
    five = manifest_of(out / "checkpoint-5")  # retention removes it once 20 is saved
    train_cli(out, home, "--max-steps", "20", "--resume", str(out / "checkpoint-5"))
    # The new line's 10 and 15 are on disk, not the old run's (another schedule: 20 steps).
    assert (out / "checkpoint-10" / "optimizer.safetensors").read_bytes() != old10
    ten = manifest_of(out / "checkpoint-10")
    assert ten.parent is not None and (ten.parent.step, ten.parent.manifest) == (5, five.digest)
    assert sorted((a.step, a.why) for a in aside_folders(out)) == [
        (10, "superseded"),
        (15, "superseded"),
    ]
    events = [json.loads(line) for line in (out / "safepoint.log.jsonl").read_text().splitlines()]
    saved = [e for e in events if e.get("event") == "save" and e.get("result") == "committed"]
    for e in saved[-3:]:  # every commit the record names is on disk, with its metrics
        m = manifest_of(out / f"checkpoint-{e['step']}")
        assert m.metrics.get("eval_loss") == e["metrics"].get("eval_loss")
