"""async_save through SafepointCallback with a real transformers Trainer (tiny GPT-2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import safepoint.store
from safepoint import SafepointCallback, SaveFailedError
from safepoint.format import read_safetensors
from safepoint.records import read_events


def _trainer(out: Path, **options: object):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    )
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 64, (24, 16), generator=g)]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    # keep_full=0: every checkpoint stays whole, to be compared file by file
    cb = SafepointCallback(output_dir=out, save_every="2", keep_last=None, keep_full=0, **options)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])


def test_async_checkpoints_equal_sync_ones(tmp_path: Path) -> None:
    _trainer(tmp_path / "sync").train()
    _trainer(tmp_path / "async", async_save=True).train()
    for step in (2, 4, 6):
        for name in ("model.safetensors", "optimizer.safetensors"):
            a, _ = read_safetensors(tmp_path / "sync" / f"checkpoint-{step}" / name)
            b, _ = read_safetensors(tmp_path / "async" / f"checkpoint-{step}" / name)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), (step, name)
    modes = {e["mode"] for e in read_events(tmp_path / "async") if e["event"] == "save"}
    assert modes == {"async"}


def test_background_failure_stops_the_trainer_at_the_next_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int, *args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(safepoint.store, "write_safetensors", failing)
    trainer = _trainer(tmp_path, async_save=True)
    with pytest.raises(SaveFailedError, match="Input/output error"):
        trainer.train()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".staging")]
    assert not list(tmp_path.glob("checkpoint-*"))


def test_trainer_state_json_is_json_of_the_whole_state_save_after_save(tmp_path: Path) -> None:
    """Each log entry is encoded once per run and spliced in: the bytes are those of
    ``json.dumps`` of the whole state at every save, as the log grows, when an entry is
    replaced, when the log is cut short and when it is empty."""
    import dataclasses

    from safepoint.integrations.hf_layout import trainer_state_json

    trainer = _trainer(tmp_path)
    state = trainer.state

    def reference() -> bytes:
        doc = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
        return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()

    assert trainer_state_json(trainer) == reference()  # empty log
    for step in range(1, 30):
        state.log_history.append({"loss": 1 / step, "step": step, "epoch": step / 7})
        if step % 5 == 0:
            state.log_history.append({"eval_loss": 2 / step, "step": step})
        if step % 4 == 0:
            assert trainer_state_json(trainer) == reference()
    state.log_history[3] = {"loss": 123.0, "step": 4}  # replaced: encoded again
    assert trainer_state_json(trainer) == reference()
    del state.log_history[10:]  # cut short
    assert trainer_state_json(trainer) == reference()
    state.log_history.clear()
    assert trainer_state_json(trainer) == reference()


def test_trainer_state_json_is_the_state_at_the_save_not_at_the_write(tmp_path: Path) -> None:
    """The writer encodes ``trainer_state.json`` while training goes on: it holds the
    state when the save was taken (the log, the step, the callbacks' states)."""
    from safepoint.integrations.hf_layout import trainer_state_json, trainer_state_later

    trainer = _trainer(tmp_path / "unit")
    trainer.state.log_history.append({"loss": 1.0, "step": 1})
    trainer.state.global_step = 1
    now = trainer_state_json(trainer)
    later = trainer_state_later(trainer)
    trainer.state.log_history.append({"loss": 0.5, "step": 2})
    trainer.state.global_step = 2
    trainer.state.stateful_callbacks["TrainerControl"]["args"]["should_save"] = True
    assert later() == now

    trainer = _trainer(tmp_path / "run", async_save=True)
    trainer.args.logging_steps = 1
    trainer.train()
    for step in (2, 4, 6):
        doc = json.loads(
            (tmp_path / "run" / f"checkpoint-{step}" / "trainer_state.json").read_text()
        )
        assert doc["global_step"] == step
        assert doc["log_history"][-1]["step"] == step
