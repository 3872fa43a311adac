"""#17 defect 1: a checkpoint cannot make safepoint open anything but the files its
manifest lists, as regular files inside the folder (no symlink, no FIFO)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safepoint import Checkpointer, CorruptCheckpointError

from .helpers import body, check_entry_points, make_run, sign, small_state

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Weights outside the run, as an attacker would point to them."""
    path = tmp_path / "outside.safetensors"
    save_file({"weight": torch.full((3, 4), 7.0), "bias": torch.full((3,), 7.0)}, str(path))
    return path


def _point_model_at(ck: Path, name: str) -> None:
    def change(doc: dict) -> None:
        doc["entries"]["model"]["file"] = name
        doc["entries"]["model"]["tree"] = {
            "weight": {"__tensor__": "weight"},
            "bias": {"__tensor__": "bias"},
        }

    state = json.loads((ck / "state.json").read_bytes())
    change(state)
    (ck / "state.json").write_text(json.dumps(state))
    sign(ck, body(ck))


def test_an_unlisted_symlink_named_by_state_json(tmp_path: Path, outside: Path, caplog) -> None:
    out = tmp_path / "run"
    make_run(out)
    ck = out / "checkpoint-9"
    (ck / "x.safetensors").symlink_to(outside)
    _point_model_at(ck, "x.safetensors")
    check_entry_points(out, "checkpoint-9", "x.safetensors is a symlink", caplog=caplog)


def test_an_unlisted_regular_file_named_by_state_json(
    tmp_path: Path, outside: Path, caplog
) -> None:
    out = tmp_path / "run"
    make_run(out)
    ck = out / "checkpoint-9"
    (ck / "x.safetensors").write_bytes(outside.read_bytes())
    _point_model_at(ck, "x.safetensors")
    check_entry_points(out, "checkpoint-9", "a file listed in the manifest", caplog=caplog)


def test_a_fifo_named_by_state_json_never_blocks(tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    make_run(out)
    ck = out / "checkpoint-9"
    os.mkfifo(ck / "x.safetensors")
    _point_model_at(ck, "x.safetensors")
    check_entry_points(out, "checkpoint-9", "x.safetensors is not a regular file", caplog=caplog)


def test_a_listed_file_replaced_by_a_symlink_and_resigned(
    tmp_path: Path, outside: Path, caplog
) -> None:
    out = tmp_path / "run"
    make_run(out)
    ck = out / "checkpoint-9"
    (ck / "model.safetensors").unlink()
    (ck / "model.safetensors").symlink_to(outside)
    sign(ck, body(ck))  # sizes and checksums of the link's target: only the link tells
    check_entry_points(out, "checkpoint-9", "model.safetensors is a symlink", caplog=caplog)
    with Checkpointer(out, signals=None) as ckpt, pytest.raises(CorruptCheckpointError):
        ckpt.restore(small_state(), checkpoint=9)


def test_a_symlink_deep_inside_a_checkpoint(tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    make_run(out)
    ck = out / "checkpoint-9"
    (ck / "notes").mkdir()
    (ck / "notes" / "etc").symlink_to("/etc", target_is_directory=True)
    check_entry_points(out, "checkpoint-9", "notes/etc is a symlink", caplog=caplog)


def test_a_fifo_as_the_manifest_or_state_never_blocks(tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    make_run(out, steps=(5, 9, 12))
    (out / "checkpoint-12" / "safepoint.json").unlink()
    os.mkfifo(out / "checkpoint-12" / "safepoint.json")
    (out / "checkpoint-9" / "state.json").unlink()
    os.mkfifo(out / "checkpoint-9" / "state.json")
    infos = {i["name"]: i for i in json.loads(_run_cli("ls", out, "--json").stdout)}
    assert infos["checkpoint-12"]["status"] == "corrupt"
    assert "FIFO" in infos["checkpoint-12"]["problems"][0]
    assert infos["checkpoint-9"]["status"] == "corrupt"
    assert _run_cli("verify", out).returncode == 1
    with Checkpointer(out, signals=None) as ckpt:
        assert ckpt.restore(small_state()) == 5


def _run_cli(*args: object) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        [sys.executable, "-m", "safepoint", *map(os.fsencode, args)],  # type: ignore[arg-type]
        capture_output=True,
        timeout=120,
    )
    assert b"Traceback" not in proc.stderr, proc.stderr
    return proc


AUDITED_RESTORE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from safepoint import Checkpointer
    from safepoint.cli import main

    out = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    state = {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=0.1)}
    opened = []

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    with Checkpointer(out, signals=None) as ckpt:
        step = ckpt.restore(state)
    for command in (["ls", out, "--json"], ["verify", out]):
        try:
            main(command)
        except SystemExit:
            pass
    print(json.dumps({"step": step, "opened": opened}))
    """
)


def test_nothing_outside_the_run_is_opened(tmp_path: Path, outside: Path) -> None:
    """An audit hook in a real process records every ``open``: restore, ls and verify of
    a run whose newest checkpoint points out of itself open nothing outside the run."""
    out = tmp_path / "run"
    make_run(out, steps=(5, 9, 12))
    ck = out / "checkpoint-12"
    (ck / "x.safetensors").symlink_to(outside)
    _point_model_at(ck, "x.safetensors")
    ck = out / "checkpoint-9"
    (ck / "model.safetensors").unlink()
    (ck / "model.safetensors").symlink_to(outside)
    sign(ck, body(ck))
    proc = subprocess.run(
        [sys.executable, "-c", AUDITED_RESTORE, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 5
    run = os.path.realpath(out)
    outside_run = [
        p
        for p in result["opened"]
        if not (os.path.realpath(p) + os.sep).startswith(run + os.sep)
        and not os.path.realpath(p).startswith((sys.prefix, sys.base_prefix))
        and not p.endswith((".py", ".pyc", ".so"))
    ]
    assert not outside_run, outside_run
    assert any(p.endswith("checkpoint-5/model.safetensors") for p in result["opened"])
