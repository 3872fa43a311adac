"""A checkpoint the Trainer path rejects once the Trainer has built its optimizer.

Some checks need the live optimizer and scheduler, which the Trainer creates inside
``train()``: ``SafepointCallback`` runs them in ``on_train_begin``, before anything is
loaded (weights included: the callback loads them only once the optimizer and scheduler
states fit). A rejection there is a ``Rejected``; the ``train`` wrapper catches it and
calls the Trainer's ``train`` again from the next older valid checkpoint (the rejected
one is skipped by the same ``Resumer.pick`` as damage found earlier, and the run record
says why), or stops with its one-line error when the checkpoint was named explicitly. Before the
second call it puts back what the first one changed: the RNG states (the Trainer may
draw before ``on_train_begin``) and the optimizer the Trainer created (it keeps it
between calls; a fresh one is built again, as in an uninterrupted run).
"""

from __future__ import annotations

import functools
from typing import Any

from safepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.integrations import hf_sharded as sharded
from safepoint.integrations.hf_view import remove_view
from safepoint.rng import capture_rng, restore_rng
from safepoint.validity import CheckpointInfo

Unusable = (CorruptCheckpointError, IncompatibleCheckpointError)
Unfit = CorruptCheckpointError | IncompatibleCheckpointError


class Rejected(Exception):
    """``info`` cannot be resumed from: ``error`` says why. Never leaves the wrapper."""

    def __init__(self, info: CheckpointInfo, error: Unfit) -> None:
        super().__init__(str(error))
        self.info, self.error = info, error


class Fallback:
    """What a second ``Trainer.train()`` call needs put back, and what was rejected."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.rng = capture_rng()
        self.optimizer = trainer.optimizer  # None unless the user passed one
        self.rejected: dict[str, Unfit] = {}

    def check(self, info: CheckpointInfo) -> None:
        """Raise the rejection of ``info`` again (``Resumer.pick`` then skips it)."""
        error = self.rejected.get(str(info.path))
        if error is not None:
            raise type(error)(str(error))

    def reject(self, rejected: Rejected, *, explicit: bool) -> None:
        """Record ``rejected`` and undo the first call's changes; raise for an explicitly
        named checkpoint (one line: there is no other to fall back to)."""
        error = rejected.error
        if explicit:  # the error a plain Checkpointer gives for it, as every entry point
            raise error from None
        self.rejected[str(rejected.info.path)] = error
        restore_rng(self.rng)
        self.trainer.optimizer = self.optimizer


def wrap_train(cb: Any, trainer: Any) -> Any:
    """``trainer.train`` for the ``SafepointCallback`` ``cb``: open, pick, train; after a
    rejection, train again from the next older checkpoint; close."""
    original = trainer.train

    def run(path: str | None, *a: Any, **kw: Any) -> Any:
        # A finished run (the Trainer would run one more step) as it ended.
        if (finished := cb._finished(trainer.args)) is not None:
            cb._load_finished(path)
            return finished
        with sharded.weights_loaded_here(trainer, path if cb._weights else None):
            return original(path, *a, **kw)

    def pick_again() -> str | None:
        """After a rejection: the view of the next older valid checkpoint, or None."""
        remove_view(cb._view)
        cb._view = None
        resumed = cb._require().resume(cb._open_view, None)
        cb.resumed_from = None if resumed is None else resumed.info
        return None if cb._view is None else str(cb._view)

    @functools.wraps(original)
    def train(resume_from_checkpoint: Any = None, *a: Any, **kw: Any) -> Any:
        fallback = cb._fallback = Fallback(trainer)
        path = cb.begin(trainer.args, resume_from_checkpoint)
        rejected = False
        try:
            while True:
                try:
                    return run(path, *a, **kw)
                except Rejected as r:  # not a failure of the run: no emergency save
                    rejected = True
                    explicit = resume_from_checkpoint not in (None, True, False)
                    fallback.reject(r, explicit=explicit)
                    path = pick_again()
                    rejected = False
        except Exception as e:  # OOM, data error: save the last step if consistent
            if cb.checkpointer is not None and not rejected:
                cb.checkpointer.on_exception(
                    e, lambda _s, _st, reason: cb._save(trainer.state, reason).wait()
                )
            raise
        finally:
            cb.end()
            remove_view(cb._view)
            cb._view = None

    return train
