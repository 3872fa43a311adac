"""``SafepointCallback``: safepoint saving and resuming for ``transformers.Trainer`` / TRL.

One line in a user's script::

    trainer = SFTTrainer(..., callbacks=[SafepointCallback(save_every="50", keep_last=3)])
    trainer.train()          # a rerun continues from the newest valid checkpoint

How it works, and which Trainer internals it relies on (each pinned by
``tests/test_hf_callback.py``):

- Saving: at step boundaries, after the step's logging and evaluation, the callback
  builds a ``Snapshot`` (adapter or model in Hugging Face layout, optimizer, scheduler,
  RNG, trainer progress) and commits it through the ``Checkpointer``. The Trainer's own
  checkpoint saving is switched off (``control.should_save`` is cleared every step).
- Resuming: the callback finds its Trainer when the Trainer calls ``on_init_end`` from
  its ``__init__`` and wraps that Trainer's ``train`` so that ``resume_from_checkpoint``
  (None, True or a path) becomes the newest valid safepoint checkpoint. The Trainer then
  resumes with its own code: it loads the adapter/model and ``trainer_state.json`` and
  skips the batches already consumed, exactly as for its own checkpoints. It finds no
  ``optimizer.pt``/``rng_state.pth`` (safepoint never writes pickles), so the callback
  loads the optimizer and scheduler in ``on_train_begin`` and the RNG states at the
  point where the Trainer would have loaded its own (first ``on_step_begin``, or
  ``on_epoch_begin`` when the checkpoint ends an epoch).
"""

from __future__ import annotations

import functools
import inspect as _inspect
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from safepoint.checkpointer import Checkpointer
from safepoint.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    SaveFailedError,
)
from safepoint.integrations.hf_layout import (
    TRAINER_STATE_NAME,
    adapter_files,
    is_peft,
    model_files,
    trainer_state_json,
)
from safepoint.integrations.hf_view import make_view, remove_view
from safepoint.retention import RetentionPolicy
from safepoint.rng import restore_rng
from safepoint.schedule import Schedule, parse_save_every
from safepoint.snapshot import Snapshot, capture, read_state_doc
from safepoint.store import CheckpointInfo, inspect, newest_first, scan
from safepoint.units import parse_size

log = logging.getLogger("safepoint")


def _unwrap(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)


def _find_trainer() -> Trainer | None:
    # on_init_end is called from Trainer.__init__: the Trainer is `self` a few frames up.
    frame = _inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


class SafepointCallback(TrainerCallback):
    """Saves a Trainer's run with safepoint and resumes it on ``trainer.train()``.

    Takes the ``Checkpointer`` options (``save_every``, ``keep_last``, ``keep_best``,
    ``metric``, ``mode``, ``keep_every``, ``max_disk``, ``fingerprint``...) plus:
    ``output_dir`` (default: the Trainer's ``args.output_dir``), ``resume`` (False: never
    resume automatically) and ``early_stopping`` (stop after this many evaluations
    without improving ``metric``). ``save_every`` defaults to the Trainer's own
    ``save_steps``/``save_strategy``. ``info`` is JSON stored in every manifest.

    Hooks for other parts of safepoint: ``save_now(reason)`` saves at the current step
    boundary; ``committed(info, seconds)`` is called after each commit (override it).
    """

    def __init__(
        self,
        *,
        output_dir: str | os.PathLike[str] | None = None,
        resume: bool = True,
        early_stopping: int | None = None,
        info: dict[str, Any] | None = None,
        **checkpointer_options: Any,
    ) -> None:
        bad = set(checkpointer_options) - _CHECKPOINTER_OPTIONS
        if bad:
            raise ConfigError(
                f"SafepointCallback got unknown option(s) {', '.join(sorted(bad))}; valid: "
                f"{', '.join(sorted(_CHECKPOINTER_OPTIONS | {'output_dir', 'resume', 'info'}))}"
            )
        if early_stopping is not None and early_stopping < 1:
            raise ConfigError(f"early_stopping={early_stopping}: give a patience of 1 or more")
        # Fail at construction, not an hour into training, on a bad option.
        parse_save_every(checkpointer_options.get("save_every"))
        max_disk = checkpointer_options.get("max_disk")
        RetentionPolicy(
            keep_last=checkpointer_options.get("keep_last"),
            keep_best=checkpointer_options.get("keep_best", 0),
            mode=checkpointer_options.get("mode", "min"),
            keep_every=checkpointer_options.get("keep_every"),
            max_bytes=None if max_disk is None else parse_size(max_disk, what="max_disk"),
        )
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.resume = resume
        self.early_stopping = early_stopping
        self.info = dict(info or {})
        self.options = checkpointer_options
        self.checkpointer: Checkpointer | None = None
        self.trainer: Trainer | None = None
        self.resumed_from: CheckpointInfo | None = None
        self._view: Path | None = None  # the verified view the Trainer resumes from
        self._saved_state: dict[str, Any] = {}  # its checked trainer_state.json
        self.already_finished: CheckpointInfo | None = None
        """Set when a rerun found the run already complete and trained nothing."""
        self.last_commit: CheckpointInfo | None = None
        self.last_commit_seconds: float | None = None
        self._pending: str | None = None
        self._rng: dict[str, Any] | None = None
        self._eval: tuple[int, dict[str, float]] = (-1, {})  # (step measured at, metrics)
        self._stop_at: int | None = None  # a stop signal waits for this step's log
        self._ended: int | None = None  # the step whose on_step_end ran, until the next

    # ------------------------------------------------------------------ wiring

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = _find_trainer()
        if trainer is None:
            raise ConfigError(
                "SafepointCallback could not find its Trainer; pass it to "
                "Trainer(..., callbacks=[SafepointCallback(...)]) rather than add_callback later"
            )
        if args.load_best_model_at_end:
            raise ConfigError(
                "load_best_model_at_end needs the Trainer's own checkpoints, which "
                "SafepointCallback replaces; set it False and use keep_best / "
                "`safepoint export --checkpoint best`"
            )
        self.trainer = trainer
        original = trainer.train

        @functools.wraps(original)
        def train(resume_from_checkpoint: Any = None, *a: Any, **kw: Any) -> Any:
            path = self._begin(trainer.args, resume_from_checkpoint)
            finished = self._finished(trainer.args)
            if finished is not None:
                # The Trainer would run one more step before it checks max_steps.
                self._end()
                return finished
            try:
                return original(path, *a, **kw)
            except Exception as e:  # OOM, data error: save the last step if consistent
                if self.checkpointer is not None:
                    reason = f"exception: {type(e).__name__}"
                    self.checkpointer.on_exception(
                        e, lambda _s, _st: self._save(trainer.state, reason)
                    )
                raise
            finally:
                self._end()
                remove_view(self._view)
                self._view = None

        trainer.train = train  # type: ignore[method-assign]

    def _finished(self, args: Any) -> Any:
        """A ``TrainOutput`` if the checkpoint resumed from already ends this same run."""
        info = self.resumed_from
        if info is None:
            return None
        saved = self._saved_state  # checked by make_view, never read again from the folder
        same_length = (
            args.max_steps == saved.get("max_steps")
            if args.max_steps > 0
            else float(args.num_train_epochs) == float(saved.get("num_train_epochs", -1))
        )
        if not same_length or saved.get("global_step", -1) < saved.get("max_steps", -1):
            return None
        from transformers.trainer_utils import TrainOutput

        self.already_finished = info
        log.warning(
            "resuming from %s (step %d): it already ends this run (step %d of %d); nothing "
            "to train; raise max_steps or epochs to train longer",
            info.path,
            info.step,
            saved["global_step"],
            saved["max_steps"],
        )
        losses = [e["loss"] for e in saved.get("log_history", []) if "loss" in e]
        return TrainOutput(saved["global_step"], losses[-1] if losses else 0.0, {})

    def _directory(self, args: Any) -> Path:
        return self.output_dir if self.output_dir is not None else Path(args.output_dir)

    def _begin(self, args: Any, resume: Any) -> str | None:
        """Open the Checkpointer (lock, sweep) and pick the checkpoint to resume from."""
        options = dict(self.options)
        if options.get("save_every") is None:
            options["save_every"] = _trainer_schedule(args)
        self._save_every = options.pop("save_every")
        if args.save_strategy != "no":
            log.info(
                "safepoint saves this run; the Trainer's own save_strategy=%s is turned off",
                args.save_strategy,
            )
        self.checkpointer = Checkpointer(self._directory(args), **options)
        # The warning for a missing ranking metric, in a Trainer user's terms.
        self.checkpointer.metric_hint = (
            "give the Trainer an eval_dataset and an eval_strategy so that it evaluates, "
            "or set metric= to one it logs (such as 'loss')"
        )
        try:
            self.resumed_from = self._pick(resume)
        except BaseException:
            self._end()
            raise
        # The Trainer resumes from the verified view, never from the checkpoint folder.
        return None if self._view is None else str(self._view)

    def _pick(self, resume: Any) -> CheckpointInfo | None:
        ckpt = self.checkpointer
        assert ckpt is not None
        if resume is False or (resume is None and not self.resume):
            return None
        if (resume is None or resume is True) and ckpt.mirror is not None:
            ckpt.mirror.fetch_if_empty()  # a fresh machine: the newest remote checkpoint
        if (resume is None or resume is True) and ckpt.ranks.active:
            # Several processes: all resume from the checkpoint rank 0 picks.
            resume = ckpt.ranks.agree_on_checkpoint(
                lambda: next((i.step for i in newest_first(ckpt.directory)), None)
            )
            if resume is None:
                return None
        if resume is None or resume is True:
            misfit: IncompatibleCheckpointError | None = None
            for info in newest_first(ckpt.directory, deep=ckpt.verify_on_resume):
                self._check_ours(info)
                try:
                    return self._open_view(info)
                except (CorruptCheckpointError, IncompatibleCheckpointError) as e:
                    # Damaged, tampered with, or not this model's: an older one may do. If
                    # none fits the model, the first misfit is raised: training from
                    # scratch would hide a changed model.
                    log.warning("skipping %s: %s; trying the next older checkpoint", info.path, e)
                    if isinstance(e, IncompatibleCheckpointError):
                        misfit = misfit or e
            if misfit is not None:
                raise misfit
            if resume is True:
                log.warning("no valid checkpoint in %s; starting from scratch", ckpt.directory)
            return None
        path = ckpt.store.path_for(resume) if isinstance(resume, int) else Path(resume)
        if not os.path.lexists(path):
            valid = [i.name for i in scan(ckpt.directory) if i.valid]
            raise CheckpointNotFoundError(
                f"{path}: no such checkpoint; valid checkpoints in {ckpt.directory}: "
                f"{', '.join(valid) or 'none'}"
            )
        info = inspect(path, deep=ckpt.verify_on_resume)
        if info.status == "foreign":  # e.g. the stock Trainer's checkpoint-N
            from safepoint.foreign import describe_foreign

            raise IncompatibleCheckpointError(
                f"{path} was not written by safepoint ({'; '.join(info.problems)}); "
                f"{describe_foreign(path)}"
            )
        if not info.valid:
            raise IncompatibleCheckpointError(
                f"{path} is {info.status}: {'; '.join(info.problems)}; resume from another "
                "checkpoint or run `safepoint verify` for details"
            )
        self._check_ours(info)
        return self._open_view(info)

    def _open_view(self, info: CheckpointInfo) -> CheckpointInfo:
        assert self.checkpointer is not None
        if self.trainer is None:  # not attached: there is no Trainer to resume
            return info
        self._view, self._saved_state = make_view(
            info, self.trainer.model, self.checkpointer.directory
        )
        return info

    def _check_ours(self, info: CheckpointInfo) -> None:
        ckpt = self.checkpointer
        assert ckpt is not None and info.manifest is not None
        theirs = info.manifest.fingerprint
        if ckpt.fingerprint and theirs and theirs != ckpt.fingerprint:
            raise IncompatibleCheckpointError(
                f"{info.path} was written by another configuration (fingerprint {theirs}, "
                f"this run {ckpt.fingerprint}); use the same configuration or another output dir"
            )
        if TRAINER_STATE_NAME not in info.manifest.files:
            raise IncompatibleCheckpointError(
                f"{info.path} was not written by SafepointCallback (no {TRAINER_STATE_NAME}); "
                "resume it with the loop that wrote it, or use another output dir"
            )

    def _end(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None

    # ------------------------------------------------------------ train events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        ckpt = self._require()
        ckpt.total_steps = state.max_steps
        # The run length is known only now: rebuild the schedule with it, same settings.
        ckpt.schedule = Schedule(
            parse_save_every(self._save_every),
            total_steps=state.max_steps,
            mtbf=ckpt.schedule.mtbf,
            max_overhead=ckpt.schedule.max_overhead,
        )
        ckpt.schedule.start(time.monotonic(), state.global_step)
        self._eval = (-1, {})
        self._pending = None
        self._stop_at = None
        # Disk pre-flight before the first step, with every file this callback adds and
        # trainer_state.json as it will be at the end of the run.
        model = kw["model"]
        weights = adapter_files(model, copy_data=False) if is_peft(model) else None
        typical, total = 1 / 3, state.max_steps  # a float of full precision, like the epoch
        ckpt.preflight(
            {"optimizer": kw["optimizer"], "scheduler": kw["lr_scheduler"]},
            extra_files={
                **(weights or model_files(model, copy_data=False)),
                TRAINER_STATE_NAME: b" " * _trainer_state_bytes(self.trainer, args, state),
            },
            progress={"global_step": state.max_steps, "epoch": typical, "max_steps": total},
            info={**self.info, "epoch": typical},
        )
        info = self.resumed_from
        if info is None:
            return
        # The Trainer restored the weights and trainer_state.json; optimizer, scheduler
        # and RNG live in safepoint's pickle-free files.
        ckpt.restore(
            {"optimizer": kw["optimizer"], "scheduler": kw["lr_scheduler"]}, checkpoint=info.path
        )
        if state.global_step != info.step:
            raise IncompatibleCheckpointError(
                f"{info.path}: the Trainer resumed at step {state.global_step}, not {info.step}"
            )
        self._rng = ckpt.ranks.rank_rng(info.path) or read_state_doc(info.path).get("rng")
        if ckpt.ranks.is_writer:
            self.resuming(info)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._flush(state)
        # Resumed at an epoch end: the Trainer would load its RNG file before drawing
        # the next epoch's order.
        if self._rng is not None and float(state.epoch or 0).is_integer():
            self._restore_rng()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._flush(state)
        self._ended = None
        if self._stop_at is not None:  # the log that the stop waited for did not come
            self._boundary(state)
        # Resumed mid-epoch: the Trainer loads its RNG file after fetching the first
        # batch past the skipped ones, right before this event.
        if self._rng is not None:
            self._restore_rng()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        control.should_save = False  # safepoint saves this run, never the Trainer too
        self._ended = state.global_step
        ckpt = self._require()
        ckpt.check()  # a failed background save surfaces at the next step
        self._maybe_save(state, control, epoch_end=False)
        if ckpt.stop_requested:
            # The Trainer logs this step right after this event: force that log so that
            # the step's loss reaches the run record and the emergency checkpoint's
            # trainer_state.json; on_log (or on_evaluate) then saves and stops.
            control.should_log = True
            self._stop_at = state.global_step
            return
        self._boundary(state)

    def _boundary(self, state: Any) -> None:
        # A stop signal: emergency save of this exact step, then TrainingStopped (exit 3).
        self._stop_at = None
        trainer = self.trainer
        assert trainer is not None
        self._require().at_boundary(
            state.global_step,
            # accelerate wraps the optimizer; its hooks live on the torch optimizer inside
            {"optimizer": _unwrap(trainer.optimizer), "model": trainer.model},
            lambda: self._save(state, "emergency"),
        )

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        control.should_save = False
        self._maybe_save(state, control, epoch_end=True)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and self.checkpointer is not None:  # stop_on_nan: a NaN step is never saved
            self.checkpointer.check_loss(state.global_step, logs)
            self.checkpointer.log_metrics(state.global_step, logs)  # the run record
        if self._pending and not control.should_evaluate:
            self._flush(state)
        if self._stop_here(state) and not control.should_evaluate:
            self._boundary(state)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any):
        # Stamped with its step: a later save (emergency, or a save step that is not an
        # eval step) must not carry it, else a checkpoint never evaluated ranks as best.
        self._eval = (
            state.global_step,
            {
                k: float(v)
                for k, v in (metrics or {}).items()
                if isinstance(v, (int, float)) and math.isfinite(float(v))
            },
        )
        if self.early_stopping and self._patience_spent(state):
            control.should_training_stop = True
            self._pending = self._pending or "early stopping"
        self._flush(state)
        if self._stop_here(state):
            self._boundary(state)

    def _stop_here(self, state: Any) -> bool:
        """Whether a stop signal is to be acted on now, at the end of this step's log (no
        evaluation follows) or of its evaluation: where the Trainer saves its own
        checkpoints. Not earlier: evaluating draws from the torch RNG (each DataLoader
        iterator takes a seed from it), so a checkpoint of this step taken before its
        evaluation resumes into different weights (issue #12, part 4)."""
        ckpt = self.checkpointer
        return self._stop_at == state.global_step or (
            self._ended == state.global_step and ckpt is not None and bool(ckpt.stop_requested)
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._flush(state)
        ckpt = self.checkpointer
        if ckpt is not None and state.global_step > (ckpt.schedule.last_save_step or 0):
            self._save(state, "end of training")

    # ------------------------------------------------------------------ saving

    def save_now(self, reason: str = "manual") -> CheckpointInfo | None:
        """Save at the current step boundary unless this step is already saved.

        Call between steps only (from a callback event or a signal handler that defers
        to one). Returns the checkpoint committed, or None if there was nothing new.
        """
        if self.trainer is None or self.checkpointer is None:
            return None
        state = self.trainer.state
        if self.checkpointer.schedule.last_save_step == state.global_step:
            return None
        self._pending = None
        return self._save(state, reason)

    def committed(self, info: CheckpointInfo, seconds: float) -> None:
        """Called after each commit with the checkpoint and the training stall in seconds."""

    def resuming(self, info: CheckpointInfo) -> None:
        """Called once the Trainer has resumed from ``info``: says so.

        Logged at INFO to the ``safepoint`` logger and, when no handler would show that
        (a plain script's default: Python shows only warnings), also printed to stderr;
        otherwise a resume looks like a progress bar that jumped. Override to report
        elsewhere.
        """
        message = f"resuming from {info.path} (step {info.step})"
        log.info("%s", message)
        if not _shows(log, logging.INFO):
            print(f"safepoint: {message}", file=sys.stderr, flush=True)

    def _require(self) -> Checkpointer:
        if self.checkpointer is None:
            raise ConfigError(
                "SafepointCallback is not attached to this training; pass it in "
                "Trainer(..., callbacks=[...]) and start with trainer.train()"
            )
        return self.checkpointer

    def _maybe_save(self, state: Any, control: Any, *, epoch_end: bool) -> None:
        ckpt = self._require()
        step = state.global_step
        reason = ckpt.schedule.due(step, time.monotonic(), epoch_end=epoch_end)
        if reason is None and step >= state.max_steps and ckpt.schedule.last_save_step != step:
            reason = "end of training"
        if reason is None or step == 0:
            return
        self._pending = reason
        # Save after this step's logging and evaluation, so the log history and the eval
        # metrics are in the checkpoint; the Trainer runs those right after this event.
        if not (control.should_log or control.should_evaluate):
            self._flush(state)

    def _flush(self, state: Any) -> None:
        if self._pending is not None:
            reason, self._pending = self._pending, None
            ckpt = self.checkpointer
            if ckpt is not None and ckpt.schedule.last_save_step != state.global_step:
                try:
                    self._save(state, reason)
                except SaveFailedError as e:
                    ckpt.save_failed(state.global_step, e, reason=reason)  # on_save_error

    def _save(self, state: Any, reason: str) -> CheckpointInfo:
        ckpt = self._require()
        trainer = self.trainer
        assert trainer is not None
        t0 = time.perf_counter()
        # No copy here even with async_save: Checkpointer.commit stages the tensors into its
        # reused host buffers (a true copy) before it returns; a copy here would be a second.
        copy_data = False
        model = trainer.model
        snapshot: Snapshot = capture(
            {"optimizer": trainer.optimizer, "scheduler": trainer.lr_scheduler},
            step=state.global_step,
            copy=copy_data,
            progress={
                "global_step": state.global_step,
                "epoch": state.epoch,
                "max_steps": state.max_steps,
            },
        )
        weights = adapter_files(model, copy_data=copy_data) if is_peft(model) else None
        snapshot.files.update(weights or model_files(model, copy_data=copy_data))
        snapshot.files[TRAINER_STATE_NAME] = trainer_state_json(trainer)
        snapshot.info.update(self.info)
        snapshot.info["epoch"] = state.epoch
        metrics = self._metrics(state)
        info = ckpt.commit(snapshot, metrics=metrics, reason=reason, started=t0)
        self.last_commit = info
        self.last_commit_seconds = time.perf_counter() - t0
        self.committed(info, self.last_commit_seconds)
        return info

    def _metrics(self, state: Any) -> dict[str, float]:
        # The losses and the ranking metric measured at this very step, nothing carried
        # from an earlier one; the Trainer's timings would only clutter `ls`.
        wanted = {"loss", "eval_loss", self.options.get("metric", "eval_loss")}
        metrics: dict[str, float] = {}
        for entry in state.log_history:
            if entry.get("step") == state.global_step:
                metrics.update(entry)
        if self._eval[0] == state.global_step:
            metrics.update(self._eval[1])
        return {
            k: float(v)
            for k, v in metrics.items()
            if k in wanted and isinstance(v, (int, float)) and math.isfinite(float(v))
        }

    def _patience_spent(self, state: Any) -> bool:
        metric = self.options.get("metric", "eval_loss")
        sign = 1.0 if self.options.get("mode", "min") == "min" else -1.0
        values = [sign * e[metric] for e in state.log_history if metric in e]
        if len(values) <= (self.early_stopping or 0):
            return False
        best_at = min(range(len(values)), key=lambda i: (values[i], i))
        return len(values) - 1 - best_at >= (self.early_stopping or 0)

    def _restore_rng(self) -> None:
        rng, self._rng = self._rng, None
        if rng:
            restore_rng(rng)


# One log_history entry of each kind as TRL's SFTTrainer writes them (the plain Trainer
# logs fewer keys): trainer_state.json grows by one per log and per evaluation.
_LOG_ENTRY = dict.fromkeys(
    ("entropy", "epoch", "grad_norm", "learning_rate", "loss", "mean_token_accuracy"), 1 / 3
) | {"num_tokens": 123456.0, "step": 12345}
_EVAL_ENTRY = {
    **dict.fromkeys(("epoch", "eval_entropy", "eval_loss", "eval_mean_token_accuracy"), 1 / 3),
    **dict.fromkeys(("eval_runtime", "eval_samples_per_second", "eval_steps_per_second"), 12.345),
    **{"eval_num_tokens": 123456.0, "step": 12345},
}


def _entry_bytes(entry: dict[str, Any]) -> int:
    one, two = ({"log_history": [entry] * n} for n in (1, 2))
    return len(json.dumps(two, indent=2)) - len(json.dumps(one, indent=2))


def _trainer_state_bytes(trainer: Any, args: Any, state: Any) -> int:
    """``trainer_state.json`` at the end of the run: now, plus one entry per log and per
    evaluation still to come. The last checkpoints are the largest; sizing every kept one
    like them is what makes the pre-flight hold to the end of a long run (logging every
    step adds ~300 bytes a step: 3 MB at step 10,000)."""
    done, total = state.global_step, state.max_steps

    def count(strategy: Any, every: Any, final: bool) -> int:
        kind = str(getattr(strategy, "value", strategy))
        if kind == "epoch":
            return max(1, math.ceil(float(args.num_train_epochs)))
        if kind != "steps" or not every:
            return 0
        every = int(every)
        return total // every - done // every + int(final and total % every != 0)

    logs = count(args.logging_strategy, state.logging_steps, False) + int(
        bool(args.logging_first_step) and done == 0
    )
    evals = count(args.eval_strategy, state.eval_steps, True)
    return (
        len(trainer_state_json(trainer))
        + logs * _entry_bytes(_LOG_ENTRY)
        + evals * _entry_bytes(_EVAL_ENTRY)
    )


_CHECKPOINTER_OPTIONS = set(_inspect.signature(Checkpointer.__init__).parameters) - {
    "self",
    "directory",
    "total_steps",
}


def _shows(logger: logging.Logger, level: int) -> bool:
    """Whether a record of ``level`` on ``logger`` reaches a handler that emits it."""
    if not logger.isEnabledFor(level):
        return False
    current: logging.Logger | None = logger
    while current is not None:
        if any(level >= h.level for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False  # only logging.lastResort, which shows warnings and above


def _trainer_schedule(args: Any) -> str | None:
    """The Trainer's own save schedule, in safepoint's terms, for when save_every is unset."""
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if strategy == "steps":
        steps = args.save_steps
        return f"{steps * 100:g}%" if 0 < steps < 1 else str(int(steps))
    if strategy == "epoch":
        return "epoch"
    return None


__all__ = ["SafepointCallback", "adapter_files", "model_files"]
