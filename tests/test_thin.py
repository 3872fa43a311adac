"""Thin older checkpoints (``keep_full``): the newest N and the best keep the resumable
state, older kept ones only what evaluation and export need; thinning is a commit (a
crash at any of its file events leaves the full or the thin one, never neither), resume
never picks a thin one, and verify, ls, export and report read them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer
from safepoint.app.chaos_events import Runner, count_events
from safepoint.cli import main
from safepoint.errors import IncompatibleCheckpointError
from safepoint.snapshot import capture
from safepoint.store import Store
from safepoint.validity import aside_folders, inspect, latest_checkpoint, scan, verify

from .conftest import TOY, run_toy, same_tensors

PY = sys.executable


def _loop(out: Path, steps: int, **options: object) -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt}
    with Checkpointer(out, save_every=1, async_save=False, **options) as ckpt:
        start = ckpt.restore(state) or 0
        for step in range(start, steps):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            ckpt.step(step + 1, state, metrics={"loss": 1.0 / (step + 1)})
    return state


def test_older_checkpoints_are_thinned_to_the_weights_and_verify_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _loop(tmp_path, 5, keep_full=2)
    infos = scan(tmp_path)
    assert [(i.step, i.thin) for i in infos] == [
        (1, True), (2, True), (3, True), (4, False), (5, False)
    ]  # fmt: skip
    for info in infos:
        assert info.valid and info.manifest is not None
        names = set(info.manifest.files)
        if info.thin:
            assert names == {"model.safetensors"}
            assert info.manifest.thin is not None
            assert info.manifest.thin.dropped == ("optimizer.safetensors", "state.json")
            assert sorted(os.listdir(info.path)) == ["model.safetensors", "safepoint.json"]
        else:
            assert names == {"model.safetensors", "optimizer.safetensors", "state.json"}
    assert all(i.valid for i in verify(tmp_path))  # every thin one re-hashed whole
    assert main(["verify", str(tmp_path)]) == 0
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    capsys.readouterr()
    assert main(["ls", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    kinds = {c["name"]: c.get("kind") for c in listed}
    assert kinds["checkpoint-1"] == "thin" and kinds["checkpoint-5"] == "full"
    # the run record says what each thinning dropped and freed
    events = [json.loads(x) for x in (tmp_path / "safepoint.log.jsonl").read_text().splitlines()]
    thinned = [e for e in events if e["event"] == "thin"]
    assert [e["step"] for e in thinned] == [1, 2, 3] and all(e["freed"] > 0 for e in thinned)


def test_keep_full_zero_or_none_keeps_every_checkpoint_full(tmp_path: Path) -> None:
    for keep_full in (0, None):
        out = tmp_path / str(keep_full)
        _loop(out, 4, keep_full=keep_full)
        assert [i.thin for i in scan(out)] == [False] * 4


def test_the_best_stays_full(tmp_path: Path) -> None:
    _loop(tmp_path, 5, keep_full=1, keep_best=1, metric="loss", mode="max")
    assert [(i.step, i.thin) for i in scan(tmp_path)] == [
        (1, False), (2, True), (3, True), (4, True), (5, False)
    ]  # fmt: skip


def test_resume_skips_thin_ones_silently_and_refuses_one_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _loop(tmp_path, 4, keep_full=1)
    # the only full one damaged: the thin ones are no fallback, and no "damage" either
    path = tmp_path / "checkpoint-4" / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    model = torch.nn.Linear(8, 8)
    state = {"model": model, "optimizer": torch.optim.AdamW(model.parameters())}
    with (
        caplog.at_level(logging.WARNING, logger="safepoint"),
        Checkpointer(tmp_path, keep_full=1) as ckpt,
    ):
        assert ckpt.restore(state) is None
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1 and "checkpoint-4" in skipped[0], skipped
    with (
        Checkpointer(tmp_path, keep_full=1) as ckpt,
        pytest.raises(IncompatibleCheckpointError, match="checkpoint-3 is thin"),
    ):
        ckpt.restore(state, checkpoint=3)


def test_a_thin_checkpoint_of_the_same_step_is_replaced_by_its_full_one(tmp_path: Path) -> None:
    """The slot rule: the full save of the very checkpoint that was thinned (every kept
    file, size and checksum equal) takes the slot back; the thin one is not set aside as
    another line of the run (nothing of it is lost)."""
    model = torch.nn.Linear(4, 4)
    state = {"model": model, "optimizer": torch.optim.AdamW(model.parameters())}
    store = Store(tmp_path)
    full = store.commit(capture(state, step=7, copy=True, rng=False))
    thin = store.thin(full)
    assert thin is not None and inspect(thin.path).thin
    again = store.commit(capture(state, step=7, copy=True, rng=False))
    store.settle()
    assert again.valid and not inspect(again.path, deep=True).thin
    assert aside_folders(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-7"]


def _toy(*args: str) -> list[str]:
    return [PY, str(TOY), "{out}", "--steps", "6", "--save-every", "2", "--keep-full", "1", *args]


@pytest.mark.crash
@pytest.mark.parametrize(("point", "kind"), [("thin_staged", "full"), ("thin_exchanged", "thin")])
def test_a_crash_inside_a_thinning_leaves_full_or_thin_and_resumes_identically(
    tmp_path: Path, reference_run: object, point: str, kind: str
) -> None:
    args = ("--steps", "6", "--save-every", "2", "--keep-full", "1")
    proc = run_toy(tmp_path, *args, env={"SAFEPOINT_CRASH_AT": point}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    info = inspect(tmp_path / "checkpoint-2", deep=True)
    assert info.valid and info.thin == (kind == "thin")
    assert run_toy(tmp_path, *args).returncode == 0
    assert same_tensors(tmp_path / "final.safetensors", reference_run(*args))  # type: ignore[operator]
    assert inspect(tmp_path / "checkpoint-2", deep=True).thin
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".staging-", ".trash-"))]


def _thinning_events(runner: Runner, out: Path) -> list[int]:
    """The file events of the first thinning (checkpoint-2), fault-free."""
    events = count_events(runner, out, timeout=120).events
    begin = next(e.number for e in events if e.kind == "mkdir" and e.path.startswith(
        ".staging-checkpoint-2-") and e.nth == 2)  # fmt: skip
    end = next(e.number for e in events if e.kind == "rmdir" and ".trash-checkpoint-2-" in e.path)
    return list(range(begin, end + 1))


def _every_point(tmp_path: Path, every: bool) -> None:
    reference = tmp_path / "reference"
    runner = Runner(_toy(), tmp_path / "work", timeout=120)
    try:
        points = _thinning_events(runner, reference)
        assert len(points) >= 10
        if not every:  # the swap, the manifest before it, the trash rename after it
            points = points[1:2] + points[5:7]
        for k in points:
            out = tmp_path / f"p{k}"
            log = tmp_path / f"p{k}.log"
            spec = f"kill:{k}:{out}:{tmp_path / f'p{k}.ev'}:{tmp_path / f'p{k}.fired'}"
            assert runner.wait(runner.start(out, log, spec), 120) == -9
            info = inspect(out / "checkpoint-2", deep=True)  # full or thin, never neither
            assert info.valid, (k, info.problems)
            assert runner.wait(runner.start(out, log), 120) == 0, log.read_text()[-2000:]
            assert same_tensors(out / "final.safetensors", reference / "final.safetensors"), k
            assert inspect(out / "checkpoint-2", deep=True).thin
    finally:
        runner.close()


@pytest.mark.crash
def test_a_kill_at_the_swap_of_a_thinning_leaves_full_or_thin(tmp_path: Path) -> None:
    _every_point(tmp_path, every=False)


@pytest.mark.slow
@pytest.mark.crash
def test_a_kill_at_every_file_event_of_a_thinning_leaves_full_or_thin(tmp_path: Path) -> None:
    _every_point(tmp_path, every=True)


@pytest.mark.slow
def test_a_thin_checkpoint_of_safepoint_train_exports_and_generates(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home = tmp_path_factory.getbasetemp() / "safepoint-home"  # the tiny model, built once
    run = tmp_path / "run"
    args = ["--max-steps", "6", "--save-every", "2", "--keep-full", "1", "--batch-size", "4"]
    proc = subprocess.run(
        [PY, "-m", "safepoint", "train", "--output-dir", str(run), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SAFEPOINT_HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    thin = [i for i in scan(run) if i.thin]
    assert thin, [(i.name, i.thin) for i in scan(run)]
    assert set(thin[0].manifest.files) == {  # type: ignore[union-attr]
        "adapter_model.safetensors", "adapter_config.json", "trainer_state.json"
    }  # fmt: skip
    out = tmp_path / "merged"
    assert main(["export", str(run), "--checkpoint", str(thin[0].step), "--out", str(out),
                 "--merge"]) == 0  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("What is 2 plus 3?", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert tokenizer.decode(gen[0, ids["input_ids"].shape[1] :]).strip()
    capsys.readouterr()
    assert main(["report", str(run), "--json"]) == 0
    assert thin[0].name in capsys.readouterr().out
