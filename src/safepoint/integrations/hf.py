"""``SafepointCallback``: safepoint saving and resuming for ``transformers.Trainer`` / TRL.

One line in a user's script::

    trainer = SFTTrainer(..., callbacks=[SafepointCallback(save_every="50", keep_last=3)])
    trainer.train()          # a rerun continues from the newest valid checkpoint

An adapter, not a second engine: it maps Trainer events to ``Checkpointer`` calls and
builds snapshots in the Hugging Face layout. Whether to save (``Checkpointer.decide``:
schedule, end of run, ``on_busy``, agreement of the ranks), from where to resume
(``Checkpointer.resume``) and what a stop or a crash does are the engine's. What stays
here, and which Trainer internals it relies on (each pinned by the tests):

- When: the engine decides at each step end, on every rank; the save itself waits for
  the step's logging and evaluation, so that the checkpoint holds their results (and
  the RNG draws of the evaluation: a checkpoint taken before it resumes differently).
- Saving: adapter or model files, ``trainer_state.json``, optimizer, scheduler, RNG,
  committed through the engine. The Trainer's own saving is switched off.
- Resuming: the callback finds its Trainer when the Trainer calls ``on_init_end`` from
  its ``__init__`` (the only event that has no documented way to reach it; the others
  use their keyword arguments) and wraps its ``train`` so that the Trainer resumes,
  with its own code, from a verified view of the checkpoint. Weights, optimizer and
  scheduler are loaded in ``on_train_begin``, once all fit (else ``hf_reject`` falls
  back); the RNG once, where the Trainer would load its own.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from safepoint.engine import Checkpointer, PendingSave
from safepoint.errors import ConfigError, IncompatibleCheckpointError
from safepoint.integrations import hf_sharded as sharded
from safepoint.integrations.hf_data import progress_of, resume_warning
from safepoint.integrations.hf_layout import (
    TRAINER_STATE_NAME,
    adapter_files,
    model_files,
    trainer_schedule,
    trainer_state_later,
)
from safepoint.integrations.hf_reject import Rejected, Unusable, wrap_train
from safepoint.integrations.hf_trainer import (
    find_trainer,
    finished_run,
    finite,
    load_finished,
    metrics_at,
    patience_spent,
    preflight,
    shows,
)
from safepoint.integrations.hf_view import make_view, remove_view
from safepoint.options import Options
from safepoint.restore import read_state_doc
from safepoint.rng import restore_rng
from safepoint.snapshot import capture
from safepoint.validity import CheckpointInfo

log = logging.getLogger("safepoint")


class SafepointCallback(TrainerCallback):
    """Saves a Trainer's run with safepoint and resumes it on ``trainer.train()``.

    Takes the fields of ``safepoint.Options`` as keyword arguments (``save_every``,
    ``keep_last``, ``keep_best``, ``metric``, ``max_disk``, ``async_save``, ``on_busy``...;
    ``total_steps`` comes from the Trainer), plus: ``output_dir`` (default: the
    Trainer's ``args.output_dir``), ``resume`` (False: never resume automatically),
    ``early_stopping`` (stop after this many evaluations without improving ``metric``)
    and ``info`` (JSON stored in every manifest). ``save_every`` defaults to the
    Trainer's own ``save_steps``/``save_strategy``.

    Hooks: ``save_now(reason)`` saves at the current step boundary; ``committed(save,
    seconds)`` and ``resuming(info)`` are called after each save and at a resume.
    """

    def __init__(
        self,
        *,
        output_dir: str | os.PathLike[str] | None = None,
        resume: bool = True,
        early_stopping: int | None = None,
        info: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if "total_steps" in options:
            raise ConfigError("SafepointCallback takes total_steps from the Trainer; drop it")
        # Fail at construction, not an hour into training, on a bad option.
        self.options = Options.from_kwargs(options, where="SafepointCallback")
        if early_stopping is not None and early_stopping < 1:
            raise ConfigError(f"early_stopping={early_stopping}: give a patience of 1 or more")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.resume = resume
        self.early_stopping = early_stopping
        self.info = dict(info or {})
        self.checkpointer: Checkpointer | None = None
        self.trainer: Trainer | None = None
        self.resumed_from: CheckpointInfo | None = None
        self.already_finished: CheckpointInfo | None = None
        """Set when a rerun found the run already complete and trained nothing."""
        self.last_commit: PendingSave | None = None
        self.last_commit_seconds: float | None = None
        self._view: Path | None = None  # the verified view the Trainer resumes from
        self._fallback: Any = None  # this train() call's rejected checkpoints
        self._weights: str | None = None  # who loads the weights (hf_sharded.weights_source)
        self._saved_state: dict[str, Any] = {}  # its checked trainer_state.json
        self._pending: str | None = None  # a due save waiting for the step's log/eval
        self._rng: dict[str, Any] | None = None
        self._eval: tuple[int, dict[str, float]] = (-1, {})  # (step measured at, metrics)
        self._stop_at: int | None = None  # a stop signal waits for this step's log
        self._ended: int | None = None  # the step whose on_step_end ran, until the next

    # ------------------------------------------------------------------ wiring

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = find_trainer()
        if trainer is None:
            raise ConfigError(
                "SafepointCallback could not find its Trainer; pass it to "
                "Trainer(..., callbacks=[SafepointCallback(...)]) rather than add_callback later"
            )
        if args.load_best_model_at_end:
            raise ConfigError(
                "load_best_model_at_end needs the Trainer's own checkpoints, which "
                "SafepointCallback replaces; set it False and use keep_best (then export "
                "the checkpoint ranked best)"
            )
        self.trainer = trainer
        trainer.train = wrap_train(self, trainer)  # type: ignore[method-assign]

    def begin(self, args: Any, resume: Any) -> str | None:
        """Open the Checkpointer (lock, sweep) and pick the checkpoint to resume from;
        the path the Trainer is to resume from (a verified view of it), or None.
        ``trainer.train`` calls it; ``end()`` closes. ``resume``: the Trainer's
        ``resume_from_checkpoint`` (None or True: the newest valid, False: none)."""
        options = self.options
        if options.save_every is None:
            options = options.replace(save_every=trainer_schedule(args))
        if args.save_strategy != "no":
            log.info(
                "safepoint saves this run; the Trainer's own save_strategy=%s is turned off",
                args.save_strategy,
            )
        directory = self.output_dir if self.output_dir is not None else Path(args.output_dir)
        ckpt = self.checkpointer = Checkpointer(directory, options, length_later=True)
        # The warning for a missing ranking metric, in a Trainer user's terms.
        ckpt.saver.retention.metric_hint = (
            "give the Trainer an eval_dataset and an eval_strategy so that it evaluates, "
            "or set metric= to one it logs (such as 'loss')"
        )
        if resume is False or (resume is None and not self.resume):
            return None
        try:
            resumed = ckpt.resume(self._open_view, None if resume is True else resume)
        except BaseException:
            self.end()
            raise
        if resumed is None and resume is True:
            log.warning("no valid checkpoint in %s; starting from scratch", ckpt.directory)
        self.resumed_from = None if resumed is None else resumed.info
        # The Trainer resumes from the verified view, never from the checkpoint folder.
        return None if self._view is None else str(self._view)

    def _open_view(self, info: CheckpointInfo) -> CheckpointInfo:
        assert info.manifest is not None and self.checkpointer is not None
        if TRAINER_STATE_NAME not in info.manifest.files:
            raise IncompatibleCheckpointError(
                f"{info.path} was not written by SafepointCallback (no {TRAINER_STATE_NAME}); "
                "resume it with the loop that wrote it, or use another output directory"
            )
        if self.trainer is None:  # not attached: there is no Trainer to resume
            return info
        if self._fallback is not None:
            self._fallback.check(info)
        remove_view(self._view)
        # The callback loads the weights itself, once the optimizer and scheduler fit.
        self._weights = sharded.weights_source(info, self.trainer) or sharded.VIEW
        model, weights = self.trainer.model, self._weights != sharded.STATE
        where = self.checkpointer.directory
        self._view, self._saved_state = make_view(info, model, where, weights=weights)
        return info

    def _load_finished(self, view: str | None) -> None:
        assert self.trainer is not None and self.resumed_from is not None and self._view
        sharded.load_weights(self.trainer.model, self.resumed_from, self._weights, self._view)
        load_finished(self.trainer, view, weights=self._weights is None)

    def _finished(self, args: Any) -> Any:
        """A ``TrainOutput`` if the checkpoint resumed from already ends this same run."""
        info = self.resumed_from
        says = self.checkpointer is None or self.checkpointer.ranks.is_writer
        output = None if info is None else finished_run(info, args, self._saved_state, say=says)
        if output is not None:
            self.already_finished = info
        return output

    def end(self) -> None:
        """Close the Checkpointer (finish the save in flight, release the lock)."""
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None

    def _require(self) -> Checkpointer:
        if self.checkpointer is None:
            raise ConfigError(
                "SafepointCallback is not attached to this training; pass it in "
                "Trainer(..., callbacks=[...]) and start with trainer.train()"
            )
        return self.checkpointer

    # ------------------------------------------------------------ train events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ckpt = self._require()
        ckpt.decider.begin(step=state.global_step, total_steps=state.max_steps)  # known only now
        self._eval, self._pending, self._stop_at = (-1, {}), None, None
        trainables, model = (
            {"optimizer": kw["optimizer"], "scheduler": kw["lr_scheduler"]},
            kw["model"],
        )
        preflight(ckpt, self.trainer, trainables, model, state, self.info)
        info = self.resumed_from
        if info is None:
            return
        # The Trainer restored trainer_state.json; the rest is checked against the live
        # objects before any is loaded (else train() falls back). RNG: on_step_begin.
        try:
            if state.global_step != info.step:
                raise IncompatibleCheckpointError(
                    f"{info.path}: the Trainer resumed at step {state.global_step}, not {info.step}"
                )
            if self._weights == sharded.STATE:
                trainables[sharded.WEIGHTS_ENTRY] = sharded.weights_entry(model)
            ckpt.load(info, trainables, rng=False)  # all or nothing
            if self._weights == sharded.VIEW and self._view is not None:  # DDP: unwrapped
                sharded.load_view_weights(self.trainer.model, info, self._view)
            doc = read_state_doc(info.path)
        except Unusable as e:
            raise Rejected(info, e) from None
        self._rng = ckpt.ranks.rank_rng(info.path) or doc.get("rng")
        if ckpt.ranks.is_writer:
            self.resuming(info)
            if note := resume_warning(doc["progress"].get("data"), self.trainer, info.step):
                ckpt.record.warning(f"data order: {note}")

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._flush(state, kw)
        # Resumed at an epoch end: the Trainer would load its RNG file before drawing
        # the next epoch's order.
        if self._rng is not None and float(state.epoch or 0).is_integer():
            self._restore_rng()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._flush(state, kw)
        self._ended = None
        if self._stop_at is not None:  # the log that the stop waited for did not come
            self._boundary(state, kw)
        # Resumed mid-epoch: the Trainer loads its RNG file after fetching the first
        # batch past the skipped ones, right before this event.
        if self._rng is not None:
            self._restore_rng()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        control.should_save = False  # safepoint saves this run, never the Trainer too
        self._ended = state.global_step
        ckpt = self._require()
        self._decide(state, control, kw, epoch_end=False)
        if ckpt.emergency.requested:
            # The Trainer logs this step right after this event: force that log so that
            # the step's loss reaches the run record and the emergency checkpoint's
            # trainer_state.json; on_log (or on_evaluate) then saves and stops.
            control.should_log = True
            self._stop_at = state.global_step
            return
        self._boundary(state, kw)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        control.should_save = False
        self._decide(state, control, kw, epoch_end=True)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and self.checkpointer is not None:  # stop_on_nan: a NaN step is never saved
            self.checkpointer.emergency.check_loss(state.global_step, logs)
            self.checkpointer.record.metrics(state.global_step, logs)  # the run record
        if self._pending and not control.should_evaluate:
            self._flush(state, kw)
        if self._stop_here(state) and not control.should_evaluate:
            self._boundary(state, kw)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any):
        # Stamped with its step: a later save (emergency, or a save step that is not an
        # eval step) must not carry it, else a checkpoint never evaluated ranks as best.
        self._eval = (state.global_step, finite(metrics or {}))
        o, patience = self.options, self.early_stopping
        if patience and patience_spent(state, o.metric, o.mode, patience):
            control.should_training_stop = True
            self._pending = self._pending or "early stopping"
        self._flush(state, kw)
        if self._stop_here(state):
            self._boundary(state, kw)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._flush(state, kw)
        ckpt = self.checkpointer
        if ckpt is not None and state.global_step > (ckpt.decider.last_saved or 0):
            self._save(state, "end of training", kw)  # early stopping, or a shorter run

    # ------------------------------------------------------------------ saving

    def _decide(self, state: Any, control: Any, kw: dict[str, Any], *, epoch_end: bool) -> None:
        # The engine decides, the same on every rank; the save waits for this step's
        # logging and evaluation, which the Trainer runs right after this event.
        reason = self._require().decide(state.global_step, epoch_end=epoch_end)
        if reason is None:
            return
        self._pending = reason
        if not (control.should_log or control.should_evaluate):
            self._flush(state, kw)

    def _stop_here(self, state: Any) -> bool:
        """Whether a stop signal is to be acted on now, at the end of this step's log (no
        evaluation follows) or of its evaluation: where the Trainer saves its own
        checkpoints. Not earlier: evaluating draws from the torch RNG (each DataLoader
        iterator takes a seed from it), so a checkpoint of this step taken before its
        evaluation resumes into different weights (issue #12, part 4)."""
        ckpt = self.checkpointer
        return self._stop_at == state.global_step or (
            self._ended == state.global_step and ckpt is not None and bool(ckpt.emergency.requested)
        )

    def _boundary(self, state: Any, kw: dict[str, Any]) -> None:
        # A stop signal: emergency save of this exact step, then TrainingStopped (exit 3).
        self._stop_at = None
        trainer = self.trainer
        assert trainer is not None
        optimizer = kw.get("optimizer") or trainer.optimizer
        self._require().emergency.at_boundary(
            state.global_step,
            # accelerate wraps the optimizer; its hooks live on the torch optimizer inside
            {"optimizer": getattr(optimizer, "optimizer", optimizer), "model": trainer.model},
            lambda: self._save(state, "emergency", kw).wait(),
        )

    def _flush(self, state: Any, kw: dict[str, Any]) -> None:
        if self._pending is not None:
            reason, self._pending = self._pending, None
            ckpt = self.checkpointer
            if ckpt is not None and ckpt.decider.last_saved != state.global_step:
                self._save(state, reason, kw, scheduled=True)

    def save_now(self, reason: str = "manual") -> PendingSave | None:
        """Save at the current step boundary unless this step is already saved.

        Call between steps only (from a callback event or a signal handler that defers
        to one). Returns the save's handle, or None if there was nothing new.
        """
        if self.trainer is None or self.checkpointer is None:
            return None
        state = self.trainer.state
        if self.checkpointer.decider.last_saved == state.global_step:
            return None
        self._pending = None
        return self._save(state, reason)

    def _save(
        self, state: Any, reason: str, kw: dict[str, Any] | None = None, *, scheduled: bool = False
    ) -> PendingSave:
        ckpt = self._require()
        trainer = self.trainer
        assert trainer is not None
        kw = kw or {}
        t0 = time.perf_counter()
        # No copy here, even with async_save: the engine stages the tensors into its
        # reused host buffers (a true copy) before it returns; a copy here would be a second.
        # A sharded model's weights are a state entry: every rank writes its pieces.
        entries, weights = sharded.model_state(kw.get("model") or trainer.model)
        snapshot = capture(
            {
                "optimizer": kw.get("optimizer") or trainer.optimizer,
                "scheduler": kw.get("lr_scheduler") or trainer.lr_scheduler,
                **entries,
            },
            step=state.global_step,
            copy=False,
            progress=progress_of(trainer, state),
        )
        snapshot.files.update(weights)
        snapshot.deferred[TRAINER_STATE_NAME] = trainer_state_later(trainer)
        snapshot.info.update(self.info)
        snapshot.info["epoch"] = state.epoch
        commit = ckpt.commit_or_continue if scheduled else ckpt.commit
        handle = commit(snapshot, metrics=self._metrics(state), reason=reason, started=t0)
        if handle is not None:
            self.last_commit = handle
            self.last_commit_seconds = time.perf_counter() - t0
            self.committed(handle, self.last_commit_seconds)
        return handle  # type: ignore[return-value]  # None only for scheduled saves

    def _metrics(self, state: Any) -> dict[str, float]:
        # The Trainer's timings would only clutter `ls`.
        return metrics_at(state, self._eval, {"loss", "eval_loss", self.options.metric})

    def _restore_rng(self) -> None:
        rng, self._rng = self._rng, None
        if rng:
            restore_rng(rng)

    # ------------------------------------------------------------------ hooks

    def committed(self, save: PendingSave, seconds: float) -> None:
        """Called after each save started, with its handle (``save.step``, ``save.path``,
        ``save.wait()``) and the training stall in seconds. Override it."""

    def resuming(self, info: CheckpointInfo) -> None:
        """Called once the Trainer has resumed from ``info``: says so.

        Logged at INFO to the ``safepoint`` logger and, when no handler would show that
        (a plain script's default: Python shows only warnings), also printed to stderr;
        otherwise a resume looks like a progress bar that jumped. Override to report
        elsewhere.
        """
        message = f"resuming from {info.path} (step {info.step})"
        log.info("%s", message)
        if not shows(log, logging.INFO):
            print(f"safepoint: {message}", file=sys.stderr, flush=True)


__all__ = ["SafepointCallback", "adapter_files", "model_files"]
