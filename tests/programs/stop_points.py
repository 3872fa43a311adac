"""``safepoint train`` that sends itself stop signals at chosen points (a test helper).

usage: python stop_points.py MODE SIGNAL [safepoint train options...]

MODE ``three``: two signals while step 2 begins (the second stops the run at once),
then a third once safepoint has put its handlers away. MODE ``table``: one signal as
the finished run's final table begins (after the ``done:`` line).
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

import safepoint.app.job as job
import safepoint.cli.train as train_cli
import safepoint.signals as signals
from safepoint.cli import main

MODE, SIG = sys.argv[1], signal.Signals[sys.argv[2]]


def _send() -> None:
    print(f"sending {SIG.name}", flush=True)
    os.kill(os.getpid(), SIG)


class _TwiceAtStep2(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if state.global_step + 1 == 2:
            _send()
            _send()  # the second stops the run at once: TrainingStopped from here


_build = job.build_trainer
_uninstall = signals.SignalGuard.uninstall
_summary = train_cli._summary


def _build_with_signals(p, callback):  # type: ignore[no-untyped-def]
    trainer = _build(p, callback)
    trainer.add_callback(_TwiceAtStep2())
    return trainer


_sent_third = False


def _uninstall_then_signal(self):  # type: ignore[no-untyped-def]
    global _sent_third
    _uninstall(self)
    if self.interrupted and not _sent_third:
        _sent_third = True
        _send()  # the third: safepoint's guard is gone now


def _summary_after_signal(directory, cfg):  # type: ignore[no-untyped-def]
    _send()
    _summary(directory, cfg)


if MODE == "three":
    job.build_trainer = _build_with_signals
    signals.SignalGuard.uninstall = _uninstall_then_signal  # type: ignore[method-assign]
elif MODE == "table":
    train_cli._summary = _summary_after_signal

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[3:]]))
