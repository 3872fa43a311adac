"""``safepoint ls``: the checkpoints of an output directory, as a table or JSON."""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import click

from safepoint.app.listing import Listing, list_run, listing_json, render_listing
from safepoint.cli.options import policy_options


@click.command("ls")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--wide", is_flag=True, help="Every column, even wider than the terminal.")
@policy_options
def ls_cmd(directory: str, as_json: bool, wide: bool, **policy: Any) -> None:
    """List the checkpoints of DIRECTORY: step, time, size, metrics, state, why kept.

    State: complete (manifest and file sizes check out; `safepoint verify` re-hashes
    the files), incomplete, corrupt, foreign (another tool's checkpoint-N), staging.
    In a narrow terminal the least useful columns give way; --wide shows them all.
    The retention policy is the one the run recorded, or the one given by the options.
    """
    listing = list_run(directory, policy)
    if as_json:
        click.echo(json.dumps(listing_json(listing), indent=1))
    else:
        print_listing(listing, wide=wide)


def print_listing(listing: Listing, *, wide: bool = False) -> None:
    """The ``ls`` table of ``listing``, fitted to the terminal unless ``wide``."""
    page = render_listing(listing, width=None if wide else _terminal_width())
    click.echo(page.title)
    if page.table is not None:
        from rich.console import Console  # only where a table is drawn: ~50 ms to import

        Console(width=page.width).print(page.table)
    for line in page.after:
        click.echo(line)


def _terminal_width() -> int | None:
    """Columns to fit ``ls`` into; None when piped (a script or a file gets every column)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit():
        return shutil.get_terminal_size().columns
    return None


COMMANDS = [ls_cmd]
