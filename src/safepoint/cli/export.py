"""``safepoint export``: a clean, loadable model folder from a run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--checkpoint", "which", default="best", show_default=True, help="best, latest or a step."
)
@click.option("--out", required=True, type=click.Path(), help="New folder for the model.")
@click.option("--merge", is_flag=True, help="Merge the LoRA adapter into the base model.")
@click.option("--metric", default="eval_loss", show_default=True, help="Metric for 'best'.")
def export_cmd(directory: str, which: str, out: str, merge: bool, metric: str) -> None:
    """Export a checkpoint of DIRECTORY as a model folder that from_pretrained loads."""
    from safepoint.app.export import export, pick

    info = pick(Path(directory), which, metric=metric)
    path = export(info, Path(out), merge=merge)
    is_adapter = (info.path / "adapter_config.json").is_file()
    kind = "merged model" if merge and is_adapter else "adapter" if is_adapter else "model"
    click.echo(f"exported {info.path} ({kind}) to {path}")


COMMANDS = [export_cmd]
