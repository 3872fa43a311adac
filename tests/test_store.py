"""The store: commit protocol results, the one validity check, corruption handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from safepoint.errors import CheckpointNotFoundError, SafepointError, SaveFailedError
from safepoint.manifest import MANIFEST_NAME, FileEntry, Manifest
from safepoint.snapshot import Snapshot, TensorFile
from safepoint.store import Store
from safepoint.validity import aside_folders, inspect, latest_checkpoint, scan, verify


def snapshot(step: int, n: int = 1000) -> Snapshot:
    g = torch.Generator().manual_seed(step)
    return Snapshot(
        step=step,
        files={
            "model.safetensors": TensorFile({"w": torch.randn(n, generator=g)}),
            "state.json": json.dumps({"version": 1, "entries": {}}).encode(),
        },
        metrics={"loss": 1.0 / (step + 1)},
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path)
    for step in (10, 20, 30):
        s.commit(snapshot(step))
    return s


def rewrite_manifest(ckpt: Path, **changes) -> None:
    """Rewrite a manifest with valid self-checksum but altered content."""
    m = Manifest.from_json((ckpt / MANIFEST_NAME).read_bytes(), where="test")
    fields = {**m.__dict__, **changes}
    (ckpt / MANIFEST_NAME).write_bytes(Manifest(**fields).to_json())


def test_commit_produces_valid_checkpoints(store: Store) -> None:
    infos = scan(store.directory, deep=True)
    assert [(i.step, i.status) for i in infos] == [(10, "valid"), (20, "valid"), (30, "valid")]
    assert latest_checkpoint(store.directory) == store.directory / "checkpoint-30"
    names = sorted(os.listdir(store.directory / "checkpoint-30"))
    assert names == ["model.safetensors", "safepoint.json", "state.json"]
    assert infos[-1].metrics == {"loss": pytest.approx(1 / 31)}


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped byte": (lambda c: flip_byte(c / "model.safetensors"), "checksum expected"),
    "truncated": (lambda c: os.truncate(c / "model.safetensors", 100), "size expected"),
    "missing file": (lambda c: (c / "state.json").unlink(), "state.json: missing"),
    "manifest not json": (lambda c: (c / MANIFEST_NAME).write_text("{not json"), "not valid JSON"),
    "manifest edited": (
        lambda c: (c / MANIFEST_NAME).write_text(
            (c / MANIFEST_NAME).read_text().replace('"step": 30', '"step": 31')
        ),
        "does not match its checksum",
    ),
    "manifest sizes disagree": (
        lambda c: rewrite_manifest(
            c,
            files={
                "model.safetensors": FileEntry(5, "0" * 32),
                "state.json": FileEntry(10, "0" * 32),
            },
        ),
        "size expected 5",
    ),
    "wrong step": (lambda c: rewrite_manifest(c, step=29), "manifest says step 29"),
}


@pytest.mark.parametrize("damage", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_damage_is_reported_and_resume_falls_back(store: Store, damage: str, caplog) -> None:
    newest = store.directory / "checkpoint-30"
    do, message = CORRUPTIONS[damage]
    do(newest)
    info = inspect(newest, deep=True)
    assert info.status == "corrupt"
    assert any(message in p for p in info.problems), info.problems
    assert latest_checkpoint(store.directory) == store.directory / "checkpoint-20"
    assert "skipping" in caplog.text and "checkpoint-30" in caplog.text


def test_flipped_byte_passes_shallow_check_but_not_deep(store: Store) -> None:
    flip_byte(store.directory / "checkpoint-30" / "model.safetensors")
    assert inspect(store.directory / "checkpoint-30").valid
    assert not inspect(store.directory / "checkpoint-30", deep=True).valid


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/file", ".hidden"])
def test_manifest_paths_outside_the_folder_are_refused(store: Store, name: str) -> None:
    ckpt = store.directory / "checkpoint-30"
    body = json.loads((ckpt / MANIFEST_NAME).read_text())
    body["files"][name] = {"size": 1, "xxh3_128": "00"}
    body.pop("manifest_checksum")
    from safepoint.manifest import _self_checksum

    body["manifest_checksum"] = _self_checksum(body)
    (ckpt / MANIFEST_NAME).write_text(json.dumps(body))
    info = inspect(ckpt, deep=True)
    assert info.status == "corrupt"
    assert "not a plain file name" in info.problems[0]


def test_symlink_out_of_the_folder_is_never_opened(store: Store, tmp_path: Path) -> None:
    """A FIFO outside: opening it would block forever, so a pass proves it was not read."""
    fifo = tmp_path.parent / f"{tmp_path.name}-fifo"
    os.mkfifo(fifo)
    target = store.directory / "checkpoint-30" / "model.safetensors"
    target.unlink()
    target.symlink_to(fifo)
    result: list = []
    t = threading.Thread(
        target=lambda: result.append(inspect(target.parent, deep=True)), daemon=True
    )
    t.start()
    t.join(timeout=10)
    assert result, "inspect blocked: it opened the symlink's target"
    assert result[0].status == "corrupt"
    assert "symlink" in result[0].problems[0]


def test_symlinked_checkpoint_folder_is_not_trusted(store: Store, tmp_path: Path) -> None:
    elsewhere = store.directory / "checkpoint-30"
    link = store.directory / "checkpoint-40"
    link.symlink_to(elsewhere)
    info = inspect(link)
    assert info.status == "corrupt" and "symlink" in info.problems[0]
    assert latest_checkpoint(store.directory) == elsewhere


def test_folders_without_manifest_are_incomplete_or_foreign(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "trainer_state.json").write_text("{}")
    assert [(i.step, i.status) for i in scan(tmp_path)] == [(5, "incomplete"), (9, "foreign")]
    assert latest_checkpoint(tmp_path) is None


def test_staging_folders_are_listed_then_swept(store: Store) -> None:
    staging = store.directory / ".staging-checkpoint-40-abcd"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"partial")
    trash = store.directory / ".trash-checkpoint-1-abcd"
    trash.mkdir()
    assert [i.status for i in scan(store.directory)][-1] == "staging"
    assert sorted(p.name for p in store.sweep()) == [staging.name, trash.name]
    assert not staging.exists() and not trash.exists()
    assert latest_checkpoint(store.directory) == store.directory / "checkpoint-30"


def test_commit_over_an_invalid_folder_moves_it_aside(store: Store) -> None:
    (store.directory / "checkpoint-40").mkdir()
    (store.directory / "checkpoint-40" / "junk").write_text("keep me")
    store.commit(snapshot(40))
    assert inspect(store.directory / "checkpoint-40").valid
    aside = [p for p in store.directory.iterdir() if p.name.startswith("checkpoint-40.")]
    assert len(aside) == 1 and (aside[0] / "junk").read_text() == "keep me"


def test_commit_over_the_same_checkpoint_keeps_it(store: Store) -> None:
    before = (store.directory / "checkpoint-30" / MANIFEST_NAME).read_bytes()
    store.commit(snapshot(30))  # every file the same: nothing to replace
    assert (store.directory / "checkpoint-30" / MANIFEST_NAME).read_bytes() == before
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".")]


def test_commit_over_another_valid_checkpoint_sets_it_aside(store: Store) -> None:
    before = (store.directory / "checkpoint-30" / MANIFEST_NAME).read_bytes()
    store.commit(snapshot(30, n=5))  # another content for the same step: the new one wins
    assert (store.directory / "checkpoint-30" / MANIFEST_NAME).read_bytes() != before
    assert inspect(store.directory / "checkpoint-30", deep=True).valid
    (aside,) = aside_folders(store.directory)
    assert aside.why == "superseded" and (aside.path / MANIFEST_NAME).read_bytes() == before
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".")]


def test_failed_commit_leaves_no_staging_and_says_why(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.commit(snapshot(1))
    bad = snapshot(2)
    bad.files["../escape"] = b"x"  # os.open fails: no such directory component
    bad.files = {"sub/dir.bin": b"x", **bad.files}
    with pytest.raises(SaveFailedError, match="previous checkpoints are intact"):
        s.commit(bad)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]


def test_delete_refuses_foreign_and_outside(store: Store, tmp_path: Path) -> None:
    (store.directory / "checkpoint-99").mkdir()
    (store.directory / "checkpoint-99" / "trainer_state.json").write_text("{}")
    foreign = inspect(store.directory / "checkpoint-99")
    with pytest.raises(SafepointError, match="refusing to delete a foreign"):
        store.delete(foreign)
    other = Store(tmp_path / "other")
    (tmp_path / "other").mkdir()
    with pytest.raises(SafepointError, match="not a checkpoint of"):
        other.delete(inspect(store.directory / "checkpoint-10"))
    assert (store.directory / "checkpoint-10").exists()
    store.delete(foreign, allow_foreign=True)
    assert not (store.directory / "checkpoint-99").exists()


def test_verify_reports_one_line_per_problem(store: Store) -> None:
    flip_byte(store.directory / "checkpoint-20" / "model.safetensors")
    (store.directory / "checkpoint-30" / "state.json").unlink()
    assert [i.status for i in verify(store.directory)] == ["valid", "corrupt", "corrupt"]
    assert [i.status for i in verify(store.directory / "checkpoint-10")] == ["valid"]
    cli = [sys.executable, "-m", "safepoint", "verify"]
    bad = subprocess.run([*cli, str(store.directory)], capture_output=True, text=True)
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert any("checkpoint-20: model.safetensors: checksum expected" in ln for ln in lines)
    assert any("checkpoint-30: state.json: missing" in ln for ln in lines)
    good = subprocess.run(
        [*cli, str(store.directory / "checkpoint-10")], capture_output=True, text=True
    )
    assert good.returncode == 0 and "ok, 2 files" in good.stdout
    missing = subprocess.run([*cli, str(store.directory / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("Error: ")


def test_ls_json_and_table(store: Store) -> None:
    (store.directory / "checkpoint-30" / "state.json").unlink()
    out = subprocess.run(
        [sys.executable, "-m", "safepoint", "ls", "--json", str(store.directory)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)
    # ls checks manifests and sizes, not checksums: "complete", never "valid"
    assert [(r["step"], r["status"]) for r in rows] == [
        (10, "complete"),
        (20, "complete"),
        (30, "corrupt"),
    ]
    table = subprocess.run(
        [sys.executable, "-m", "safepoint", "ls", str(store.directory)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "checkpoint-20" in table.stdout and "corrupt" in table.stdout


def test_inspect_of_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        inspect(tmp_path / "checkpoint-3")


@pytest.mark.parametrize("how", ["in place", "replaced"])
def test_a_manifest_changed_after_a_shallow_check_is_read_again(store: Store, how: str) -> None:
    """The shallow check reuses a manifest it parsed only while the file is unchanged
    (inode, size, mtime, ctime): rewritten in place (a clock tick later) or replaced by
    another file, it is read again."""
    import time

    ckpt = store.directory / "checkpoint-20"
    assert inspect(ckpt).status == "valid"
    data = (ckpt / MANIFEST_NAME).read_bytes()
    bad = data.replace(b'"step": 20', b'"step": 21')
    assert len(bad) == len(data) and bad != data
    if how == "in place":
        time.sleep(0.05)  # file times move by clock ticks (a few ms)
        with open(ckpt / MANIFEST_NAME, "r+b") as f:
            f.write(bad)
    else:
        (ckpt / "new.json").write_bytes(bad)
        os.replace(ckpt / "new.json", ckpt / MANIFEST_NAME)
    info = inspect(ckpt)
    assert info.status == "corrupt", info.problems
