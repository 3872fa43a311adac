"""``safepoint ls`` and ``safepoint verify``: read-only views of an output directory."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from safepoint.cli import policy_cmds
from safepoint.errors import CheckpointNotFoundError
from safepoint.records import save_timings
from safepoint.remote import upload_states
from safepoint.store import CheckpointInfo, scan, verify
from safepoint.units import format_duration, format_size

_STYLE = {
    "valid": "green",
    "corrupt": "bold red",
    "incomplete": "yellow",
    "foreign": "cyan",
    "staging": "magenta",
}


def info_json(info: CheckpointInfo) -> dict[str, object]:
    """The JSON form of one checkpoint in ``ls --json`` and ``verify --json``."""
    m = info.manifest
    return {
        "name": info.name,
        "path": str(info.path),
        "step": info.step,
        "status": info.status,
        "problems": list(info.problems),
        "size": info.size,
        "created": m.created if m else None,
        "reason": m.reason if m else None,
        "metrics": info.metrics,
        "info": m.info if m else {},
        "extra_files": list(info.extra_files),
    }


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _directory(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointNotFoundError(f"{p}: no such directory; give the run's --output-dir")
    return p


def _timing(info: CheckpointInfo, timings: dict[int, dict[str, Any]]) -> dict[str, float | None]:
    """Training stall and write time of a save: from the run record, else the manifest."""
    event = timings.get(info.step, {}) if info.valid else {}
    saved = info.manifest.info if info.manifest else {}
    return {
        k: v if isinstance(v := event.get(k, saved.get(k)), (int, float)) else None
        for k in ("stall_s", "write_s")
    }


@click.command("ls")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@policy_cmds.policy_options
def ls_cmd(directory: str, as_json: bool, **policy: Any) -> None:
    """List the checkpoints of DIRECTORY: step, time, size, metrics, state, why kept.

    The retention policy is the one the run recorded, or the one given by the options.
    """
    infos = scan(_directory(directory))
    why, nxt, policy_note = policy_cmds.ls_retention(infos, policy)
    timings = save_timings(directory)
    uploads = upload_states(directory)  # empty unless the run has a remote mirror
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        **info_json(i),
                        **_timing(i, timings),
                        "kept_because": why.get(i.name),
                        "next_deletes": i.name in nxt,
                        "remote": uploads.get(i.name, "local only") if uploads else None,
                    }
                    for i in infos
                ],
                indent=1,
            )
        )
        return
    if not infos:
        click.echo(f"{directory}: no checkpoints yet")
        return
    metric_names = sorted({k for i in infos for k in i.metrics})
    table = Table(title=str(directory), title_justify="left")
    cols = ("checkpoint", "step", "saved", "size", "stall", "write", *metric_names)
    for col in (*cols, "state", "kept", "note"):
        table.add_column(col, justify="right" if col in cols[1:] else "left")
    for i in infos:
        table.add_row(
            i.name,
            str(i.step),
            _when(i.created),
            format_size(i.size),
            *("-" if v is None else format_duration(v) for v in _timing(i, timings).values()),
            *(f"{i.metrics[k]:.4g}" if k in i.metrics else "-" for k in metric_names),
            f"[{_STYLE[i.status]}]{i.status}[/]"
            + (f", {uploads.get(i.name, 'local only')}" if uploads and i.valid else ""),
            why.get(i.name, ""),
            "; ".join(i.problems) or (i.manifest.reason if i.manifest else ""),
        )
    # Piped or redirected output has no terminal width: do not squeeze the table to 80.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if policy_note:
        click.echo(policy_note)


@click.command("verify")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def verify_cmd(path: str, as_json: bool) -> None:
    """Re-check sizes and checksums of a checkpoint or of every checkpoint in a directory.

    Exits 0 when all are valid, 1 when a problem was found (one line per problem).
    """
    if not Path(path).exists() and not Path(path).is_symlink():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint or directory")
    infos = verify(path)
    bad = [i for i in infos if i.status in ("corrupt", "incomplete")]
    if as_json:
        click.echo(json.dumps([info_json(i) for i in infos], indent=1))
    else:
        for i in infos:
            if i.status in ("corrupt", "incomplete"):
                for problem in i.problems:
                    click.echo(f"{i.path}: {problem}")
            elif i.status == "foreign":
                click.echo(f"{i.path}: not a safepoint checkpoint ({'; '.join(i.problems)})")
            else:
                note = (
                    f" (ignored unlisted files: {', '.join(i.extra_files)})"
                    if i.extra_files
                    else ""
                )
                click.echo(
                    f"{i.path}: ok, {len(i.manifest.files) if i.manifest else 0} files, "
                    f"{format_size(i.size)}{note}"
                )
        if not infos:
            click.echo(f"{path}: no checkpoints to verify")
    if bad:
        raise click.exceptions.Exit(1)


COMMANDS = [ls_cmd, verify_cmd]
