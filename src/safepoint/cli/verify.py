"""``safepoint verify``: re-check the checksums of a checkpoint or a directory's."""

from __future__ import annotations

import json

import click

from safepoint.app.listing import info_json
from safepoint.app.verification import deleted_json, failed, verdict_lines, verify_path


@click.command("verify")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def verify_cmd(path: str, as_json: bool) -> None:
    """Re-check sizes and checksums of a checkpoint or of every checkpoint in a directory.

    Exits 0 when all are valid, 1 when a problem was found (one line per problem). A
    checkpoint that a live run deletes while it is read is reported as "deleted while
    verifying" and is no failure.
    """
    result = verify_path(path)
    if as_json:
        entries = [info_json(i, verified=True) for i in result.infos]
        entries += [deleted_json(p) for p in result.deleted]
        click.echo(json.dumps(entries, indent=1))
    else:
        for line in verdict_lines(path, result):
            click.echo(line)
    if failed(result):
        raise click.exceptions.Exit(1)


COMMANDS = [verify_cmd]
