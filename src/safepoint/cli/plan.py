"""``safepoint plan``: recommend save_every and check the retention against the disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from safepoint.app.planning import make_plan
from safepoint.cli.options import policy_options
from safepoint.units import format_duration, format_size


@click.command("plan")
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--step-time", help="Time per training step, e.g. 0.8s.")
@click.option("--save-time", help="Time training is blocked per save, e.g. 12s.")
@click.option("--mtbf", help="Mean time between failures (default 24h), e.g. 6h.")
@click.option("--steps", type=click.IntRange(min=1), help="Total training steps.")
@click.option("--checkpoint-size", help="Size of one checkpoint, e.g. 2GB.")
@click.option("--free-disk", help="Free space for checkpoints (default: DIR's free space).")
@click.option("--max-overhead", type=float, help="Largest share of the run for saves (0.02).")
@click.option("--save-every", help="Current schedule to compare with (default: the run's).")
@policy_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def plan_cmd(directory: str | None, as_json: bool, **opts: Any) -> None:
    """Recommend save_every and check the retention against the disk.

    Give the numbers (--step-time --save-time --mtbf --steps ...) or a run's DIRECTORY,
    whose recorded measurements fill in what is not given.
    """
    _check_values(opts)
    result = make_plan(Path(directory) if directory else None, opts)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        _print_plan(result)


def _check_values(opts: dict[str, Any]) -> None:
    """A value that was given is read first: a typo in it is the error to report, not
    a number still missing (``--step-time abc`` said "pass --save-time")."""
    from safepoint.units import parse_duration, parse_size

    for key, parse in (
        ("step_time", parse_duration),
        ("save_time", parse_duration),
        ("mtbf", parse_duration),
        ("checkpoint_size", parse_size),
        ("free_disk", parse_size),
    ):
        if opts[key] is not None:
            parse(opts[key], what="--" + key.replace("_", "-"))


def _print_plan(r: dict[str, Any]) -> None:
    i = r["inputs"]
    known = [
        f"step {format_duration(i['step_time_s'])}" if i["step_time_s"] else None,
        f"save {format_duration(i['save_time_s'])}",
        f"MTBF {format_duration(i['mtbf_s'])}",
        f"{i['total_steps']} steps" if i["total_steps"] else None,
        f"checkpoint {format_size(i['checkpoint_bytes'])}" if i["checkpoint_bytes"] else None,
        f"{format_size(i['free_bytes'])} free" if i["free_bytes"] is not None else None,
    ]
    click.echo("inputs: " + ", ".join(k for k in known if k))
    from rich.console import Console  # only where a table is drawn: ~50 ms to import
    from rich.table import Table

    table = Table(title_justify="left")
    table.add_column("")
    cols = [("recommended", r["recommended"])]
    if r["current"]:
        cols.insert(0, ("current", r["current"]))
    for name, _ in cols:
        table.add_column(name, justify="right")

    def row(label: str, fmt: Any, key: str) -> None:
        table.add_row(label, *(fmt(c[key]) if c[key] is not None else "-" for _, c in cols))

    row("save_every", str, "save_every")
    row("interval", format_duration, "interval_s")
    row("checkpoint overhead", lambda x: f"{x:.2%}", "overhead")
    row("work lost per failure", format_duration, "lost_per_failure_s")
    row("saves in the run", str, "saves")
    row("checkpoints kept", str, "kept")
    row("disk needed", format_size, "disk_bytes")
    Console().print(table)
    click.echo(f"recommended by the {r['rule']}; retention: {_policy_text(r['policy'])}")
    if c := r["clamped_from"]:
        click.echo(
            f"clamped: the {r['rule']} is every {c['steps']} steps "
            f"({format_duration(c['interval_s'])}), longer than the {i['total_steps']}-step "
            "run; save_every is the run's length (one save, at the end)"
        )
    if r["fits"] is False:
        click.echo(
            f"warning: the retention needs {format_size(r['recommended']['disk_bytes'])} but "
            f"{format_size(i['free_bytes'])} is free; lower --keep-last or set --max-disk"
        )


def _policy_text(p: dict[str, Any]) -> str:
    parts = [f"keep_last={p['keep_last']}" if p["keep_last"] else "keep all"]
    if p["keep_best"]:
        parts.append(f"keep_best={p['keep_best']} by {p['metric']} ({p['mode']})")
    if p["keep_every"]:
        parts.append(f"keep_every={p['keep_every']}")
    if p["max_bytes"]:
        parts.append(f"max_disk={format_size(p['max_bytes'])}")
    return ", ".join(parts)


COMMANDS = [plan_cmd]
