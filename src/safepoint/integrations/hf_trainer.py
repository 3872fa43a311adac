"""What ``SafepointCallback`` reads from a Trainer: the Trainer itself, the metrics of a
step, early-stopping patience, whether a checkpoint already ends the run; and the disk
pre-flight of its first step."""

from __future__ import annotations

import inspect as _inspect
import logging
import math
import os
from typing import Any

from transformers import Trainer

from safepoint.integrations.hf_data import layout_of
from safepoint.integrations.hf_layout import TRAINER_STATE_NAME, trainer_state_bytes
from safepoint.integrations.hf_sharded import model_state
from safepoint.validity import CheckpointInfo

log = logging.getLogger("safepoint")


def find_trainer() -> Trainer | None:
    """The Trainer whose ``__init__`` is running (``on_init_end`` is called from it: the
    Trainer is ``self`` a few frames up). The one event with no documented way to reach
    the Trainer, which the callback needs to wrap ``train`` for resuming."""
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


def finite(metrics: Any) -> dict[str, float]:
    """The finite numbers of ``metrics``, as floats."""
    return {
        k: float(v)
        for k, v in dict(metrics).items()
        if isinstance(v, (int, float)) and math.isfinite(float(v))
    }


def metrics_at(
    state: Any, evaluated: tuple[int, dict[str, float]], wanted: set[str]
) -> dict[str, float]:
    """The ``wanted`` metrics measured at this very step (logs, and ``evaluated`` if it
    was measured at it), nothing carried from an earlier step: a checkpoint never
    evaluated must not rank as best."""
    metrics: dict[str, float] = {}
    for entry in state.log_history:
        if entry.get("step") == state.global_step:
            metrics.update(entry)
    if evaluated[0] == state.global_step:
        metrics.update(evaluated[1])
    return {k: v for k, v in finite(metrics).items() if k in wanted}


def patience_spent(state: Any, metric: str, mode: str, patience: int) -> bool:
    """True after ``patience`` evaluations without a better ``metric``."""
    sign = 1.0 if mode == "min" else -1.0
    values = [sign * e[metric] for e in state.log_history if metric in e]
    if len(values) <= patience:
        return False
    best_at = min(range(len(values)), key=lambda i: (values[i], i))
    return len(values) - 1 - best_at >= patience


def finished_run(
    info: CheckpointInfo, args: Any, saved: dict[str, Any], *, say: bool = True
) -> Any:
    """The ``TrainOutput`` to return, with a warning, when the checkpoint ``info`` (its
    checked ``trainer_state.json``: ``saved``) already ends the run ``args`` describe;
    else None. The Trainer itself would run one more step before checking max_steps."""
    same_length = (
        args.max_steps == saved.get("max_steps")
        if args.max_steps > 0
        else float(args.num_train_epochs) == float(saved.get("num_train_epochs", -1))
    )
    if not same_length or saved.get("global_step", -1) < saved.get("max_steps", -1):
        return None
    from transformers.trainer_utils import TrainOutput

    if say:  # one process says it (rank 0), not each
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


def load_finished(trainer: Any, view: str | None, *, weights: bool = True) -> None:
    """After a resume from a checkpoint that already ends the run: the Trainer's model
    and state as the run left them, from the verified ``view``. A script that saves,
    evaluates or pushes the model after ``train()`` must get the trained one, not the
    weights it started from (a kill between the last checkpoint and the script's own save
    made the rerun save the untrained adapter). ``weights=False``: the caller loaded the
    weights (``hf_sharded``)."""
    if view is None:
        return
    from transformers import TrainerState

    if weights:
        trainer._load_from_checkpoint(view)
    trainer.state = TrainerState.load_from_json(os.path.join(view, "trainer_state.json"))


def preflight(
    ckpt: Any,
    trainer: Any,
    trainables: dict[str, Any],
    model: Any,
    state: Any,
    info: dict[str, Any],
) -> None:
    """The disk pre-flight before the first step (``Checkpointer.preflight``), with every
    file the callback adds (a sharded model: every rank's pieces) and trainer_state.json
    as it will be at the end of the run."""
    entries, weights = model_state(model)
    typical = 1 / 3  # a float of full precision, like the epoch
    ckpt.preflight(
        {**trainables, **entries},
        extra_files={
            **weights,
            TRAINER_STATE_NAME: b" " * trainer_state_bytes(trainer, trainer.args, state),
        },
        progress={
            "global_step": state.max_steps,
            "epoch": typical,
            "max_steps": state.max_steps,
            "data": layout_of(trainer),
        },
        info={**info, "epoch": typical},
    )


def shows(logger: logging.Logger, level: int) -> bool:
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
