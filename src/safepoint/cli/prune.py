"""``safepoint prune``: apply a retention policy to a directory's checkpoints."""

from __future__ import annotations

from typing import Any

import click

from safepoint.app.pruning import PrunePlan, plan_prune, prune, prune_policy
from safepoint.cli.options import policy_options
from safepoint.units import format_size


@click.command("prune")
@click.argument("directory", type=click.Path(file_okay=False))
@policy_options
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@click.option(
    "--include-foreign",
    is_flag=True,
    help="Also apply the policy to checkpoint-N folders written by other tools.",
)
def prune_cmd(directory: str, dry_run: bool, include_foreign: bool, **options: Any) -> None:
    """Apply a retention policy to the checkpoints of DIRECTORY.

    Without options, the policy the run recorded in its checkpoints. Refuses while a
    run holds the directory's lock. Incomplete and corrupt folders are never touched.
    """
    path, policy = prune_policy(directory, options)
    if dry_run:
        plan = plan_prune(path, policy, include_foreign=include_foreign)
        _print_table(plan, dry_run=True)
        click.echo(
            f"would delete {len(plan.delete)} checkpoint(s), freeing {format_size(plan.freed)}"
        )
        return
    plan = prune(
        path,
        policy,
        include_foreign=include_foreign,
        before=lambda plan: _print_table(plan, dry_run=False),
    )
    click.echo(f"deleted {len(plan.delete)} checkpoint(s), freed {format_size(plan.freed)}")


def _print_table(plan: PrunePlan, *, dry_run: bool) -> None:
    from rich.console import Console  # only where a table is drawn: ~50 ms to import
    from rich.table import Table

    title = f"{plan.directory}{' (dry run)' if dry_run else ''}"
    table = Table(title=title, title_justify="left")
    for col in ("checkpoint", "status", "size", "action"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for row in plan.rows:
        i = row.info
        if row.action == "delete":
            action = "[red]would delete[/]" if dry_run else "[red]delete[/]"
        elif row.action == "keep":
            action = f"keep: {row.why}"
        elif row.action == "foreign":
            action = "untouched (foreign; --include-foreign to prune)"
        else:
            action = f"untouched ({i.status})"
        table.add_row(i.name, i.status, format_size(i.size), action)
    Console().print(table)


COMMANDS = [prune_cmd]
