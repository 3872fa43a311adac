"""Copy-free background saves: write the live tensors, hold ``optimizer.step()`` meanwhile.

A background save normally stages a copy of the state first (the stall) and keeps that
copy's memory for the whole run: one more checkpoint of RAM, whose first touch slowed the
full fine-tune of ``benchmarks/save_overhead.py`` by ~1.5 s on this VM. The tensors an
optimizer owns (its parameters, its state) change only inside ``optimizer.step()``: the
forward and backward passes of the next step leave them alone. So those can be written
as they are, while the next step runs, if every ``optimizer.step()`` of the process
waits until the writer has read them (``torch.optim``'s global step pre-hook).

What the fence cannot see (a tensor changed in place outside ``optimizer.step()``: an
EMA callback, ``load_state_dict`` into the model) is caught by the tensors' version
counters, checked once they are written: the save then fails loudly, and nothing is
committed. A change through ``.data`` bypasses version counters: such code must not run
while a save is in flight (``wait()`` for it, or leave copy-free saves off).

The option ``copy_free=True`` turns it on (with ``async_save``); measured in
``benchmarks/save_overhead.py``, row "copy-free".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from safepoint.errors import SaveFailedError


def owned_storages(optimizers: Iterable[Any]) -> set[int]:
    """Storage addresses of every tensor the ``optimizers`` change in ``step()``: their
    parameters and the tensors of their state."""
    owned: set[int] = set()
    for opt in optimizers:
        for group in opt.param_groups:
            owned.update(p.untyped_storage().data_ptr() for p in group["params"])
        for state in opt.state.values():
            owned.update(
                t.untyped_storage().data_ptr()
                for t in state.values()
                if isinstance(t, torch.Tensor)
            )
    return owned


def can_stay_live(t: torch.Tensor, owned: set[int]) -> bool:
    """Whether ``t`` may be written as it is while training goes on: on the CPU,
    contiguous, owned by an optimizer, with a version counter."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.is_inference():
        return False
    return t.untyped_storage().data_ptr() in owned


class OptimizerFence:
    """Holds every ``optimizer.step()`` of the process while live tensors are written.

    ``hold(tensors)`` before the writer starts (training thread). On the writer thread:
    ``check()`` once they are written, before the commit (``SaveFailedError`` if a
    version counter moved; a full-disk retry writes them again and checks again), then
    ``release()`` once the commit is done or failed. The writer's job releases it again
    when it ends, whatever happened, so training can never stay held.
    """

    def __init__(self) -> None:
        self._clear = threading.Event()
        self._clear.set()
        self._handle: Any = None
        self._versions: list[tuple[str, torch.Tensor, int]] = []
        self.waited_s = 0.0
        """Seconds ``optimizer.step()`` waited, in all (the stall this design adds)."""

    def hold(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self._handle is None:
            self._handle = register_optimizer_step_pre_hook(self._wait)
        self._versions = [(name, t, t._version) for name, t in tensors]
        self._clear.clear()

    def check(self) -> None:
        changed = [name for name, t, v in self._versions if t._version != v]
        if changed:
            what = changed[0] + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
            raise SaveFailedError(
                f"{what} changed in place outside optimizer.step() while the copy-free "
                "background save wrote it; nothing was committed. Wait for the save "
                "before such a change, or set copy_free=False"
            )

    def release(self) -> None:
        """Let ``optimizer.step()`` go on (idempotent)."""
        self._versions = []
        self._clear.set()

    def close(self) -> None:
        self.release()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _wait(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._clear.is_set():
            return
        t0 = time.perf_counter()
        self._clear.wait()
        self.waited_s += time.perf_counter() - t0


__all__ = ["OptimizerFence", "can_stay_live", "owned_storages"]
