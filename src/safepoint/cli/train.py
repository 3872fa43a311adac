"""``safepoint train``: the main job. LoRA SFT with TRL, saved and resumed by safepoint."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import click

from safepoint.app.config import TrainConfig, to_yaml
from safepoint.errors import ConfigError
from safepoint.store import scan

# (flag name = config key, click type, help). Every key is also a YAML key.
_OPTIONS: list[tuple[str, Any, str]] = [
    ("model", str, "'tiny' (built in, default), a model folder, or a cached hub name."),
    ("dataset", str, "'builtin' (default) or a .jsonl/.json/.csv/.parquet/.txt file."),
    ("text_field", str, "Column with plain text (default: text, prompt/completion, messages)."),
    ("output_dir", str, "Where checkpoints go (default runs/default); a rerun resumes there."),
    ("epochs", float, "Passes over the data (default 3)."),
    ("max_steps", int, "Stop after this many optimizer steps (overrides --epochs)."),
    ("batch_size", int, "Examples per step (default 8)."),
    ("learning_rate", float, "Peak learning rate (default 1e-2)."),
    ("max_length", int, "Longest example in tokens (default 64)."),
    ("lora_r", int, "LoRA rank (default 8)."),
    ("lora_alpha", int, "LoRA alpha (default 16)."),
    ("lora_dropout", float, "LoRA dropout (default 0.05)."),
    ("lora_target_modules", str, "Comma-separated module names (default: PEFT's choice)."),
    ("seed", int, "Random seed (default 42)."),
    (
        "save_every",
        str,
        "Steps (10), a fraction (10%), a time (15m), 'epoch', 'auto' (from save cost and "
        "--mtbf), or a comma list, whichever comes first (10,15m) (default 10).",
    ),
    ("keep_last", int, "Keep the newest N checkpoints; 0 keeps all (default 3)."),
    ("keep_best", int, "Keep the best K by --metric (default 1)."),
    ("keep_every", int, "Also keep every checkpoint whose step is a multiple of N."),
    ("max_disk", str, "Byte budget for all checkpoints, e.g. 2GB."),
    ("metric", str, "Metric ranking checkpoints (default eval_loss)."),
    ("mode", click.Choice(["min", "max"]), "Whether lower or higher --metric is better."),
    ("eval_split", float, "Fraction of the data held out for evaluation (default 0.1)."),
    ("eval_dataset", str, "A separate evaluation file."),
    ("eval_every", int, "Evaluate every N steps (default: at each save)."),
    ("early_stopping", int, "Stop after N evaluations without improvement."),
    ("resume", str, "auto (default), never (fresh, in a new directory) or a checkpoint path."),
    ("remote", str, "Mirror checkpoints to an fsspec URL (s3://bucket/run); fresh dirs fetch."),
    ("signals", str, "Stop signals: save, exit 3 (default TERM,INT,USR1; 'none')."),
    ("grace", str, "Time a stop signal leaves before the kill, e.g. 120s."),
    ("mtbf", str, "Expected time between failures, for --save-every auto (default 24h)."),
    ("max_overhead", float, "Largest share of the run auto saving may take (default 0.02)."),
    ("on_save_error", click.Choice(["stop", "continue"]), "After a failed save (default stop)."),
]


def _decorate(f: Any) -> Any:
    for name, kind, text in reversed(_OPTIONS):
        f = click.option(f"--{name.replace('_', '-')}", name, type=kind, help=text)(f)
    f = click.option("--full/--lora", "full", default=None, help="Full fine-tune, or LoRA.")(f)
    f = click.option(
        "--async-save/--sync-save",
        "async_save",
        default=None,
        help="Write checkpoints in the background (default: in line).",
    )(f)
    f = click.option(
        "--stop-on-nan/--no-stop-on-nan",
        "stop_on_nan",
        default=None,
        help="Stop (exit 4) when the training loss is NaN or inf (default: no).",
    )(f)
    return f


def _make_callback(cfg: TrainConfig, tty: bool) -> Any:
    from safepoint.app.progress import JobCallback

    return JobCallback(
        cfg,
        tty=tty,
        save_every=cfg.save_every,
        keep_last=cfg.keep_last,
        keep_best=cfg.keep_best,
        keep_every=cfg.keep_every,
        max_disk=cfg.max_disk,
        metric=cfg.metric,
        mode=cfg.mode,
        fingerprint=cfg.fingerprint(),
        early_stopping=cfg.early_stopping,
        resume=cfg.resume != "never",
        signals=cfg.signals,
        grace=cfg.grace,
        stop_on_nan=cfg.stop_on_nan,
        remote=cfg.remote,
        mtbf=cfg.mtbf,
        max_overhead=cfg.max_overhead,
        on_save_error=cfg.on_save_error,
        async_save=cfg.async_save,
        info={"config": cfg.identity()},
    )


def _summary(ctx: click.Context, directory: str, cfg: TrainConfig) -> None:
    from safepoint.cli.inspect_cmds import ls_cmd
    from safepoint.retention import Candidate, RetentionPolicy, best_steps

    click.echo("")
    ctx.invoke(ls_cmd, directory=directory, as_json=False)
    valid = [i for i in scan(directory) if i.valid]
    if not valid:
        return
    policy = RetentionPolicy(keep_best=1, metric=cfg.metric, mode=cfg.mode)  # type: ignore[arg-type]
    best = best_steps([Candidate(i.step, i.size, i.metrics) for i in valid], policy)
    if best:
        info = next(i for i in valid if i.step == best[0])
        click.echo(f"best:   {info.path}  ({cfg.metric} {info.metrics[cfg.metric]:.4f})")
    click.echo(f"latest: {valid[-1].path}")


def _resolve(config_file: str | None, flags: dict[str, Any]) -> TrainConfig:
    """The config, with errors about a value given as a flag speaking of that flag."""
    try:
        return TrainConfig.resolve(config_file, flags)
    except ConfigError as e:
        # The config names keys (`keep_last=-1: ...`), right for a YAML file; a user who
        # typed --keep-last should read --keep-last.
        key = re.match(r"[a-z_]+", str(e))
        if key and flags.get(key[0]) is not None:
            text = "--" + key[0].replace("_", "-") + str(e)[key.end() :]
            raise ConfigError(text) from None
        raise


@click.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file.")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
@_decorate
@click.pass_context
def train_cmd(ctx: click.Context, config_file: str | None, print_config: bool, **flags: Any):
    """LoRA (or --full) SFT with TRL; built-in tiny model and data by default.

    Rerunning the same command resumes from the newest valid checkpoint.
    """
    cfg = _resolve(config_file, flags)
    if print_config:
        click.echo(to_yaml(cfg), nl=False)
        return
    from safepoint.app.job import build_trainer, plan
    from safepoint.signals import TrainingStopped

    p = plan(cfg)
    callback = _make_callback(cfg, sys.stdout.isatty())
    trainer = build_trainer(p, callback)
    try:
        trainer.train(resume_from_checkpoint=p.resume_from)
    except TrainingStopped as e:
        # Its one line was logged where the stop happened; a planned stop is no `Error:`.
        return e.exit_code
    if callback.already_finished is not None:  # the callback said so on stderr
        _summary(ctx, str(p.output_dir), cfg)
        return
    if sys.stdout.isatty():
        click.echo("")
    stopped = " (early stopping)" if trainer.state.global_step < trainer.state.max_steps else ""
    click.echo(
        f"done: {trainer.state.global_step} steps{stopped}, {callback.commits} checkpoints "
        f"committed, {time.monotonic() - callback.started:.0f} s"
    )
    _summary(ctx, str(p.output_dir), cfg)


COMMANDS = [train_cmd]
