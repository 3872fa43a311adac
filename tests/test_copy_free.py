"""Copy-free background saves (``copy_free=True``, ``safepoint.fence``): the tensors an
optimizer owns are written as they are while ``optimizer.step()`` waits."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import safepoint.store
from safepoint import Checkpointer, SaveFailedError
from safepoint.format import read_safetensors
from safepoint.records import read_events

DEADLINE = 60.0


def _state() -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _step(model, opt)  # the optimizer's state exists
    return {"model": model, "optimizer": opt}


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.ones(4, 32)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _in_thread(fn: object) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


def test_optimizer_step_waits_until_the_live_tensors_are_written(
    tmp_path: Path, gate: threading.Event
) -> None:
    state = _state()
    model, opt = state["model"], state["optimizer"]
    assert isinstance(model, torch.nn.Module) and isinstance(opt, torch.optim.Optimizer)
    weight = model.weight.detach().clone()
    exp_avg = opt.state[model.weight]["exp_avg"].clone()
    with Checkpointer(tmp_path, async_save=True, copy_free=True) as ckpt:
        pending = ckpt.save(1, state)
        assert ckpt.saver.background.buffers.nbytes == 0  # nothing was copied
        model(torch.ones(4, 32)).square().mean().backward()  # forward, backward: allowed
        stepping = _in_thread(opt.step)
        stepping.join(0.3)
        assert stepping.is_alive(), "optimizer.step() ran while the save read its tensors"
        gate.set()
        stepping.join(DEADLINE)
        assert not stepping.is_alive()
        assert pending.wait().valid
    tensors, _ = read_safetensors(tmp_path / "checkpoint-1" / "model.safetensors")
    assert torch.equal(tensors["weight"], weight)  # the weights of step 1, not step 2
    assert not torch.equal(model.weight, weight)
    optimizer, _ = read_safetensors(tmp_path / "checkpoint-1" / "optimizer.safetensors")
    assert any(torch.equal(t, exp_avg) for t in optimizer.values())
    waits = [e["wait_s"] for e in read_events(tmp_path) if e["event"] == "save_fence"]
    assert len(waits) == 1 and waits[0] >= 0.25  # the wait of optimizer.step(), recorded


def test_a_change_outside_optimizer_step_fails_the_save_and_commits_nothing(
    tmp_path: Path, gate: threading.Event
) -> None:
    state = _state()
    model, opt = state["model"], state["optimizer"]
    assert isinstance(model, torch.nn.Module) and isinstance(opt, torch.optim.Optimizer)
    with Checkpointer(tmp_path, async_save=True, copy_free=True, on_save_error="continue") as ckpt:
        pending = ckpt.save(1, state)
        with torch.no_grad():
            model.weight.add_(1.0)  # an EMA callback, a load_state_dict: not fenced
        gate.set()
        with pytest.raises(SaveFailedError, match=r"changed in place outside optimizer\.step"):
            pending.wait()
        assert not (tmp_path / "checkpoint-1").exists()
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".staging")]
        _step(model, opt)  # not held: the fence was released
        assert ckpt.save(2, state).wait().valid


def test_a_state_without_an_optimizer_holds_no_step(tmp_path: Path, gate: threading.Event) -> None:
    """Nothing is written live, so nothing waits: another optimizer steps freely."""
    state = _state()
    model, opt = state.pop("model"), state.pop("optimizer")
    assert isinstance(model, torch.nn.Module) and isinstance(opt, torch.optim.Optimizer)
    state["weights"] = {"w": model.weight.detach()}
    with Checkpointer(tmp_path, async_save=True, copy_free=True) as ckpt:
        pending = ckpt.save(1, state)
        stepping = _in_thread(lambda: _step(model, opt))
        stepping.join(DEADLINE / 2)
        assert not stepping.is_alive(), "optimizer.step() waited for a save it is not in"
        gate.set()
        assert pending.wait().valid


def test_the_fence_is_released_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: object, **kwargs: object) -> tuple[int, str]:
        time.sleep(0.2)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(safepoint.store, "write_safetensors", failing)
    state = _state()
    model, opt = state["model"], state["optimizer"]
    assert isinstance(model, torch.nn.Module) and isinstance(opt, torch.optim.Optimizer)
    with Checkpointer(tmp_path, async_save=True, copy_free=True, on_save_error="continue") as ckpt:
        pending = ckpt.save(1, state)
        stepping = _in_thread(lambda: _step(model, opt))
        stepping.join(DEADLINE)
        assert not stepping.is_alive(), "optimizer.step() stayed held after a failed save"
        with pytest.raises(SaveFailedError, match="Input/output error"):
            pending.wait()


def test_a_tensor_no_optimizer_owns_is_copied(tmp_path: Path, gate: threading.Event) -> None:
    state = _state()
    counter = torch.zeros(3)
    state["extra"] = {"counter": counter}  # changed by the loop, not by optimizer.step
    with Checkpointer(tmp_path, async_save=True, copy_free=True) as ckpt:
        pending = ckpt.save(1, state)
        counter.add_(1.0)
        gate.set()
        assert pending.wait().valid
    extra, _ = read_safetensors(tmp_path / "checkpoint-1" / "extra.safetensors")
    assert torch.equal(next(iter(extra.values())), torch.zeros(3))


def test_trainer_checkpoints_equal_sync_ones_with_a_slow_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer slower than a step: the next optimizer.step() waits, and every checkpoint
    holds exactly the state of its step (as a sync save writes it)."""
    pytest.importorskip("transformers")
    from tests.test_async_hf import _trainer

    _trainer(tmp_path / "sync").train()
    real = safepoint.store.write_safetensors

    def slow(*args: object, **kwargs: object) -> tuple[int, str]:
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(safepoint.store, "write_safetensors", slow)
    _trainer(tmp_path / "free", async_save=True, copy_free=True).train()
    for step in (2, 4, 6):
        for name in ("model.safetensors", "optimizer.safetensors"):
            a, _ = read_safetensors(tmp_path / "sync" / f"checkpoint-{step}" / name)
            b, _ = read_safetensors(tmp_path / "free" / f"checkpoint-{step}" / name)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), (step, name)
    events = list(read_events(tmp_path / "free"))
    assert {e["mode"] for e in events if e["event"] == "save"} == {"async"}
    assert [e for e in events if e["event"] == "save_fence"], "optimizer.step() never waited"


def test_a_retry_after_a_full_disk_writes_the_tensors_of_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk after the tensor files were written: the retry writes the live tensors
    again, so optimizer.step() must still be held until the retry has committed."""
    real = safepoint.store.Store.finish
    calls: list[int] = []

    def full_once(self: safepoint.store.Store, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)  # the training thread tries to step meanwhile
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(safepoint.store.Store, "finish", full_once)
    state = _state()
    model, opt = state["model"], state["optimizer"]
    assert isinstance(model, torch.nn.Module) and isinstance(opt, torch.optim.Optimizer)
    weight = model.weight.detach().clone()
    with Checkpointer(tmp_path, async_save=True, copy_free=True) as ckpt:
        pending = ckpt.save(1, state)
        stepping = _in_thread(lambda: _step(model, opt))
        assert pending.wait().valid
        stepping.join(DEADLINE)
    assert len(calls) == 2  # failed once, retried once
    tensors, _ = read_safetensors(tmp_path / "checkpoint-1" / "model.safetensors")
    assert torch.equal(tensors["weight"], weight)
    assert not torch.equal(model.weight, weight)
