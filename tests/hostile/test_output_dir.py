"""#17 defects 4, 5 and 8: the output directory cannot be turned against the run (a
deleted lock file, symlinks and FIFOs where safepoint writes or reads) and a directory
whose name is not UTF-8 saves and resumes like any other."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer, RunLockedError
from safepoint.errors import UnsafeFileError
from safepoint.lock import LOCK_NAME
from safepoint.records import RECORD_NAME

from .helpers import cli, ls_json, make_run, no_traceback, small_state, train_step

pytestmark = pytest.mark.timeout(300)

LIVE_RUN = textwrap.dedent(
    """
    import sys, torch
    from safepoint import Checkpointer
    model = torch.nn.Linear(2, 2)
    with Checkpointer(sys.argv[1], signals=None) as ckpt:
        print("ready", flush=True)
        for line in sys.stdin:
            ckpt.save(int(line), {"model": model}).wait()  # committed: "saved"
            print("saved", flush=True)
    """
)


def test_deleting_the_lock_file_under_a_live_run_keeps_others_out(tmp_path: Path) -> None:
    make_run(tmp_path, steps=(5, 9, 12))
    live = subprocess.Popen(
        [sys.executable, "-c", LIVE_RUN, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert live.stdout is not None and live.stdin is not None
        assert live.stdout.readline().strip() == "ready"
        (tmp_path / LOCK_NAME).unlink()

        with pytest.raises(RunLockedError):
            Checkpointer(tmp_path, signals=None)
        proc = cli("prune", tmp_path, "--keep-last", "1")
        assert proc.returncode == 2, no_traceback(proc)
        assert b"another run holds the lock" in proc.stderr
        assert all((tmp_path / f"checkpoint-{s}").is_dir() for s in (5, 9, 12))

        # the live run notices at its next commit and re-creates the file
        live.stdin.write("20\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "saved"
        assert str(live.pid) in (tmp_path / LOCK_NAME).read_text()
        with pytest.raises(RunLockedError, match=f"pid {live.pid}"):
            Checkpointer(tmp_path, signals=None)
    finally:
        if live.stdin:
            live.stdin.close()
        live.wait(timeout=120)
    assert live.returncode == 0
    with Checkpointer(tmp_path, signals=None) as ckpt:  # released at the end
        assert ckpt.restore({"model": torch.nn.Linear(2, 2)}) == 20


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


@pytest.mark.parametrize("name", [LOCK_NAME, RECORD_NAME])
def test_a_symlinked_lock_or_record_is_refused_not_written_through(
    tmp_path: Path, victim: Path, name: str
) -> None:
    out = tmp_path / "run"
    make_run(out)
    (out / name).unlink()
    (out / name).symlink_to(victim)
    with pytest.raises(UnsafeFileError, match=f"{name} is a symlink.*remove it"):
        Checkpointer(out, signals=None)
    proc = cli("prune", out, "--keep-last", "1")
    text = " ".join(no_traceback(proc).split())  # log lines wrap at 80 columns
    assert f"{name} is a symlink" in text, text
    if name == LOCK_NAME:  # no lock, no pruning
        assert proc.returncode == 2 and (out / "checkpoint-5").is_dir()
    else:  # pruning needs no record: it goes on, and its event is not written through
        assert proc.returncode == 0 and not (out / "checkpoint-5").exists()
        proc = cli("ls", out)
        said = " ".join(no_traceback(proc).split())
        assert proc.returncode == 2 and f"{name} is a symlink" in said
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_record_that_would_never_end_is_refused(tmp_path: Path, kind: str) -> None:
    make_run(tmp_path)
    (tmp_path / RECORD_NAME).unlink()
    if kind == "fifo":
        os.mkfifo(tmp_path / RECORD_NAME)
    else:
        (tmp_path / RECORD_NAME).symlink_to("/dev/zero")
    for args in (("ls", tmp_path), ("ls", tmp_path, "--json"), ("report", tmp_path)):
        proc = cli(*args)  # a deadline: a hang fails here
        text = no_traceback(proc)
        assert proc.returncode == 2 and RECORD_NAME in text, text
    with pytest.raises(UnsafeFileError, match="remove it"):
        Checkpointer(tmp_path, signals=None)


def test_a_directory_whose_name_is_not_utf8_saves_and_resumes(tmp_path: Path) -> None:
    out = os.fsencode(tmp_path) + b"/run-\xff"
    saved = make_run(out)
    infos = ls_json(out)
    assert [i["status"] for i in infos.values()] in (["valid"] * 2, ["complete"] * 2)
    proc = cli("verify", out)
    assert proc.returncode == 0, no_traceback(proc)

    state = small_state(seed=99)
    with Checkpointer(os.fsdecode(out), signals=None) as ckpt:
        assert ckpt.restore(state) == 9
        for k, v in state["model"].state_dict().items():
            assert torch.equal(v, saved[9][k])
        train_step(state)
        ckpt.save(10, state)
    assert os.path.isdir(out + b"/checkpoint-10")


@pytest.mark.parametrize("kind", ["fifo", "outside-link"])
def test_report_of_a_stock_trainer_folder_never_follows_its_files(
    tmp_path: Path, kind: str
) -> None:
    # A stock Trainer's folder is another tool's: its trainer_state.json is read as a
    # regular file only, so a FIFO cannot hang ``report`` and a link cannot leak a file.
    run = tmp_path / "run"
    good = run / "checkpoint-2"
    good.mkdir(parents=True)
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    (good / "trainer_state.json").write_text(f'{{"global_step": 2, "log_history": {history}}}'
                                             .replace("'", '"'))  # fmt: skip
    bad = run / "checkpoint-9"
    bad.mkdir()
    outside = tmp_path / "secret.json"
    outside.write_text('{"global_step": 9, "log_history": [{"step": 9, "loss": 123.0}]}')
    if kind == "fifo":
        os.mkfifo(bad / "trainer_state.json")
    else:
        (bad / "trainer_state.json").symlink_to(outside)
    proc = cli("report", run, "--out", tmp_path / "r")  # a deadline: a hang fails here
    text = no_traceback(proc)
    assert proc.returncode == 0, text
    page = (tmp_path / "r" / "report.html").read_text()
    assert "123" not in page  # the linked file's loss never reached the report
