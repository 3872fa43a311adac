"""``safepoint ls`` and ``safepoint verify``: read-only views of an output directory."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from safepoint.cli import policy_cmds
from safepoint.errors import CheckpointNotFoundError
from safepoint.records import save_timings
from safepoint.remote import upload_states
from safepoint.store import CheckpointInfo, scan, verify
from safepoint.units import format_duration, format_size

if TYPE_CHECKING:
    # rich is imported where a table is drawn: `ls --json` and `verify` skip its ~50 ms
    from rich.console import Console
    from rich.table import Table

_STYLE = {
    "valid": "green",
    "complete": "green",
    "corrupt": "bold red",
    "incomplete": "yellow",
    "foreign": "cyan",
    "staging": "magenta",
}


def shown_status(info: CheckpointInfo, *, verified: bool) -> str:
    """The state a command may claim: ``valid`` only after re-hashing every file.

    ``ls`` checks the manifest and the file sizes, not the checksums, so a checkpoint
    that passes says ``complete``; ``verify`` (and resume) prove ``valid``.
    """
    return "complete" if info.status == "valid" and not verified else info.status


def info_json(info: CheckpointInfo, *, verified: bool) -> dict[str, object]:
    """The JSON form of one checkpoint in ``ls --json`` and ``verify --json``."""
    m = info.manifest
    return {
        "name": info.name,
        "path": str(info.path),
        "step": info.step,
        "status": shown_status(info, verified=verified),
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
@click.option("--wide", is_flag=True, help="Every column, even wider than the terminal.")
@policy_cmds.policy_options
def ls_cmd(directory: str, as_json: bool, wide: bool, **policy: Any) -> None:
    """List the checkpoints of DIRECTORY: step, time, size, metrics, state, why kept.

    State: complete (manifest and file sizes check out; `safepoint verify` re-hashes
    the files), incomplete, corrupt, foreign (another tool's checkpoint-N), staging.
    In a narrow terminal the least useful columns give way; --wide shows them all.
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
                        **info_json(i, verified=False),
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
    columns = _ls_columns(infos, timings, why, uploads, ranked=policy.get("metric"))
    width = None if wide else _terminal_width()
    shown, console = _fit(columns, width)
    click.echo(str(directory))
    console.print(_table(shown))
    # Problems must not vanish with the note column: then they follow the table.
    if not any(c.header == "note" and not c.metric for c in shown):
        for i in infos:
            if i.problems:
                click.echo(f"{i.name}: {'; '.join(i.problems)}")
    if policy_note:
        click.echo(policy_note)


# ------------------------------------------------------------------ the ls table


@dataclass(eq=False)
class _Column:
    header: str
    cells: list[str]  # rich markup
    right: bool = False
    give_way: int = 0
    """Order in which the column gives way to a narrow terminal (1 first; 0 never)."""
    metric: bool = False


def _ls_columns(
    infos: list[CheckpointInfo],
    timings: dict[int, dict[str, Any]],
    why: dict[str, str],
    uploads: dict[str, str],
    *,
    ranked: str | None = None,
) -> list[_Column]:
    """Every column of the ``ls`` table, in display order. The metric checkpoints are
    ranked by (``ranked``, else the one the run recorded) comes first and stays longest."""
    ranked = ranked or _recorded_metric(infos)
    metric_names = sorted({k for i in infos for k in i.metrics}, key=lambda k: (k != ranked, k))
    times = [_timing(i, timings) for i in infos]

    def dur(key: str) -> list[str]:
        return ["-" if t[key] is None else format_duration(t[key]) for t in times]

    def state(i: CheckpointInfo) -> str:
        text = shown_status(i, verified=False)
        remote = f", {uploads.get(i.name, 'local only')}" if uploads and i.valid else ""
        return f"[{_STYLE[text]}]{text}[/]{remote}"

    # Give-way order, least useful first: the write and stall times (the report has
    # them), the note (problems then print below the table), the save time, the
    # metrics (the first one last), why kept, the size, the state.
    metrics = [
        _Column(k, [f"{i.metrics[k]:.4g}" if k in i.metrics else "-" for i in infos], True, 6, True)
        for k in metric_names
    ]
    if metrics:
        metrics[0].give_way = 7
    return [
        _Column("checkpoint", [i.name for i in infos]),
        _Column("step", [str(i.step) for i in infos], right=True),
        _Column("saved", [_when(i.created) for i in infos], True, 5),
        _Column("size", [format_size(i.size) for i in infos], True, 9),
        _Column("stall", dur("stall_s"), True, 3),
        _Column("write", dur("write_s"), True, 2),
        *metrics,
        _Column("state", [state(i) for i in infos], give_way=10),
        _Column("kept", [why.get(i.name, "") for i in infos], give_way=8),
        _Column(
            "note",
            ["; ".join(i.problems) or (i.manifest.reason if i.manifest else "") for i in infos],
            give_way=4,
        ),
    ]


def _recorded_metric(infos: list[CheckpointInfo]) -> str | None:
    """The metric of the retention policy the newest checkpoint recorded, if any."""
    for info in reversed(infos):
        policy = info.manifest.info.get("policy") if info.manifest else None
        if isinstance(policy, dict) and isinstance(policy.get("metric"), str):
            return policy["metric"]
    return None


def _table(columns: list[_Column]) -> Table:
    from rich.table import Table

    table = Table()
    for c in columns:
        table.add_column(c.header, justify="right" if c.right else "left", no_wrap=True)
    for row in zip(*(c.cells for c in columns), strict=True):
        table.add_row(*row)
    return table


def _terminal_width() -> int | None:
    """Columns to fit ``ls`` into; None when piped (a script or a file gets every column)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit():
        return shutil.get_terminal_size().columns
    return None


def _fit(columns: list[_Column], width: int | None) -> tuple[list[_Column], Console]:
    """The columns that fit in ``width`` without cutting a cell, and a console to print them.

    First the save time is shortened to month-day hour:minute, then whole columns give
    way in their order; a column dropped on the way comes back if it fits in the room
    left. The checkpoint name and step always stay.
    """

    def natural(cols: list[_Column]) -> int:
        # rich's default table: one space of padding each side, a rule between columns
        # and at both edges (its own measure() overestimates by a few columns)
        return 1 + sum(3 + max(map(_cell_len, (c.header, *c.cells))) for c in cols)

    shown = list(columns)
    if width is not None and natural(shown) > width:
        saved = next(c for c in shown if c.header == "saved" and not c.metric)
        saved.cells = [_short_time(cell) for cell in saved.cells]
        for rank in sorted({c.give_way for c in columns} - {0}):
            if natural(shown) <= width:
                break
            shown = [c for c in shown if c.give_way != rank]
        dropped = [c for c in columns if c not in shown]
        for back in sorted(dropped, key=lambda c: -c.give_way):  # stable: display order
            wider = [c for c in columns if c in shown or c is back]
            if natural(wider) <= width:
                shown = wider
    from rich.console import Console

    # Never squeezed: piped output and --wide keep their natural width.
    return shown, Console(width=max(natural(shown), width or 0))


def _cell_len(markup: str) -> int:
    from rich.text import Text

    return Text.from_markup(markup).cell_len


def _short_time(cell: str) -> str:
    """``2024-06-12 14:03:05`` as ``06-12 14:03``."""
    return cell[5:16] if len(cell) == 19 else cell


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
        click.echo(json.dumps([info_json(i, verified=True) for i in infos], indent=1))
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
