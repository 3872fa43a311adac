"""Checkpoints and exports get the modes the user's umask gives any new file and folder.

Each case runs in a child process with its own umask, so the test process's umask (and
its other threads) are never touched.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_output import safepoint_cmd, train


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:  # the tiny model is built once per session
        mp.setenv("SAFEPOINT_HOME", str(tmp_path_factory.getbasetemp() / "safepoint-home"))
        yield


SAVE = """
import os, sys, torch
os.umask(int(sys.argv[2], 8))
from safepoint import Checkpointer
model = torch.nn.Linear(3, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
ckpt = Checkpointer(sys.argv[1], save_every="1", signals=None, async_save=%s)
ckpt.step(1, {"model": model, "optimizer": opt})
ckpt.close()
"""

UMASK = """
import os, subprocess, sys
os.umask(int(sys.argv[1], 8))
sys.exit(subprocess.run(sys.argv[2:]).returncode)
"""


def modes(folder: Path) -> dict[str, int]:
    """Permission bits of ``folder`` ("." ) and of everything in it."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.stat().st_mode)
    return found


def expect(found: dict[str, int], folder: Path, umask: int) -> None:
    for name, mode in found.items():
        want = (0o777 if (folder / name).is_dir() else 0o666) & ~umask
        assert mode == want, f"{folder / name}: {oct(mode)}, want {oct(want)}"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoint_modes_follow_the_umask(tmp_path: Path, umask: int, async_save: bool):
    out = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-c", SAVE % async_save, str(out), oct(umask)[2:]],
        check=True,
        timeout=120,
    )
    checkpoint = out / "checkpoint-1"
    found = modes(checkpoint)
    assert "safepoint.json" in found and len(found) >= 3
    expect(found, checkpoint, umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("perm") / "run"
    train(out, "--max-steps", "2", "--save-every", "2")
    return out


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("merge", [False, True])
def test_export_modes_follow_the_umask(run: Path, tmp_path: Path, umask: int, merge: bool):
    out = tmp_path / "model"
    argv = [*safepoint_cmd("export", str(run), "--checkpoint", "latest", "--out", str(out))]
    proc = subprocess.run(
        [sys.executable, "-c", UMASK, oct(umask)[2:], *argv, *(["--merge"] if merge else [])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = modes(out)
    assert ("model.safetensors" if merge else "adapter_model.safetensors") in found
    expect(found, out, umask)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left
