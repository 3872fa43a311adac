"""``safepoint train`` that sends itself SIGTERM while step N trains (a test helper).

usage: python term_train.py N [safepoint train options...]

The signal arrives mid-step, before the step's end, log and evaluation: the emergency
checkpoint must be taken where the Trainer would save that step (after its evaluation).
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

import safepoint.app.job as job
from safepoint.cli import main

AT = int(sys.argv[1])
_build = job.build_trainer


class _TermDuringStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if state.global_step + 1 == AT:
            os.kill(os.getpid(), signal.SIGTERM)


def _build_with_term(p, callback):  # type: ignore[no-untyped-def]
    trainer = _build(p, callback)
    trainer.add_callback(_TermDuringStep())
    return trainer


job.build_trainer = _build_with_term

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[2:]]))
