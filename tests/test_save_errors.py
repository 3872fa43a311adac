"""#17 defect 9: ``on_save_error`` after real file-system faults: a retention deletion that
fails after a good commit, background saves, a directory fsync the file system refuses,
and a failed final save."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer, SaveFailedError
from safepoint.validity import inspect

pytestmark = pytest.mark.timeout(120)


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths made immutable (``chattr +i``) by the test; all made mutable after it."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    if not _chattr("+i", probe):
        pytest.skip("chattr +i is not available here (not root, or the file system lacks it)")
    _chattr("-i", probe)
    made: list[Path] = []
    yield made
    # Retention may have renamed a frozen file's folder: unfreeze everything under here.
    subprocess.run(["chattr", "-R", "-i", str(tmp_path)], capture_output=True)


def _freeze(made: list[Path], path: Path) -> None:
    assert _chattr("+i", path)
    made.append(path)


def _state() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"model": torch.nn.Linear(4, 3)}


def _messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["stop", "continue"])
def test_an_undeletable_file_in_an_old_checkpoint(
    tmp_path: Path, immutable: list[Path], caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """An immutable file (as an NFS ``.nfsXXXX`` file or EIO would) makes retention's
    rmtree fail after the new checkpoint is committed: a warning, never a failed save."""
    out = tmp_path / "run"
    state = _state()
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        with Checkpointer(out, keep_last=1, signals=None, on_save_error=mode) as ckpt:  # type: ignore[arg-type]
            ckpt.save(2, state).wait()
            _freeze(immutable, out / "checkpoint-2" / "state.json")
            info = ckpt.save(4, state).wait()
            assert info.valid and inspect(out / "checkpoint-4", deep=True).valid
            ckpt.save(6, state)
        said = _messages(caplog)
        assert "retention could not delete checkpoint-2" in said, said
        assert "SAVE FAILED" not in said
        # The next start sweeps what is left, and says what it cannot remove.
        with Checkpointer(out, signals=None) as ckpt:
            assert ckpt.restore(state) == 6
    assert "remove it by hand" in _messages(caplog)


def test_a_busy_mount_point_in_an_old_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mount point inside a checkpoint being deleted: rmdir fails with EBUSY."""
    out = tmp_path / "run"
    state = _state()
    with Checkpointer(out, keep_last=1, signals=None) as ckpt:
        ckpt.save(2, state).wait()
        busy = out / "checkpoint-2" / "mnt"
        busy.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(busy)],
                          capture_output=True).returncode:  # fmt: skip
            pytest.skip("cannot mount a tmpfs here")
        try:
            with caplog.at_level(logging.WARNING, logger="safepoint"):
                assert ckpt.save(4, state).wait().valid
                # The removal runs on the reaper thread: wait for it (prune settles)
                # before the mount goes, or it may find the mount gone and succeed.
                ckpt.prune()
        finally:
            mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
            for point in mounted:
                if point.endswith("/mnt") and str(tmp_path) in point:
                    subprocess.run(["umount", point], check=True)
    assert "retention could not delete checkpoint-2" in _messages(caplog)


def test_a_directory_fsync_the_file_system_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EINVAL from fsync of a folder (some FUSE and CIFS mounts; injected through the
    documented ``SAFEPOINT_FAULT_AT`` test hook): the checkpoint is committed, said once."""
    monkeypatch.setenv("SAFEPOINT_FAULT_AT", "dir_fsync:EINVAL")
    out = tmp_path / "run"
    with (
        caplog.at_level(logging.WARNING, logger="safepoint"),
        Checkpointer(out, signals=None, on_save_error="continue") as ckpt,
    ):
        assert ckpt.step(3, _state()) is None
        info = ckpt.save(5, _state()).wait()
    assert info.valid and inspect(out / "checkpoint-5", deep=True).valid
    said = _messages(caplog)
    assert "SAVE FAILED" not in said and "WITHOUT" not in said


def test_continue_mode_async_save_failure_goes_on(
    tmp_path: Path, immutable: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A background save that fails in continue mode is logged at the next step, not
    raised; the next save succeeds once the disk is writable again."""
    out = tmp_path / "run"
    state = _state()
    with caplog.at_level(logging.ERROR, logger="safepoint"):
        ckpt = Checkpointer(
            out, save_every="2", total_steps=8, async_save=True, on_save_error="continue",
            signals=None,
        )  # fmt: skip
        ckpt.step(2, state)
        ckpt.flush()
        _freeze(immutable, out)
        pending = ckpt.step(4, state)  # fails in the background
        assert pending is not None and pending.wait_done()
        ckpt.step(5, state)  # logged here, not raised
        _chattr("-i", out)
        ckpt.step(6, state)
        ckpt.close()
    assert "SAVE FAILED at step 4" in _messages(caplog)
    assert [i.step for i in ckpt.list() if i.valid] == [2, 6]


@pytest.mark.parametrize("async_save", [False, True])
def test_continue_mode_failed_final_save_is_an_error(
    tmp_path: Path, immutable: list[Path], async_save: bool
) -> None:
    """Going on after the final save would end the run with no final checkpoint."""
    out = tmp_path / "run"
    state = _state()
    ckpt = Checkpointer(
        out, save_every="2", total_steps=4, async_save=async_save, on_save_error="continue",
        signals=None,
    )  # fmt: skip
    ckpt.step(2, state)
    ckpt.flush()
    _freeze(immutable, out)
    with pytest.raises(SaveFailedError) as e:
        ckpt.step(4, state)
        ckpt.close()
    ckpt.close()
    assert "final" in str(e.value) or "checkpoint-4" in str(e.value)
