"""``safepoint train``: the main job. LoRA SFT with TRL, saved and resumed by safepoint."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import click

from safepoint.app.config import JOB_DEFAULTS, TrainConfig, checkpoint_keys, to_yaml
from safepoint.cli.options import flagged
from safepoint.errors import ConfigError
from safepoint.options import Options

# Every config key is a flag, made here from ``TrainConfig``'s fields: name, type and
# help (``TrainConfig.help``: the job's keys, and ``Options.help`` for the engine's).
_BOOL_FLAGS = {"async_save": "--async-save/--sync-save", "full": "--full/--lora"}


def _flags() -> list[Any]:
    import dataclasses

    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    engine = set(checkpoint_keys())
    flags = []
    for name in types:
        kind, dashed = types[name], "--" + name.replace("_", "-")
        field = TrainConfig.__dataclass_fields__[name]
        default = JOB_DEFAULTS.get(name, field.default)
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        text = flagged(Options.help(name, flag=True)) if name in engine else TrainConfig.help(name)
        decl = _BOOL_FLAGS.get(name, f"{dashed}/--no-{dashed[2:]}")
        if default is True:
            default = decl.split("/")[0]
        if not (default is None or default is False or default == {}):
            text = f"{text.removesuffix('.')} (default {default})."
        if kind.startswith("bool"):
            flags.append(click.option(decl, name, default=None, help=text))
        elif kind.startswith("dict"):
            flags.append(click.option(dashed, name, multiple=True, metavar="KEY=VALUE", help=text))
        else:
            if kind.startswith("Literal"):
                ctype: Any = click.Choice(re.findall(r"'([^']+)'", kind))
            else:
                ctype = {"int": int, "float": float}.get(kind.split(" |")[0], str)
            flags.append(click.option(dashed, name, type=ctype, help=text))
    return flags


def _decorate(f: Any) -> Any:
    for flag in reversed(_flags()):
        f = flag(f)
    return f


def _pairs(given: tuple[str, ...]) -> dict[str, Any] | None:
    """``--trainer KEY=VALUE`` flags as a mapping; a VALUE is read as YAML (3, 0.1, true)."""
    import yaml

    if not given:
        return None
    out = {}
    for pair in given:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(
                f"--trainer {pair}: write KEY=VALUE, e.g. --trainer weight_decay=0.01"
            )
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


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
    cfg = _resolve(config_file, {**flags, "trainer": _pairs(flags["trainer"])})
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
            f"done: {outcome.steps} step{'' if outcome.steps == 1 else 's'}{stopped}, "
            f"{outcome.commits} "
            f"checkpoint{'' if outcome.commits == 1 else 's'} committed, "
            f"{outcome.seconds:.0f} s"
        )
    _summary(str(outcome.output_dir), cfg)
    return None


COMMANDS = [train_cmd]
