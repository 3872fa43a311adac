"""#17 defect 2: the Trainer's own resume code only ever sees listed, checked files (a
verified view), and a checkpoint it must not resume from falls back to an older one."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safepoint.app.tiny import tiny_model_path

from .helpers import body, sign

pytestmark = pytest.mark.timeout(600)
TESTS = Path(__file__).parent.parent
sys.path.insert(0, str(TESTS / "programs"))


class Sentinel:
    """Unpickling it creates the file ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's script (stock SFTTrainer + SafepointCallback): checkpoints 2 and 4."""
    import hf_user_train

    out = tmp_path_factory.mktemp("trainer") / "run"
    model = str(tiny_model_path())
    assert hf_user_train.main([str(out), model, "--steps", "4", "--save-every", "2"]) == 0
    return out


def _plant_pickles(ck: Path, marker: Path) -> None:
    for name in ("rng_state.pth", "optimizer.pt", "scheduler.pt", "scaler.pt"):
        (ck / name).write_bytes(pickle.dumps(Sentinel(marker)))


def _trainer_state(value: object) -> Callable[[Path], None]:
    def change(ck: Path) -> None:
        data = value if isinstance(value, bytes) else json.dumps(value).encode()
        (ck / "trainer_state.json").write_bytes(data)
        sign(ck, body(ck))

    return change


def _retyped(ck: Path) -> None:
    doc = json.loads((ck / "trainer_state.json").read_bytes())
    doc["global_step"], doc["log_history"] = "4", {"not": "a list"}
    _trainer_state(doc)(ck)


def _wrong_shape(ck: Path) -> None:
    tensors = load_file(str(ck / "adapter_model.safetensors"))
    name = next(k for k in tensors if "lora_A" in k)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, str(ck / "adapter_model.safetensors"), metadata={"format": "pt"})
    sign(ck, body(ck))


def _fifo(ck: Path) -> None:
    (ck / "rng_state.pth").unlink()
    os.mkfifo(ck / "rng_state.pth")  # a reader that opened it would hang


# (planted in checkpoint-4, the checkpoint resumed from, words of the reason)
CASES = {
    "pickles": (lambda ck: None, 4, None),
    "fifo": (_fifo, 2, "rng_state.pth is not a regular file"),
    "list": (_trainer_state([1, 2, 3]), 2, "expected an object"),
    "deep": (_trainer_state(b"[" * 5000 + b"]" * 5000), 2, "nested deeper than"),
    "retyped": (_retyped, 2, "global_step"),
    "shape": (_wrong_shape, 2, "this model has"),
}


def _hostile(base_run: Path, tmp_path: Path, case: str) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(base_run, out, symlinks=True)
    (out / "safepoint.lock").unlink(missing_ok=True)
    marker = tmp_path / "UNPICKLED"
    ck = out / "checkpoint-4"
    _plant_pickles(ck, marker)  # in every case: never loaded
    CASES[case][0](ck)
    return out, marker


@pytest.mark.parametrize("case", sorted(CASES))
def test_callback_resume(
    base_run: Path, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The user's script reruns: no traceback, no pickle, the right checkpoint, said why."""
    import hf_user_train

    out, marker = _hostile(base_run, tmp_path, case)
    with caplog.at_level(logging.INFO, logger="safepoint"):
        assert hf_user_train.main([str(out), str(tiny_model_path()), "--steps", "6",
                                   "--save-every", "2"]) == 0  # fmt: skip
    said = "\n".join(r.getMessage() for r in caplog.records)
    _, resumed, reason = CASES[case]
    assert f"resuming from {out / f'checkpoint-{resumed}'} (step {resumed})" in said, said
    if reason:
        assert f"skipping {out / 'checkpoint-4'}" in said and reason in said, said
    assert not marker.exists()
    assert not [p for p in os.listdir(out) if "resume-view" in p]  # the view is gone


@pytest.mark.parametrize(
    "case", ["list", pytest.param("pickles", marks=pytest.mark.slow),
             pytest.param("shape", marks=pytest.mark.slow)],
)  # fmt: skip
def test_safepoint_train_resume(base_run: Path, tmp_path: Path, case: str) -> None:
    """``safepoint train`` on a run with a hostile newest checkpoint of its own kind."""
    out = tmp_path / "run"
    env = {**os.environ, "SAFEPOINT_HOME": str(tmp_path.parent / "home")}
    args = ["--max-steps", "4", "--save-every", "2", "--batch-size", "4", "--eval-split", "0"]
    cmd = [sys.executable, "-m", "safepoint", "train", "--output-dir", str(out)]
    first = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    marker = tmp_path / "UNPICKLED"
    _plant_pickles(out / "checkpoint-4", marker)
    CASES[case][0](out / "checkpoint-4")
    args[1] = "6"
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in text, text[-3000:]
    text = " ".join(text.split())  # its lines wrap at 80 columns
    _, resumed, reason = CASES[case]
    assert f"resuming from {out / f'checkpoint-{resumed}'} (step {resumed})" in text, text
    if reason:
        assert reason in text, text
    assert not marker.exists()
