"""Hostile and damaged checkpoints: nothing in a checkpoint folder can make safepoint run
code, read outside the folder, or resume from something it should not."""

from __future__ import annotations

import json
import pathlib
import pickle
import struct
import time
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer, CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.cli import main
from safepoint.fileio import hash_file
from safepoint.format import read_safetensors
from safepoint.manifest import MANIFEST_NAME, FileEntry, Manifest
from safepoint.validity import inspect, scan, verify


def small_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def make_run(out: Path, steps: tuple[int, ...] = (5, 9), seed: int = 0) -> dict:
    state = small_state(seed)
    with Checkpointer(out, save_every="1000", signals=None) as ckpt:
        for step in steps:
            ckpt.save(step, state)
    return state


def resign(folder: Path, **changes: FileEntry) -> None:
    """Rewrite the manifest as an attacker can: sizes and checksums as they now are (or
    as given), with a correct self-checksum."""
    m = Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), where="test")
    files = {}
    for name in m.files:
        size, digest = hash_file(folder / name)
        files[name] = changes.get(name, FileEntry(size, digest))
    fresh = Manifest(m.step, files, m.created, m.reason, m.metrics, m.fingerprint, m.versions)
    (folder / MANIFEST_NAME).write_bytes(fresh.to_json())


def restore_into_fresh(out: Path, **kw: object) -> tuple[int | None, dict]:
    state = small_state(seed=123)
    with Checkpointer(out, signals=None) as ckpt:
        return ckpt.restore(state, **kw), state


def same_weights(a: dict, b: dict) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a["model"].parameters(), b["model"].parameters(), strict=True)
    )


# ------------------------------------------------------------------ damaged files


def test_manifest_sizes_that_disagree_with_the_files(tmp_path: Path) -> None:
    make_run(tmp_path)
    ck = tmp_path / "checkpoint-9"
    real = hash_file(ck / "model.safetensors")
    resign(ck, **{"model.safetensors": FileEntry(real[0] + 8, real[1])})
    info = inspect(ck)
    assert info.status == "corrupt"
    assert any("model.safetensors: size expected" in p for p in info.problems)
    step, _ = restore_into_fresh(tmp_path)
    assert step == 5  # falls back to the older valid checkpoint
    assert main(["verify", str(tmp_path)]) == 1


def _safetensors(header: dict, data: bytes = b"", *, length: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


MALICIOUS = {
    "huge header length": _safetensors({}, length=2**63),
    "header longer than the file": _safetensors({"a": 1}, length=10_000),
    "huge shape": _safetensors(
        {"w": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "offsets past the end": _safetensors(
        {"w": {"dtype": "F32", "shape": [2**30], "data_offsets": [0, 2**32]}}, b"\0" * 16
    ),
    "overlapping offsets": _safetensors(
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        },
        b"\0" * 24,
    ),
    "negative offsets": _safetensors(
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4
    ),
    "unknown dtype": _safetensors(
        {"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
    ),
    "not json": struct.pack("<Q", 8) + b"\xff" * 8,
    "empty": b"",
}


@pytest.mark.parametrize("name", list(MALICIOUS))
def test_malicious_safetensors_headers_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(MALICIOUS[name])
    with pytest.raises(CorruptCheckpointError, match="not a readable safetensors file"):
        read_safetensors(path)


def test_a_resigned_checkpoint_with_a_malicious_tensor_file_is_skipped(tmp_path: Path) -> None:
    make_run(tmp_path)
    ck = tmp_path / "checkpoint-9"
    (ck / "model.safetensors").write_bytes(MALICIOUS["overlapping offsets"])
    resign(ck)  # sizes and checksums all match: only reading the tensors can tell
    assert inspect(ck, deep=True).valid
    step, _ = restore_into_fresh(tmp_path)
    assert step == 5
    with pytest.raises(CorruptCheckpointError, match="not a readable safetensors file"):
        restore_into_fresh(tmp_path, checkpoint=ck)


# ------------------------------------------------------------------------- pickles


class _Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _stock_trainer_folder(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True)
    evil = pickle.dumps({"state": _Payload(marker)})
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (folder / name).write_bytes(evil)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    (folder / "adapter_model.safetensors").write_bytes(MALICIOUS["overlapping offsets"])


def test_the_pickle_payload_works_when_loaded(tmp_path: Path) -> None:
    # The control: the same bytes do run code when unpickled, so the tests below that
    # see no marker prove that safepoint never unpickled them.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps({"state": _Payload(marker)}))
    assert marker.exists()


def test_pickles_in_checkpoint_folders_are_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    out = tmp_path / "run"
    saved = make_run(out)
    # a pickle planted in a valid safepoint checkpoint, and a stock-Trainer folder
    (out / "checkpoint-9" / "optimizer.pt").write_bytes(pickle.dumps(_Payload(marker)))
    _stock_trainer_folder(out / "checkpoint-12", marker)

    infos = {i.name: i for i in scan(out, deep=True)}
    assert infos["checkpoint-9"].valid and "optimizer.pt" in infos["checkpoint-9"].extra_files
    assert infos["checkpoint-12"].status == "foreign"
    assert verify(out)
    assert main(["ls", str(out)]) == 0

    step, state = restore_into_fresh(out)
    assert step == 9 and same_weights(state, saved)  # the foreign newer folder is ignored
    with pytest.raises(IncompatibleCheckpointError) as e:
        restore_into_fresh(out, checkpoint=out / "checkpoint-12")
    message = str(e.value)
    assert "not written by safepoint" in message and "never loads" in message
    assert "optimizer.pt" in message and "trainer_state.json" in message
    assert not marker.exists()


def test_safepoint_train_resume_from_a_stock_trainer_folder_explains_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "code-ran"
    foreign = tmp_path / "elsewhere" / "checkpoint-12"
    _stock_trainer_folder(foreign, marker)
    args = ["train", "--output-dir", str(tmp_path / "run"), "--max-steps", "2"]
    assert main([*args, "--resume", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "not written by safepoint" in err and "are pickles, which safepoint never loads" in err
    assert not marker.exists()
    assert not list((tmp_path / "run").glob("checkpoint-*"))


# ------------------------------------------------------------------------ symlinks


def test_a_symlinked_checkpoint_folder_is_never_followed(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    saved = make_run(out, steps=(5,))
    make_run(elsewhere, steps=(9,), seed=7)
    target = elsewhere / "checkpoint-9"
    before = {p.name: hash_file(p) for p in target.iterdir()}
    (out / "checkpoint-9").symlink_to(target, target_is_directory=True)

    info = inspect(out / "checkpoint-9")
    assert info.status == "corrupt" and "symlink" in info.problems[0]
    step, state = restore_into_fresh(out)
    assert step == 5 and same_weights(state, saved)
    with pytest.raises(CorruptCheckpointError, match="symlink"):
        restore_into_fresh(out, checkpoint=out / "checkpoint-9")
    with Checkpointer(out, keep_last=1, signals=None) as ckpt:
        ckpt.save(20, small_state())  # retention runs: the link is not its to delete
    assert (out / "checkpoint-9").is_symlink()
    assert {p.name: hash_file(p) for p in target.iterdir()} == before


def test_a_state_file_changed_after_a_passing_inspect_is_caught_again(tmp_path: Path) -> None:
    """Shallow inspections skip re-parsing state files that passed and did not change
    (retention inspects every kept checkpoint after each save); a change of the same size,
    under a re-signed manifest, is a new file and is parsed again."""
    make_run(tmp_path, steps=(5,))
    folder = tmp_path / "checkpoint-5"
    assert inspect(folder).valid and inspect(folder).valid  # the second from the cache
    state = folder / "state.json"
    text = state.read_bytes()
    broken = text.replace(b'"version":1', b'"version":9')  # same length, a future format
    assert broken != text and len(broken) == len(text)
    time.sleep(0.05)  # file times tick in jiffies (4 ms); a cached pass is one tick old
    state.write_bytes(broken)  # in place, manifest untouched: only its times changed
    info = inspect(folder)
    assert info.status == "corrupt" and "state.json" in "; ".join(info.problems)
    state.write_bytes(text)
    assert inspect(folder).valid
    time.sleep(0.05)
    state.write_bytes(broken)
    resign(folder)  # and under a manifest that vouches for it
    info = inspect(folder)
    assert info.status == "corrupt" and "state.json" in "; ".join(info.problems)
