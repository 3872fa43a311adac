"""``safepoint train``, run: the job planned, trained with its progress callback, and
the outcome the command reports. transformers and TRL are imported only once the
inputs are checked (``job.plan``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safepoint.app.config import TrainConfig
from safepoint.options import Options

if TYPE_CHECKING:
    from safepoint.app.progress import JobCallback


# Config keys that are SafepointCallback options of the same name and meaning.


def job_callback(cfg: TrainConfig, *, tty: bool) -> JobCallback:
    """The callback that saves, resumes and reports the job ``cfg`` describes."""
    from safepoint.app.progress import JobCallback  # imports transformers: after the checks

    options = cfg.options()  # every engine option of the config, the fingerprint too
    return JobCallback(
        cfg,
        tty=tty,
        **{k: getattr(options, k) for k in Options.names() if k != "total_steps"},
        early_stopping=cfg.early_stopping,
        resume=cfg.resume != "never",
        info={"config": cfg.identity(), "schedule": cfg.schedule()},
    )


@dataclass(frozen=True)
class Outcome:
    """How a ``train`` run ended."""

    output_dir: Path
    exit_code: int | None = None
    """Set when a stop (signal, NaN loss, failed save) ended the run early; its one
    line was logged where it happened."""
    already_finished: bool = False
    """A rerun found the run complete and trained nothing (the callback said so)."""
    steps: int = 0
    max_steps: int = 0
    commits: int = 0
    seconds: float = 0.0


def train(cfg: TrainConfig, *, tty: bool) -> Outcome:
    """Plan the job (every input checked before the output directory is touched), then
    train it, resuming from the newest valid checkpoint."""
    from safepoint.app.job import build_trainer, plan
    from safepoint.signals import TrainingStopped

    p = plan(cfg)
    callback = job_callback(cfg, tty=tty)
    trainer = build_trainer(p, callback)
    try:
        trainer.train(resume_from_checkpoint=p.resume_from)
    except TrainingStopped as e:
        return Outcome(p.output_dir, exit_code=e.exit_code)
    return Outcome(
        p.output_dir,
        already_finished=callback.already_finished is not None,
        steps=trainer.state.global_step,
        max_steps=trainer.state.max_steps,
        commits=callback.commits,
        seconds=time.monotonic() - callback.started,
    )
