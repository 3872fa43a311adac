"""Stop signals: a handler that only sets a flag, and the exceptions of a stop.

The training loop acts on the flag at its next step boundary (``engine/emergency.py``):
it writes an emergency checkpoint of that exact step, synchronously, and raises
``TrainingStopped``, which is also ``SystemExit(3)``: a plain loop needs no extra code to
exit with 3, and ``safepoint train`` prints the line and exits 3. A second signal during
the emergency save aborts it (``SaveInterrupted``); the store removes its staging
folder, so the previous checkpoint stays the newest. A second signal outside a save
stops at once, without saving.

Handlers are process-wide: the first ``SignalGuard`` of a signal installs one dispatcher
and keeps the handler that was there; the last one to leave puts it back.

A program whose exit code a scheduler reads (``safepoint train``: SLURM requeues on 3)
calls ``hold_until_exit`` first: its handler is the one the guards put back, so a stop
signal before training, after it, or a third one after a stop still ends in exit code 3
(``stop_arrived``) instead of the default action's 143.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from safepoint.errors import SafepointError
from safepoint.options import parse_signals

log = logging.getLogger("safepoint")

STOP_EXIT_CODE = 3


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


class SaveInterrupted(BaseException):
    """A second signal arrived during the emergency save. A BaseException so that no
    ``except Exception`` on the way swallows it; the store's cleanup still runs."""


# ----------------------------------------------------------------------- handlers

_registry_lock = threading.Lock()
_previous: dict[signal.Signals, Any] = {}  # the handler each signal had before us
_guards: list[SignalGuard] = []


_arrived: signal.Signals | None = None  # the first stop signal this process received
_said_again = False
_held_where = ""


def stop_arrived() -> signal.Signals | None:
    """The first stop signal a ``SignalGuard`` or ``hold_until_exit`` saw, or None."""
    return _arrived


def hold_until_exit(signals: Iterable[signal.Signals], *, where: str) -> None:
    """Handle ``signals`` for the rest of the process, from the main thread: the first
    one outside a ``SignalGuard`` (before or after training) raises ``TrainingStopped``
    (exit code 3) where the program is; any later one says once that the stop is under
    way. Guards installed later put this handler back when they leave."""
    global _held_where
    _held_where = where
    for sig in signals:
        signal.signal(sig, _held)


def forget_stop() -> None:
    """Forget the stop signal ``hold_until_exit`` saw: for a process that runs
    ``safepoint train`` in-process more than once (a test suite); a real run exits."""
    global _arrived, _said_again
    _arrived, _said_again = None, False


def start_line() -> None:
    """End the line a progress bar holds (a tqdm bar, or the ``^C`` a terminal echoes
    after it), so that a stop's message starts on a line of its own instead of being
    glued to the bar. ``safepoint train``'s live line ends itself (a filter it puts on
    the logger), so only a bar or a bare terminal get the newline."""
    try:
        if _bar_live() or (sys.stderr.isatty() and not log.filters):
            sys.stderr.write("\n")
            sys.stderr.flush()
    except (AttributeError, OSError, RuntimeError, ValueError):  # closed, or re-entered
        pass


def _bar_live() -> bool:
    std = sys.modules.get("tqdm.std")  # no bar unless tqdm was imported
    bars = getattr(getattr(std, "tqdm", None), "_instances", None) or ()
    return any(not getattr(bar, "disable", True) for bar in list(bars))


def _held(signum: int, _frame: object) -> None:
    global _arrived, _said_again
    sig = signal.Signals(signum)
    if _arrived is not None:
        if not _said_again:
            _said_again = True
            log.warning("received %s again: the stop is already under way", sig.name)
        return
    _arrived = sig
    message = (
        f"stopped by {sig.name} outside a training step; the checkpoints in {_held_where} "
        "are as they were; rerun the same command to resume"
    )
    start_line()
    log.warning("%s", message)
    raise TrainingStopped(message)


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
        global _arrived
        _arrived = _arrived or sig
        if self.signal is None:
            self.signal = sig
            self.received_at = time.monotonic()
            start_line()
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
            raise SaveInterrupted(sig)
        message = (
            f"stopped at once by a second signal ({sig.name}) without an emergency "
            f"checkpoint; rerun the same command to resume from the newest checkpoint in "
            f"{self.where}"
        )
        start_line()
        log.warning("%s", message)
        raise TrainingStopped(message)


__all__ = [
    "NonFiniteLossError",
    "SaveInterrupted",
    "SignalGuard",
    "TrainingStopped",
    "forget_stop",
    "hold_until_exit",
    "installed_signals",
    "parse_signals",
    "stop_arrived",
]
