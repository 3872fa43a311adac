"""Where a Trainer resumed on another number of processes puts the data order: how many
samples of the epoch's order it trains twice or never, and the setting that avoids it.

Pure arithmetic on the numbers the Trainer itself uses (transformers 5.x
``Trainer._init_training_state`` and ``_run_epoch``, accelerate's ``BatchSamplerShard``
with ``even_batches=True`` and ``skip_first_batches``), so the callback can say it
before training starts:

- each process's dataloader holds ``L = ceil(B / W)`` batches of ``per_device_train_batch_size``
  (``B`` batches in the whole epoch, ``W`` processes; ``floor`` with ``dataloader_drop_last``);
  process ``p`` takes batches ``p, p + W, p + 2W, ...`` of one shared order, so the order
  of samples is the same for any ``W``;
- an epoch is ``U = ceil(L / gradient_accumulation_steps)`` optimizer steps;
- on resume at ``global_step`` it starts epoch ``global_step // U`` and skips
  ``(global_step % U) * gradient_accumulation_steps`` batches *of each process's new
  dataloader* (none with ``ignore_data_skip``).

Both ``U`` and the skip are counted in the new run's batches, so with another
``W * per_device_train_batch_size * gradient_accumulation_steps`` (the samples of one
optimizer step) the Trainer resumes elsewhere than where the run was: it skips samples
that were never trained, or trains some again. With that product unchanged it resumes
at the same sample (up to the rounding of the epoch's last step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Layout:
    """How a run splits the data: processes, per-process batch, accumulation steps."""

    world_size: int
    batch_size: int
    gradient_accumulation_steps: int = 1

    @property
    def step_samples(self) -> int:
        """Samples one optimizer step trains over all processes."""
        return self.world_size * self.batch_size * self.gradient_accumulation_steps

    def steps_per_epoch(self, dataset_size: int, *, drop_last: bool) -> int:
        """The Trainer's ``num_update_steps_per_epoch`` for this layout."""
        batches = (
            dataset_size // self.batch_size if drop_last else _ceil(dataset_size, self.batch_size)
        )
        per_process = batches // self.world_size if drop_last else _ceil(batches, self.world_size)
        return max(_ceil(per_process, self.gradient_accumulation_steps), 1)

    def position(self, global_step: int, dataset_size: int, *, drop_last: bool) -> tuple[int, int]:
        """(epoch, samples of that epoch's order before the next one to train) that a
        Trainer with this layout derives from ``global_step``."""
        per_epoch = self.steps_per_epoch(dataset_size, drop_last=drop_last)
        epoch, steps = divmod(global_step, per_epoch)
        return epoch, min(steps * self.step_samples, dataset_size)


@dataclass(frozen=True)
class TrainerDataResume:
    """Where a resumed Trainer starts in the data order against where the run was."""

    global_step: int
    dataset_size: int
    saved: Layout
    now: Layout
    epoch: int
    """The epoch the saved run was in."""
    trained: int
    """Samples of ``epoch``'s order the saved run had trained."""
    resumed_epoch: int
    resumed_at: int
    """Samples of ``resumed_epoch``'s order the resumed Trainer skips."""
    suggestion: int | None = None
    """A ``gradient_accumulation_steps`` with which this run would resume exactly."""
    ignore_data_skip: bool = False

    @property
    def offset(self) -> int:
        """Resumed minus true position, in samples of the order (epochs of
        ``dataset_size``): > 0 never trained, < 0 trained again, 0 exact."""
        return (self.resumed_epoch - self.epoch) * self.dataset_size + (
            self.resumed_at - self.trained
        )

    @property
    def exact(self) -> bool:
        return self.offset == 0

    def message(self) -> str | None:
        """One paragraph for the log, or None when the Trainer resumes exactly."""
        if self.exact:
            return None
        were = (
            f"the run was {self.trained} samples into epoch {self.epoch} "
            f"({self.saved.world_size} process(es) x {self.saved.batch_size} x "
            f"{self.saved.gradient_accumulation_steps} accumulation)"
        )
        goes = (
            f"this Trainer ({self.now.world_size} x {self.now.batch_size} x "
            f"{self.now.gradient_accumulation_steps}) resumes {self.resumed_at} samples into "
            f"epoch {self.resumed_epoch}"
        )
        what = (
            f"{self.offset} samples of the order are never trained"
            if self.offset > 0
            else f"{-self.offset} samples are trained a second time"
        )
        if self.ignore_data_skip:
            fix = "ignore_data_skip=True starts the epoch's order again; leave it False"
        elif self.suggestion is not None:
            fix = f"resume with gradient_accumulation_steps={self.suggestion} to continue exactly"
        else:
            fix = (
                "keep processes x per_device_train_batch_size x gradient_accumulation_steps "
                f"at {self.saved.step_samples} to continue exactly"
            )
        return f"at step {self.global_step} {were}; {goes}: {what}; {fix}"


def trainer_data_resume(
    global_step: int,
    dataset_size: int,
    *,
    saved: Layout,
    now: Layout,
    drop_last: bool = False,
    ignore_data_skip: bool = False,
) -> TrainerDataResume:
    """Compare the data position of a Trainer checkpoint at ``global_step`` (written by
    ``saved``) with where a Trainer of layout ``now`` resumes from it."""
    epoch, trained = saved.position(global_step, dataset_size, drop_last=drop_last)
    resumed_epoch, at = now.position(global_step, dataset_size, drop_last=drop_last)
    if ignore_data_skip:
        at = 0
    suggestion = None
    if not ignore_data_skip and (resumed_epoch, at) != (epoch, trained):
        per_step = now.world_size * now.batch_size
        if saved.step_samples % per_step == 0:
            ga = saved.step_samples // per_step
            fixed = Layout(now.world_size, now.batch_size, ga)
            if fixed.position(global_step, dataset_size, drop_last=drop_last) == (epoch, trained):
                suggestion = ga
    return TrainerDataResume(
        global_step,
        dataset_size,
        saved,
        now,
        epoch,
        trained,
        resumed_epoch,
        at,
        suggestion,
        ignore_data_skip,
    )


def layout_of(trainer: Any) -> dict[str, int]:
    """The data layout of ``trainer``'s run, stored with each checkpoint's progress."""
    import torch.distributed as dist

    args = trainer.args
    data = trainer.train_dataset
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "batch_size": int(args.per_device_train_batch_size),
        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
        "dataset_size": len(data) if hasattr(data, "__len__") else 0,
    }


def progress_of(trainer: Any, state: Any) -> dict[str, Any]:
    """The progress a callback checkpoint stores: the step, and the data layout that
    ``resume_warning`` compares with the run that resumes from it."""
    return {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "max_steps": state.max_steps,
        "data": layout_of(trainer),
    }


def resume_warning(saved: Any, trainer: Any, global_step: int) -> str | None:
    """The warning for a Trainer that resumes elsewhere in the data order than where the
    run that saved ``saved`` (its ``layout_of``) was; None when exact or unknown."""
    now = layout_of(trainer)
    keys = ("world_size", "batch_size", "gradient_accumulation_steps")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), int) for k in keys):
        return None  # a checkpoint of an older safepoint: nothing to compare
    if saved.get("dataset_size") != now["dataset_size"] or now["dataset_size"] < 1:
        return None  # another data set: the position means nothing anyway
    result = trainer_data_resume(
        global_step,
        now["dataset_size"],
        saved=Layout(*(int(saved[k]) for k in keys)),
        now=Layout(*(now[k] for k in keys)),
        drop_last=bool(trainer.args.dataloader_drop_last),
        ignore_data_skip=bool(trainer.args.ignore_data_skip),
    )
    return result.message()
