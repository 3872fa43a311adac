"""``safepoint report``: the picture and the page of a run."""

from __future__ import annotations

import json
from pathlib import Path

import click

from safepoint.report import extract
from safepoint.units import format_duration, format_size


@click.command("report")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to write report.png and report.html (default: DIRECTORY).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report's data as JSON.")
def report_cmd(directory: str, out: str | None, as_json: bool) -> None:
    """Draw the run in DIRECTORY: loss with checkpoint marks, save stalls, disk use.

    Writes report.png and a self-contained report.html (no network needed to view it).
    Also works on a directory written by the stock Trainer (loss and checkpoints).
    With --json it only prints the data: it writes no file.
    """
    data = extract(directory)
    if as_json:
        click.echo(json.dumps(data.to_json(), indent=1))
        return
    from safepoint.report_render import write_report

    paths = write_report(data, Path(out) if out else Path(directory))
    committed = [s for s in data.saves if s.result == "committed"]
    stall = sum(s.stall_s or 0.0 for s in committed)
    click.echo(
        f"{directory}: {len(data.train_loss)} loss points, {len(data.checkpoints)} checkpoints "
        f"({len(data.kept)} on disk), {len(data.resumes)} restart(s), "
        f"{sum(r.steps_lost or 0 for r in data.resumes)} steps lost"
    )
    if committed:
        click.echo(
            f"saves: {len(committed)}, training stalled {format_duration(stall)} in total; "
            f"disk now {format_size(data.disk[-1][1]) if data.disk else '-'}"
        )
    for note in data.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {paths['png']}\nwrote {paths['html']}")


COMMANDS = [report_cmd]
