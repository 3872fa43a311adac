"""#13: one engine behind every entry point.

(a) ``on_busy="skip"`` holds through ``SafepointCallback`` as it does for a plain
    ``Checkpointer`` (tests/test_async.py): a save due while the previous one is still
    being written is skipped (recorded as ``save_skipped``), training never waits for it.
(b) The same damaged checkpoint, and the same checkpoint of another configuration, give
    the same exception class and the same message shape whether resumed by
    ``Checkpointer.restore(state, checkpoint=path)``, by ``SafepointCallback`` through
    ``trainer.train(resume_from_checkpoint=path)`` or by ``safepoint train --resume PATH``
    (exit code of that class, one line).

Checkpoints are made for real by ``safepoint train`` and damaged on disk.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import safepoint.store
from safepoint import (
    Checkpointer,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    SafepointCallback,
)
from safepoint.records import read_events
from safepoint.validity import inspect

# ----------------------------------------------------------------------------- shared


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SAFEPOINT_HOME of this module's own (the built-in model is built there once)."""
    where = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEPOINT_HOME", str(where))
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield where


# ---------------------------------------------------------- (a) on_busy="skip" via the callback

SLOW_WRITE_S = 0.4
"""Every tensor file takes this long to write: a save outlasts several tiny-model steps."""


@pytest.fixture
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """A slow disk, as tests/test_async.py makes one: each tensor-file write of the
    store takes ``SLOW_WRITE_S`` longer. Yields the start times of the writes."""
    real = safepoint.store.write_safetensors
    starts: list[float] = []

    def slow(*args: object, **kwargs: object) -> Any:
        starts.append(time.monotonic())
        time.sleep(SLOW_WRITE_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(safepoint.store, "write_safetensors", slow)
    yield starts


class Recording(SafepointCallback):
    """Remembers the steps it committed (the public ``committed`` hook)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.steps: list[int] = []

    def committed(self, info: Any, seconds: float) -> None:
        self.steps.append(info.step)


def _user_trainer(out: Path, callback: SafepointCallback, *, steps: int) -> Any:
    """A user's script in small: stock SFTTrainer on the built-in tiny model, full weights."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from safepoint.app.tiny import builtin_dataset_path, tiny_model_path

    path = tiny_model_path()
    data = load_dataset("json", data_files=str(builtin_dataset_path()), split="train")
    config = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        num_train_epochs=100,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        max_length=32,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=3,
    )
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=config,
        train_dataset=data.select(range(32)),
        processing_class=AutoTokenizer.from_pretrained(path),
        callbacks=[callback],
    )


def test_callback_on_busy_skip_skips_saves_due_while_one_is_in_flight(
    tmp_path: Path, home: Path, slow_disk: list[float]
) -> None:
    steps = 12
    out = tmp_path / "run"
    callback = Recording(save_every=1, async_save=True, on_busy="skip", keep_last=2)
    trainer = _user_trainer(out, callback, steps=steps)
    trainer.train()  # the run finishes
    assert trainer.state.global_step == steps
    assert slow_disk, "no tensor file went through the store's writer"

    events = list(read_events(out))
    committed = [e["step"] for e in events if e["event"] == "save" and e["result"] == "committed"]
    skipped = [e["step"] for e in events if e["event"] == "save_skipped"]
    waits = [e["step"] for e in events if e["event"] == "save_busy" and e["step"] < steps]
    summary = f"committed {committed}, skipped {skipped}, waited at {waits}"
    # Each save writes for >= SLOW_WRITE_S, far longer than a step of the tiny model: the
    # saves due meanwhile are skipped, and training never waits for a scheduled save.
    assert waits == [], "on_busy='skip' made training wait for a save in flight: " + summary
    assert skipped, "no save was skipped although each one was still in flight: " + summary
    assert len(committed) < steps, summary
    assert not set(skipped) & set(committed), summary
    assert committed[-1] == steps, summary  # the end of training is always saved
    assert callback.steps == committed, summary  # the hook saw exactly the commits
    assert inspect(out / f"checkpoint-{steps}", deep=True).valid


# ------------------------------------------- (b) one error per checkpoint, every entry point

BASE_FLAGS = {"max_steps": 2, "save_every": "2", "eval_split": 0.0, "batch_size": 4}
"""The run that writes the checkpoint: LoRA r=8 (the default) on the tiny model."""
OTHER_SHAPE = {"lora_r": 4}
"""Another configuration: a LoRA adapter of another rank (other fingerprint, other shapes)."""


def _flags_to_cli(flags: dict[str, Any]) -> list[str]:
    return [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "safepoint", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def _config(out: Path, **extra: Any) -> Any:
    from safepoint.app.config import TrainConfig

    return TrainConfig.resolve(None, {**BASE_FLAGS, **extra, "output_dir": str(out)})


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Path:
    """checkpoint-2 of a real ``safepoint train`` run (valid)."""
    base = tmp_path_factory.mktemp("written")
    done = _cli(*_flags_to_cli(BASE_FLAGS), "--output-dir", str(base / "run"), cwd=base)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = base / "run" / "checkpoint-2"
    assert inspect(checkpoint, deep=True).valid
    return checkpoint


def _corrupt(written: Path, where: Path) -> Path:
    """A copy of ``written`` with one byte of the adapter's tensor data flipped (same
    size, so only a checksum finds it)."""
    copy = where / "corrupt" / written.name
    shutil.copytree(written, copy)
    target = copy / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    info = inspect(copy, deep=True)
    assert not info.valid and info.status == "corrupt", info
    return copy


def _via_checkpointer(checkpoint: Path, out: Path, cfg: Any) -> BaseException:
    """``Checkpointer.restore(state, checkpoint=path)`` with the state a Trainer of ``cfg``
    would restore (its optimizer and scheduler)."""
    from safepoint.app.job import build_trainer, plan

    trainer = build_trainer(plan(cfg), SafepointCallback(resume=False))
    trainer.create_optimizer_and_scheduler(num_training_steps=cfg.max_steps)
    state = {"optimizer": trainer.optimizer, "scheduler": trainer.lr_scheduler}
    with (
        Checkpointer(out, fingerprint=cfg.fingerprint()) as ckpt,
        pytest.raises(Exception) as e,
    ):
        ckpt.restore(state, checkpoint=checkpoint)
    return e.value


def _via_callback(checkpoint: Path, out: Path, cfg: Any) -> BaseException:
    """A user's Trainer with ``SafepointCallback``, ``train(resume_from_checkpoint=path)``."""
    from safepoint.app.job import build_trainer, plan

    trainer = build_trainer(plan(cfg), SafepointCallback(fingerprint=cfg.fingerprint()))
    with pytest.raises(Exception) as e:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    return e.value


def _via_cli(checkpoint: Path, out: Path, extra: dict[str, Any]) -> tuple[int, str]:
    flags = _flags_to_cli({**BASE_FLAGS, **extra})
    done = _cli(*flags, "--output-dir", str(out), "--resume", str(checkpoint), cwd=out.parent)
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, f"exit {done.returncode}, stderr:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.returncode, errors[0].removeprefix("Error: ")


def _shape(message: str, checkpoint: Path, kind: str) -> None:
    """One line that starts with the checkpoint (the command line may say first which
    flag gave it) and names the kind of problem."""
    assert "\n" not in message, message
    body = re.sub(r"^--resume \S+: ", "", message)
    assert body.startswith(str(checkpoint)), message
    assert kind in body, message


CASES = {
    # name: (how to make the checkpoint, resumer's config changes, class, words it names)
    "corrupt": (_corrupt, {}, CorruptCheckpointError, "corrupt"),
    "other-configuration": (
        lambda written, where: written,
        OTHER_SHAPE,
        IncompatibleCheckpointError,
        "another configuration",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_checkpoint_same_error_through_every_entry_point(
    case: str, written: Path, tmp_path: Path, home: Path
) -> None:
    make, extra, expected, kind = CASES[case]
    checkpoint = make(written, tmp_path)
    outs = {name: tmp_path / name for name in ("library", "callback", "cli")}
    for out in outs.values():
        out.mkdir()

    lib = _via_checkpointer(checkpoint, outs["library"], _config(outs["library"], **extra))
    cb = _via_callback(checkpoint, outs["callback"], _config(outs["callback"], **extra))
    code, cli = _via_cli(checkpoint, outs["cli"], extra)
    seen = (
        f"\n  Checkpointer.restore:  {type(lib).__name__}: {lib}"
        f"\n  SafepointCallback:     {type(cb).__name__}: {cb}"
        f"\n  safepoint train:       exit {code}: {cli}"
    )
    assert type(lib) is expected, seen
    assert type(cb) is expected, seen
    assert code == expected.exit_code, seen
    # The library says the same thing through both of its doors, and never names a flag.
    assert str(lib) == str(cb), seen
    assert "--" not in str(lib), seen
    for message in (str(lib), str(cb), cli):
        _shape(message, checkpoint, kind)
    # Nothing was resumed and nothing was written: no checkpoint appeared anywhere.
    for out in outs.values():
        assert not [p for p in out.iterdir() if p.name.startswith("checkpoint-")], seen
