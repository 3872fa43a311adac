"""async_save through SafepointCallback with a real transformers Trainer (tiny GPT-2)."""

from __future__ import annotations

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
    cb = SafepointCallback(output_dir=out, save_every="2", keep_last=None, **options)
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
