"""The Trainer of ``safepoint train``: its ``SFTConfig`` (from the config's keys and its
``trainer:`` block), the model, the LoRA shape and the ``SFTTrainer``.

``check`` runs in ``job.plan``, before anything is written: the ``trainer`` block's keys
against TRL's fields, the scheduler's name, the precision against the device, and the
packages ``report_to`` needs. ``build_trainer`` then assembles what ``check`` passed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from pathlib import Path
from typing import Any

from safepoint.app.config import TrainConfig
from safepoint.errors import ConfigError

REPORTERS = ("none", "tensorboard", "wandb")
"""What ``report_to`` takes: the Trainer's own loggers that write locally or offline."""


def _use(key: str) -> str:
    return f"use {key} (--{key.replace('_', '-')}) instead"


TRAINER_RESERVED: dict[str, str] = {
    "output_dir": _use("output_dir"),
    "num_train_epochs": _use("epochs"),
    "max_steps": _use("max_steps"),
    "per_device_train_batch_size": _use("batch_size"),
    "per_device_eval_batch_size": _use("eval_batch_size"),
    "gradient_accumulation_steps": _use("gradient_accumulation_steps"),
    "learning_rate": _use("learning_rate"),
    "lr_scheduler_type": _use("lr_scheduler_type"),
    "warmup_steps": _use("warmup_steps"),
    "warmup_ratio": _use("warmup_ratio"),
    "bf16": _use("precision"),
    "fp16": _use("precision"),
    "report_to": _use("report_to"),
    "max_length": _use("max_length"),
    "dataset_text_field": _use("text_field"),
    "seed": _use("seed"),
    "data_seed": _use("seed"),
    "eval_strategy": _use("eval_every"),
    "eval_steps": _use("eval_every"),
    "save_strategy": _use("save_every"),
    "save_steps": _use("save_every"),
    "save_total_limit": _use("keep_last"),
    "save_only_model": "safepoint saves the weights and the training state together",
    "load_best_model_at_end": "keep the best with keep_best (--keep-best), then "
    "`safepoint export --checkpoint best`",
    "metric_for_best_model": _use("metric"),
    "greater_is_better": _use("mode"),
    "resume_from_checkpoint": _use("resume"),
    "logging_steps": "safepoint logs every step (its progress and run record need it)",
    "logging_strategy": "safepoint logs every step (its progress and run record need it)",
    "disable_tqdm": "safepoint prints its own progress",
    "use_cpu": "safepoint trains on the GPU when there is one, else on the CPU",
}
"""``SFTConfig`` fields the ``trainer`` block cannot set, and what to set instead:
safepoint sets them from its own keys, or its saving and resuming depend on them."""
# report_to name -> (modules of which one must be importable, what to install)
_REPORTER_NEEDS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'safepoint[tensorboard]'"),
    "wandb": (("wandb",), "pip install wandb (and WANDB_MODE=offline to log locally)"),
}


TB_ENV = "TENSORBOARD_LOGGING_DIR"
"""Where TensorBoard's event files go when set; else ``<output_dir>/tensorboard``."""


def reporters(cfg: TrainConfig) -> list[str]:
    """The Trainer loggers of ``report_to``, without ``none``."""
    names = [n for n in cfg.report_to.replace(" ", "").split(",") if n and n != "none"]
    return list(dict.fromkeys(names))


def check(cfg: TrainConfig) -> None:
    """``ConfigError`` (one line) for what only TRL, torch or the installed packages can
    tell: an unknown ``trainer`` key or scheduler, a precision the device lacks, a
    logger whose package is missing. Imports TRL only for a ``trainer`` block."""
    for name in cfg.report_to.replace(" ", "").split(","):
        if name not in REPORTERS:
            raise ConfigError(
                f"report_to {name!r} is not one of {', '.join(REPORTERS)} "
                "(a comma list, e.g. tensorboard,wandb)"
            )
    for key in cfg.trainer:
        if key in TRAINER_RESERVED:
            raise ConfigError(f"trainer: {key} is set by safepoint; {TRAINER_RESERVED[key]}")
    for name in reporters(cfg):
        modules, install = _REPORTER_NEEDS[name]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(f"report_to {name} needs the {modules[0]} package: {install}")
    _check_precision(cfg.precision)
    from transformers.trainer_utils import SchedulerType

    kinds = [k.value for k in SchedulerType]
    if cfg.lr_scheduler_type not in kinds:
        raise ConfigError(
            f"lr_scheduler_type {cfg.lr_scheduler_type!r} is not a schedule; "
            f"use one of {', '.join(kinds)}"
        )
    if cfg.trainer:
        from trl import SFTConfig

        fields = [f.name for f in dataclasses.fields(SFTConfig)]
        for key in cfg.trainer:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
                hint = f"did you mean {' or '.join(map(repr, close))}?" if close else ""
                raise ConfigError(
                    f"trainer: {key!r} is not a field of SFTConfig (TRL's TrainingArguments); "
                    + (hint or "see the TRL documentation for the fields")
                )


def _check_precision(precision: str) -> None:
    if precision == "fp32":
        return
    import torch

    if not torch.cuda.is_available():
        if precision == "fp16":
            raise ConfigError(
                "precision fp16 needs a CUDA GPU and none is visible; use bf16 "
                "(CPUs support it) or fp32"
            )
        return  # bf16 on the CPU: torch's CPU autocast
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise ConfigError(f"precision bf16: {name} has no bf16 support; use fp16 or fp32")


def sft_args(p: Any) -> dict[str, Any]:
    """The ``SFTConfig`` keyword arguments of a plan: safepoint's keys, then the
    ``trainer`` block (whose keys ``TrainConfig.validate`` keeps off safepoint's own)."""
    import torch

    cfg = p.config
    eval_every = cfg.eval_every or (int(cfg.save_every) if cfg.save_every.isdigit() else 10)
    args: dict[str, Any] = {
        "output_dir": str(p.output_dir),
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps or -1,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.eval_batch_size or cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        # transformers 5 reads a warmup_steps below 1 as a share of the run
        "warmup_steps": cfg.warmup_ratio if cfg.warmup_ratio is not None else cfg.warmup_steps,
        "bf16": cfg.precision == "bf16",
        "fp16": cfg.precision == "fp16",
        "report_to": reporters(cfg) or "none",
        "max_length": cfg.max_length,
        "dataset_text_field": cfg.text_field or "text",
        "seed": cfg.seed,
        "logging_steps": 1,
        "eval_strategy": "steps" if p.eval is not None else "no",
        "eval_steps": eval_every,
        "save_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": not torch.cuda.is_available(),  # TRL defaults to bf16, which needs a GPU
        "dataloader_num_workers": 0,
    }
    return {**args, **cfg.trainer}


def build_trainer(p: Any, callback: Any) -> Any:
    """The TRL ``SFTTrainer`` for a plan, with ``callback`` (a ``SafepointCallback``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    cfg = p.config
    try:
        tokenizer = AutoTokenizer.from_pretrained(p.model_path)
        model = AutoModelForCausalLM.from_pretrained(p.model_path, **_sharding(cfg))
    except (OSError, ValueError, KeyError) as e:  # missing or unreadable model files
        raise ConfigError(
            f"--model {cfg.model}: cannot load it ({root_reason(e)}); give a folder "
            "saved by save_pretrained (config, weights and tokenizer), or 'tiny'"
        ) from None
    peft_config = None
    if not cfg.full:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
    try:
        args = SFTConfig(**sft_args(p))
    except (TypeError, ValueError) as e:  # a value of the trainer block TRL refuses
        raise ConfigError(f"trainer: {root_reason(e)}; fix that value") from None
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=p.train,
        eval_dataset=p.eval,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)
    for cb in trainer.callback_handler.callbacks:  # beside the checkpoints, not in runs/<date>
        if type(cb).__name__ == "TensorBoardCallback" and not os.environ.get(TB_ENV):
            cb.logging_dir = str(Path(p.output_dir) / "tensorboard")
    if cfg.trainer:  # recorded in every manifest: what the Trainer was really given
        callback.info["trainer"] = {k: _jsonable(getattr(args, k)) for k in cfg.trainer}
    if p.new_length:
        trainer.add_callback(_schedule_for_new_length())  # after safepoint's restore
    return trainer


def root_reason(e: BaseException) -> str:
    """The first line of the innermost cause: datasets' own message is generic."""
    while (inner := e.__cause__ or e.__context__) is not None:
        e = inner
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return getattr(value, "value", str(value))  # enums (optim, schedulers) by their name


def _schedule_for_new_length() -> Any:
    """A callback that, once safepoint has restored the optimizer and scheduler, sets the
    learning rate of the resumed step from the schedule for the run's new length: the
    restored optimizer holds the rate the old schedule gave (0.0 at a finished run's
    end), and the Trainer's first step would use it before the scheduler steps."""
    from transformers import TrainerCallback

    class ScheduleForNewLength(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sched = kw.get("lr_scheduler")
            lambdas = getattr(sched, "lr_lambdas", None)
            if sched is None or lambdas is None or state.global_step == 0:
                return
            step = sched.last_epoch
            lrs = [base * f(step) for base, f in zip(sched.base_lrs, lambdas, strict=True)]
            for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            sched._last_lr = lrs

    return ScheduleForNewLength()


def _sharding(cfg: TrainConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments that shard the model over the processes of a
    torchrun launch (``--fsdp``): FSDP2 by transformers, one shard per process. The
    callback then saves it sharded; one process loads it whole."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not cfg.fsdp or world < 2:
        return {}
    from transformers.distributed.configuration_utils import DistributedConfig

    return {"distributed_config": DistributedConfig(fsdp_size=world)}
