"""Preemption and crashes: the emergency checkpoint and the exit that follows.

A stop signal (``signals.SignalGuard``) is acted on at the next step boundary: an
emergency checkpoint of that exact step, synchronously, then ``TrainingStopped``
(exit code 3). With a ``grace`` period, a save that cannot finish in the time left is
not started.

An exception in the training loop gets an emergency checkpoint only when the state is
exactly that of the last completed step: no optimizer step (and no forward pass that
updates running statistics) began since that step's boundary. The random generators
are rewound to that boundary before saving, so a resume is bit-identical.

``EmergencyStop`` talks to a small ``SaverPort`` (the engine's ``Saver``), never to the
``Checkpointer``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, Protocol

import numpy as np
import torch

from safepoint.errors import SafepointError
from safepoint.options import Options, parse_signals
from safepoint.records import RunRecord
from safepoint.signals import (
    NonFiniteLossError,
    SaveInterrupted,
    SignalGuard,
    TrainingStopped,
    start_line,
)
from safepoint.validity import CheckpointInfo

log = logging.getLogger("safepoint")

_SAFETY = 1.25  # an emergency save must fit the grace period with this margin


class SaverPort(Protocol):
    """What the emergency logic needs of the saver."""

    record: RunRecord
    last_commit_s: float | None
    """How long the last commit took: an emergency save must fit the grace period."""

    def latest(self) -> CheckpointInfo | None: ...

    def flush(self) -> None:
        """Wait for the background save in flight; raise ``SaveFailedError`` if it failed."""

    def abandon(self) -> None:
        """Give up the background save in flight (its staging folder is removed)."""


def _capture_rng() -> tuple[Any, ...]:
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore_rng(saved: tuple[Any, ...]) -> None:
    py, npy, cpu, cuda = saved
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class EmergencyStop:
    """The Checkpointer's preemption and crash logic (one per Checkpointer)."""

    def __init__(
        self,
        saver: SaverPort,
        where: str,
        *,
        options: Options,
        last_saved: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.saver = saver
        self.last_saved = last_saved
        self.guard = SignalGuard(parse_signals(options.signals), where=where)
        self.grace = options.grace_s
        self.stop_on_nan = options.stop_on_nan
        self.rng = options.save_rng
        self.handled = False
        self._state: Mapping[str, Any] | None = None
        self._boundary: int | None = None
        self._rng: tuple[Any, ...] | None = None
        self._dirty = False
        self._watched: set[int] = set()
        self._hooks: list[Any] = []

    @property
    def requested(self) -> str | None:
        """The name of the stop signal received and not yet acted on, or None."""
        sig = self.guard.signal
        if sig is None or self.handled or self.guard.interrupted:
            return None
        return sig.name

    @property
    def saving(self) -> bool:
        """True during an emergency save: the Checkpointer then commits synchronously."""
        return self.guard.saving

    def install(self) -> None:
        self.guard.install()

    def close(self) -> None:
        """Remove the hooks and put back the previous signal handlers."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._watched.clear()
        self._state = self._rng = None
        self.guard.uninstall()

    # ------------------------------------------------------------ step boundaries

    def check_loss(self, step: int, metrics: Mapping[str, Any]) -> None:
        """With ``stop_on_nan``: raise ``NonFiniteLossError`` if the loss is not finite."""
        loss = metrics.get("loss")
        if not self.stop_on_nan or not isinstance(loss, (int, float)) or math.isfinite(loss):
            return
        latest = self.saver.latest_written()
        self.saver.record.event("error", where="loss", step=step, error=f"loss is {loss}")
        raise NonFiniteLossError(
            f"the loss is {loss} at step {step}: the weights may already be damaged, so this "
            f"step is not saved; the newest checkpoint is "
            f"{latest.path if latest else 'none'}; lower the learning rate, clip gradients "
            f"or check the data near step {step}, then rerun the same command to resume"
        )

    def boundary(self, step: int, state: Mapping[str, Any], *, rng: bool) -> None:
        """``step`` completed and ``state`` is consistent: remember it for ``on_exception``."""
        self._boundary = step
        self._state = state
        self._dirty = False
        self._rng = _capture_rng() if rng else None
        for value in state.values():
            if id(value) not in self._watched:
                self._watch(value)

    def _watch(self, value: Any) -> None:
        self._watched.add(id(value))

        def dirty(*_args: object, **_kwargs: object) -> None:
            self._dirty = True

        if isinstance(value, torch.optim.Optimizer):
            # accelerate's wrapper never runs Optimizer.__init__: hook the real optimizer
            inner = getattr(value, "optimizer", None)
            real = inner if isinstance(inner, torch.optim.Optimizer) else value
            self._hooks.append(real.register_step_pre_hook(dirty))
        elif isinstance(value, torch.nn.Module):
            for module in value.modules():
                if getattr(module, "track_running_stats", False):

                    def forward(module: torch.nn.Module, _inputs: object) -> None:
                        if module.training:
                            self._dirty = True

                    self._hooks.append(module.register_forward_pre_hook(forward))

    def _has_optimizer(self) -> bool:
        return self._state is not None and any(
            isinstance(v, torch.optim.Optimizer) for v in self._state.values()
        )

    # ------------------------------------------------------------------- the stop

    def at_boundary(
        self, step: int, state: Mapping[str, Any], save: Callable[[], CheckpointInfo]
    ) -> None:
        """For integrations: ``step`` completed and ``state`` is consistent. After a stop
        signal: ``save()`` (unless this step is saved), then ``TrainingStopped``."""
        if self.requested:
            self.stop(step, None if self.last_saved() == step else save)
        self.boundary(step, state, rng=self.rng)

    def stop(self, step: int, save: Callable[[], CheckpointInfo] | None) -> NoReturn:
        """Act on the pending stop signal at the boundary after ``step``; always raises
        ``TrainingStopped``. ``save`` writes the emergency checkpoint; None when
        ``checkpoint-<step>`` was just committed."""
        name = self.requested or "a signal"
        self.handled = True
        self.saver.record.event("signal", signal=name, step=step)
        latest = self.saver.latest()
        resume = f"rerun the same command to resume from {latest.name if latest else 'the start'}"
        if save is None and latest is not None and latest.step == step:
            self._stopped(
                f"stopped by {name} at step {step}, which {latest.path} holds; "
                "rerun the same command to resume",
            )
        left = None
        if self.grace is not None and self.guard.received_at is not None:
            left = self.grace - (time.monotonic() - self.guard.received_at)
        took = self.saver.last_commit_s
        if left is not None and took is not None and took * _SAFETY > left:
            self.saver.record.event("emergency_save", step=step, result="skipped", left_s=left)
            self._stopped(
                f"stopped by {name} at step {step} without an emergency checkpoint: a save "
                f"takes about {took:.1f} s and only {max(left, 0):.1f} s of the "
                f"{self.grace:g} s grace period are left; {resume}",
            )
        return self._save_and_stop(step, name, save, resume)

    def _save_and_stop(
        self,
        step: int,
        name: str,
        save: Callable[[], CheckpointInfo] | None,
        resume: str,
    ) -> NoReturn:
        self.guard.saving = True
        try:
            if self.grace is not None:
                self.saver.abandon()  # under a deadline the emergency save goes first
            self.saver.flush()  # else a background save in flight finishes (or fails) first
            info = save() if save is not None else self.saver.latest()
        except SaveInterrupted:
            committed = self.saver.latest()
            self.saver.record.event("emergency_save", step=step, result="aborted")
            if committed is not None and committed.step == step:
                resume = f"it had already committed {committed.path}; rerun to resume from it"
            self._stopped(
                f"stopped by {name}; a second signal aborted the emergency save of "
                f"step {step} cleanly; {resume}",
            )
        except SafepointError as e:
            self.saver.record.event("emergency_save", step=step, result="failed", error=str(e))
            self._stopped(f"stopped by {name}; the emergency save failed ({e}); {resume}")
        finally:
            self.guard.saving = False
        self.saver.record.event("emergency_save", step=step, result="committed")
        where = info.path if info is not None else self.guard.where
        self._stopped(
            f"stopped by {name} at step {step}: saved the emergency checkpoint {where}; "
            "rerun the same command to resume",
        )

    def _stopped(self, message: str) -> NoReturn:
        start_line()  # a user's tqdm bar is still on screen
        log.warning("%s", message)
        raise TrainingStopped(message)

    def pending_at_close(self, last_step: int | None) -> TrainingStopped | None:
        """A stop signal that arrived after the last step: the error to raise at close."""
        if self.requested is None:
            return None
        name = self.requested
        self.handled = True
        latest = self.saver.latest()
        message = (
            f"stopped by {name} after the last step; the newest checkpoint is "
            f"{latest.path if latest else 'none'}; rerun the same command to finish"
        )
        self.saver.record.event("signal", signal=name, step=last_step)
        log.warning("%s", message)
        return TrainingStopped(message)

    # -------------------------------------------------------------- exceptions

    def on_exception(
        self,
        exc: BaseException,
        save: Callable[[int, Mapping[str, Any], str], CheckpointInfo],
        *,
        last_saved: int | None,
        several_ranks: bool = False,
    ) -> CheckpointInfo | None:
        """After ``exc`` escaped the training loop: ``save(step, state, reason)`` the last
        completed step if the state still is that step's (and ``last_saved`` is older),
        add a hint to ``exc``; return the checkpoint or None. With ``several_ranks`` no
        save is tried: it is collective, and the exception stopped this rank only (the
        others would wait in a different collective: a hang, not a checkpoint)."""
        if not isinstance(exc, Exception) or isinstance(exc, SafepointError):
            return None
        step, why_not = self._boundary, None
        if several_ranks:
            why_not = "several processes: a save needs every rank, and this one failed alone"
        elif step is None or self._state is None:
            why_not = "no step had completed in this process"
        elif last_saved == step:
            why_not = f"checkpoint-{step} already holds the last completed step"
        elif not self._has_optimizer():
            why_not = "without an optimizer in the state safepoint cannot tell it is consistent"
        elif self._dirty:
            why_not = (
                f"the failure came after step {step + 1} began to change the weights, so the "
                "state is not that of a completed step"
            )
        info = None
        if why_not is None and step is not None and self._state is not None:
            self.guard.saving = True
            try:
                self.saver.flush()
                if self._rng is not None:
                    _restore_rng(self._rng)
                info = save(step, self._state, f"exception: {type(exc).__name__}")
            except Exception as e:
                why_not = f"the emergency save failed ({e})"
            except SaveInterrupted:
                why_not = "a signal aborted the emergency save"
            finally:
                self.guard.saving = False
        self.saver.record.event(
            "exception",
            step=step,
            error=f"{type(exc).__name__}: {exc}"[:500],
            saved=None if info is None else info.name,
            why_not=why_not,
        )
        done = (
            f"saved the emergency checkpoint {info.path} (step {step}, the last completed one)"
            if info is not None
            else f"no emergency checkpoint ({why_not})"
        )
        note = f"safepoint: {done}; {hint_for(exc)}"
        log.warning("training failed with %s: %s", type(exc).__name__, note)
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        return info


def hint_for(exc: BaseException) -> str:
    """What to change before rerunning, for the common failures."""
    text = str(exc).lower()
    oom = getattr(torch, "OutOfMemoryError", ())
    if isinstance(exc, MemoryError) or (oom and isinstance(exc, oom)) or "out of memory" in text:
        return (
            "out of memory: lower the batch size (raise gradient accumulation to keep the "
            "effective batch) or enable gradient checkpointing, then rerun to resume"
        )
    if isinstance(exc, (StopIteration, KeyError, IndexError, UnicodeError)) or "dataset" in text:
        return "this looks like a data error: check the data, then rerun to resume"
    return "fix the cause, then rerun the same command to resume from the newest checkpoint"
