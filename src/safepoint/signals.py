"""Preemption and crashes: stop signals, emergency checkpoints, the grace period.

A signal handler only sets a flag. The training loop acts on it at its next step
boundary (``Checkpointer.step()``, or the Trainer callback's step end): it writes an
emergency checkpoint of that exact step, synchronously, and raises ``TrainingStopped``,
which is also ``SystemExit(3)``: a plain loop needs no extra code to exit with 3, and
``safepoint train`` prints the line and exits 3. A second signal during the emergency
save aborts it; the store removes its staging folder, so the previous checkpoint stays
the newest. A second signal outside a save stops at once, without saving.

An exception in the training loop gets an emergency checkpoint only when the state is
exactly that of the last completed step: no optimizer step (and no forward pass that
updates running statistics) began since that step's boundary. The random generators
are rewound to that boundary before saving, so a resume is bit-identical.

Handlers are process-wide: the first ``SignalGuard`` of a signal installs one dispatcher
and keeps the handler that was there; the last one to leave puts it back.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch

from safepoint.errors import ConfigError, SafepointError
from safepoint.units import parse_duration

if TYPE_CHECKING:
    from safepoint.checkpointer import Checkpointer
    from safepoint.store import CheckpointInfo

log = logging.getLogger("safepoint")

DEFAULT_SIGNALS = "TERM,INT,USR1"
STOP_EXIT_CODE = 3
_SAFETY = 1.25  # an emergency save must fit the grace period with this margin


class TrainingStopped(SafepointError, SystemExit):
    """The run was stopped by a signal; rerun the same command to resume (exit code 3).

    Also a ``SystemExit(3)``, so that an uncaught stop ends a plain script with code 3.
    Its message is logged (a warning on the ``safepoint`` logger) where it is raised, so
    whoever catches it need not print it again: a planned stop is not an error.
    """

    exit_code = STOP_EXIT_CODE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = STOP_EXIT_CODE


class NonFiniteLossError(SafepointError, FloatingPointError):
    """The loss became NaN or infinite (``stop_on_nan``); nothing of that step is saved."""


class _SaveInterrupted(BaseException):
    """A second signal arrived during the emergency save. A BaseException so that no
    ``except Exception`` on the way swallows it; the store's cleanup still runs."""


def parse_signals(spec: str | Iterable[str | int] | None) -> tuple[signal.Signals, ...]:
    """Signals in ``"TERM,INT,USR1"`` / ``["SIGTERM", 10]``; ``None``, ``""`` or
    ``"none"`` for none. Raises ``ConfigError`` naming an unknown or uncatchable one."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    found: list[signal.Signals] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            try:
                sig = signal.Signals(item)
            except ValueError:
                raise ConfigError(f"--signals: {item} is not a signal number") from None
        else:
            name = str(item).strip().upper()
            if name in ("", "NONE"):
                continue
            try:
                sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
            except KeyError:
                raise ConfigError(
                    f"--signals: unknown signal {item!r}; use names like TERM,INT,USR1 or none"
                ) from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"--signals: {sig.name} cannot be caught; use TERM, INT or USR1")
        found.append(sig)
    return tuple(dict.fromkeys(found))


# ----------------------------------------------------------------------- handlers

_registry_lock = threading.Lock()
_previous: dict[signal.Signals, Any] = {}  # the handler each signal had before us
_guards: list[SignalGuard] = []


def _dispatch(signum: int, _frame: object) -> None:
    for guard in list(_guards):
        if signum in guard.signals:
            guard.received(signal.Signals(signum))


def installed_signals() -> set[signal.Signals]:
    """The signals safepoint's dispatcher currently handles in this process (for tests)."""
    return set(_previous)


class SignalGuard:
    """Turns stop signals into a flag while installed. Install from the main thread only."""

    def __init__(self, signals: Iterable[signal.Signals], *, where: str = "") -> None:
        self.signals = frozenset(signals)
        self.where = where
        self.signal: signal.Signals | None = None
        self.received_at: float | None = None
        self.saving = False
        self._interrupted = False
        self._installed = False

    @property
    def installed(self) -> bool:
        return self._installed

    @property
    def interrupted(self) -> bool:
        """True once a second signal stopped the run at once (nothing more to do)."""
        return self._interrupted

    def install(self) -> bool:
        """Install the handlers; False (and nothing done) outside the main thread."""
        if not self.signals or self._installed:
            return self._installed
        if threading.current_thread() is not threading.main_thread():
            log.info("not in the main thread: stop signals are not handled by safepoint")
            return False
        with _registry_lock:
            for sig in self.signals:
                if sig not in _previous:
                    _previous[sig] = signal.getsignal(sig)
                    signal.signal(sig, _dispatch)
            _guards.append(self)
        self._installed = True
        return True

    def uninstall(self) -> None:
        """Put back the previous handlers of the signals no other guard still needs."""
        if not self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "closing outside the main thread: the stop signal handlers stay installed "
                "until another Checkpointer closes in the main thread"
            )
            return
        with _registry_lock:
            _guards.remove(self)
            still = {s for g in _guards for s in g.signals}
            for sig in sorted(self.signals - still):
                previous = _previous.pop(sig)
                signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._installed = False

    def received(self, sig: signal.Signals) -> None:
        """The handler: flag the first signal; a second one aborts (see module doc)."""
        if self.signal is None:
            self.signal = sig
            self.received_at = time.monotonic()
            log.warning(
                "received %s: saving an emergency checkpoint when this step ends "
                "(send it again to stop at once without saving)",
                sig.name,
            )
            return
        if self._interrupted:
            return  # already unwinding: let the cleanup finish
        self._interrupted = True
        if self.saving:
            raise _SaveInterrupted(sig)
        message = (
            f"stopped at once by a second signal ({sig.name}) without an emergency "
            f"checkpoint; rerun the same command to resume from the newest checkpoint in "
            f"{self.where}"
        )
        log.warning("%s", message)
        raise TrainingStopped(message)


# ------------------------------------------------------------------ RNG at a boundary


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


# -------------------------------------------------------------------- the engine part


class EmergencyStop:
    """The Checkpointer's preemption and crash logic (one per Checkpointer)."""

    def __init__(
        self,
        where: str,
        *,
        signals: str | Iterable[str | int] | None = DEFAULT_SIGNALS,
        grace: str | float | None = None,
        stop_on_nan: bool = False,
    ) -> None:
        self.guard = SignalGuard(parse_signals(signals), where=where)
        self.grace = None if grace is None else parse_duration(grace, what="grace")
        self.stop_on_nan = stop_on_nan
        self.save_seconds: float | None = None  # the last measured save, for the grace check
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

    def measured(self, seconds: float) -> None:
        self.save_seconds = seconds

    # ------------------------------------------------------------ step boundaries

    def check_loss(self, ckpt: Checkpointer, step: int, metrics: Mapping[str, Any]) -> None:
        """With ``stop_on_nan``: raise ``NonFiniteLossError`` if the loss is not finite."""
        loss = metrics.get("loss")
        if not self.stop_on_nan or not isinstance(loss, (int, float)) or math.isfinite(loss):
            return
        latest = ckpt.latest()
        ckpt.record.event("error", where="loss", step=step, error=f"loss is {loss}")
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

    def stop(
        self, ckpt: Checkpointer, step: int, save: Callable[[], CheckpointInfo] | None
    ) -> NoReturn:
        """Act on the pending stop signal at the boundary after ``step``; always raises
        ``TrainingStopped``. ``save`` writes the emergency checkpoint; None when
        ``checkpoint-<step>`` was just committed."""
        name = self.requested or "a signal"
        self.handled = True
        ckpt.record.event("signal", signal=name, step=step)
        latest = ckpt.latest()
        resume = f"rerun the same command to resume from {latest.name if latest else 'the start'}"
        if save is None and latest is not None and latest.step == step:
            self._stopped(
                ckpt,
                f"stopped by {name} at step {step}, which {latest.path} holds; "
                "rerun the same command to resume",
            )
        left = None
        if self.grace is not None and self.guard.received_at is not None:
            left = self.grace - (time.monotonic() - self.guard.received_at)
        if (
            left is not None
            and self.save_seconds is not None
            and (self.save_seconds * _SAFETY > left)
        ):
            ckpt.record.event("emergency_save", step=step, result="skipped", left_s=left)
            self._stopped(
                ckpt,
                f"stopped by {name} at step {step} without an emergency checkpoint: a save "
                f"takes about {self.save_seconds:.1f} s and only {max(left, 0):.1f} s of the "
                f"{self.grace:g} s grace period are left; {resume}",
            )
        return self._save_and_stop(ckpt, step, name, save, resume)

    def _save_and_stop(
        self,
        ckpt: Checkpointer,
        step: int,
        name: str,
        save: Callable[[], CheckpointInfo] | None,
        resume: str,
    ) -> NoReturn:
        self.guard.saving = True
        try:
            abandon = getattr(ckpt, "abandon", None)
            if self.grace is not None and callable(abandon):
                abandon()  # under a deadline the emergency save (a newer step) goes first
            _flush(ckpt)  # else a background save in flight finishes (or fails) first
            info = save() if save is not None else ckpt.latest()
        except _SaveInterrupted:
            committed = ckpt.latest()
            ckpt.record.event("emergency_save", step=step, result="aborted")
            if committed is not None and committed.step == step:
                resume = f"it had already committed {committed.path}; rerun to resume from it"
            self._stopped(
                ckpt,
                f"stopped by {name}; a second signal aborted the emergency save of "
                f"step {step} cleanly; {resume}",
            )
        except SafepointError as e:
            ckpt.record.event("emergency_save", step=step, result="failed", error=str(e))
            self._stopped(ckpt, f"stopped by {name}; the emergency save failed ({e}); {resume}")
        finally:
            self.guard.saving = False
        ckpt.record.event("emergency_save", step=step, result="committed")
        where = info.path if info is not None else ckpt.directory
        self._stopped(
            ckpt,
            f"stopped by {name} at step {step}: saved the emergency checkpoint {where}; "
            "rerun the same command to resume",
        )

    def _stopped(self, ckpt: Checkpointer, message: str) -> NoReturn:
        log.warning("%s", message)
        raise TrainingStopped(message)

    def pending_at_close(self, ckpt: Checkpointer) -> TrainingStopped | None:
        """A stop signal that arrived after the last step: the error to raise at close."""
        if self.requested is None:
            return None
        name = self.requested
        self.handled = True
        latest = ckpt.latest()
        message = (
            f"stopped by {name} after the last step; the newest checkpoint is "
            f"{latest.path if latest else 'none'}; rerun the same command to finish"
        )
        ckpt.record.event("signal", signal=name, step=ckpt._last_step)
        log.warning("%s", message)
        return TrainingStopped(message)

    # -------------------------------------------------------------- exceptions

    def on_exception(
        self,
        ckpt: Checkpointer,
        exc: BaseException,
        save: Callable[[int, Mapping[str, Any]], CheckpointInfo] | None = None,
    ) -> CheckpointInfo | None:
        """After ``exc`` escaped the training loop: save the last completed step if the
        state still is that step's, add a hint to ``exc``; return the checkpoint or None."""
        if not isinstance(exc, Exception) or isinstance(exc, SafepointError):
            return None
        step, why_not = self._boundary, None
        if step is None or self._state is None:
            why_not = "no step had completed in this process"
        elif ckpt.schedule.last_save_step == step:
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
                _flush(ckpt)
                if self._rng is not None:
                    _restore_rng(self._rng)
                reason = f"exception: {type(exc).__name__}"
                info = (
                    save(step, self._state)
                    if save is not None
                    else ckpt.save(step, self._state, reason=reason)
                )
            except Exception as e:
                why_not = f"the emergency save failed ({e})"
            except _SaveInterrupted:
                why_not = "a signal aborted the emergency save"
            finally:
                self.guard.saving = False
        ckpt.record.event(
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


def _flush(ckpt: Checkpointer) -> None:
    flush = getattr(ckpt, "flush", None)  # async saves: wait for the one in flight
    if callable(flush):
        flush()


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
