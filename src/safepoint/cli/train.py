"""``safepoint train``: the main job. LoRA SFT with TRL, saved and resumed by safepoint."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import click

from safepoint.app.config import JOB_DEFAULTS, TrainConfig, checkpoint_keys, to_yaml
from safepoint.errors import ConfigError
from safepoint.options import Options

# The job's flags (flag name = config key, click type, help); every key is also a YAML
# key. The checkpointing flags are made from ``Options`` (``_checkpoint_flags``).
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
    ("seed", int, "Random seed, 0 to 4294967295 (default 42)."),
    ("eval_split", float, "Fraction of the data held out for evaluation (default 0.1)."),
    ("eval_dataset", str, "A separate evaluation file."),
    ("eval_every", int, "Evaluate every N steps (default: at each save)."),
    ("early_stopping", int, "Stop after N evaluations without improvement."),
    ("resume", str, "auto (default), never (fresh, in a new directory) or a checkpoint path."),
]


_BOOL_FLAGS = {"async_save": "--async-save/--sync-save"}  # names older than Options


def _checkpoint_flags() -> list[Any]:
    """A flag for every engine option: type from the field, help from ``Options``."""
    import dataclasses

    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    flags = []
    for name in checkpoint_keys():
        kind, dashed = types[name], "--" + name.replace("_", "-")
        default = JOB_DEFAULTS.get(name, TrainConfig.__dataclass_fields__[name].default)
        note = "; 0 keeps all" if name == "keep_last" else ""  # the flag's own "all"
        text = f"{Options.help(name)}{note} (default {'none' if default is None else default})."
        if kind.startswith("bool"):
            decl = _BOOL_FLAGS.get(name, f"{dashed}/--no-{dashed[2:]}")
            flags.append(click.option(decl, name, default=None, help=text))
            continue
        if kind.startswith("Literal"):
            ctype: Any = click.Choice(re.findall(r"'([^']+)'", kind))
        else:
            ctype = {"int": int, "float": float}.get(kind.split(" |")[0], str)
        flags.append(click.option(dashed, name, type=ctype, help=text))
    return flags


def _decorate(f: Any) -> Any:
    for flag in reversed(_checkpoint_flags()):
        f = flag(f)
    for name, kind, text in reversed(_OPTIONS):
        f = click.option(f"--{name.replace('_', '-')}", name, type=kind, help=text)(f)
    f = click.option(
        "--fsdp/--no-fsdp",
        "fsdp",
        default=None,
        help="Under torchrun: shard the model over the processes (FSDP2); each saves its pieces.",
    )(f)
    return click.option("--full/--lora", "full", default=None, help="Full fine-tune, or LoRA.")(f)


def _summary(directory: str, cfg: TrainConfig) -> None:
    """The ``ls`` table of the run, then its best and latest checkpoints."""
    from safepoint.app.listing import list_run
    from safepoint.app.runs import best_checkpoint, by_metric
    from safepoint.cli.ls import print_listing

    click.echo("")
    listing = list_run(directory)
    print_listing(listing)
    valid = [i for i in listing.infos if i.valid]
    if not valid:
        return
    best = best_checkpoint(valid, by_metric(cfg.metric, cfg.mode))
    if best is not None:
        click.echo(f"best:   {best.path}  ({cfg.metric} {best.metrics[cfg.metric]:.4f})")
    click.echo(f"latest: {valid[-1].path}")


def _resolve(config_file: str | None, flags: dict[str, Any]) -> Any:
    """The config, with errors about a value given as a flag speaking of that flag."""
    try:
        return TrainConfig.resolve(config_file, flags)
    except ConfigError as e:
        # The config names keys (`max_steps must be...`), right for a YAML file; a user
        # who typed --max-steps should read --max-steps (``main`` does the same for the
        # `option=value` of the checkpointing options).
        key = re.match(r"[a-z_]+", str(e))
        if key and flags.get(key[0]) is not None and str(e)[key.end() : key.end() + 1] != "=":
            raise ConfigError("--" + key[0].replace("_", "-") + str(e)[key.end() :]) from None
        raise


@click.command("train")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file.")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
@_decorate
def train_cmd(config_file: str | None, print_config: bool, **flags: Any):
    """LoRA (or --full) SFT with TRL; built-in tiny model and data by default.

    Rerunning the same command resumes from the newest valid checkpoint. A resume
    continues the saved learning rate and schedule: another --learning-rate is refused;
    another --max-steps or --epochs applies, and the schedule is recomputed for it.
    Exit codes: 0 done, 2 bad input, 3 stopped by a signal (at any point), 4 failure.
    """
    cfg = _resolve(config_file, flags)
    if print_config:
        click.echo(to_yaml(cfg), nl=False)
        return
    from safepoint.options import parse_signals
    from safepoint.signals import STOP_EXIT_CODE, TrainingStopped, hold_until_exit, stop_arrived

    # Until the process exits, a stop signal means exit code 3 (a scheduler requeues on
    # it): before training, after it (the table below), or again after a stop.
    hold_until_exit(parse_signals(cfg.signals), where=str(cfg.output_dir))
    try:
        code = _run(cfg)
    except TrainingStopped:  # its line was logged where it was raised
        return STOP_EXIT_CODE
    return STOP_EXIT_CODE if stop_arrived() else code


def _run(cfg: TrainConfig) -> int | None:
    """Train, then report: the line ``done: ...`` and the run's table."""
    from safepoint.app.training import train

    tty = sys.stdout.isatty()
    outcome = train(cfg, tty=tty)
    if outcome.exit_code is not None:  # a planned stop is no `Error:`
        return outcome.exit_code
    if os.environ.get("RANK", "0") != "0":  # several processes: rank 0 reports
        return None
    if not outcome.already_finished:  # else the callback said so on stderr
        if tty:
            click.echo("")
        stopped = " (early stopping)" if outcome.steps < outcome.max_steps else ""
        click.echo(
            f"done: {outcome.steps} steps{stopped}, {outcome.commits} checkpoints "
            f"committed, {outcome.seconds:.0f} s"
        )
    _summary(str(outcome.output_dir), cfg)
    return None


COMMANDS = [train_cmd]
