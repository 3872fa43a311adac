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
@click.option(
    "--base",
    type=click.Path(file_okay=False),
    help="The model fine-tuned: an adapter's base, and where the tokenizer comes from "
    "(default: the model the run's config names).",
)
def export_cmd(
    directory: str, which: str, out: str, merge: bool, metric: str, base: str | None
) -> None:
    """Export a checkpoint of DIRECTORY as a model folder that from_pretrained loads.

    Only the files the checkpoint's manifest lists are read. The base model of a LoRA
    adapter is --base, or the model the run's own config names; never a folder the
    checkpoint's adapter_config.json points to.
    """
    from safepoint.app.export import export_run

    done = export_run(Path(directory), which, out, merge=merge, metric=metric, base=base)
    kind = "merged model" if done.merged else "adapter" if done.adapter else "model"
    click.echo(f"exported {done.source.path} ({kind}) to {done.path}")
    if done.base is not None:
        click.echo(f"base model: {done.base.path} ({done.base.source})")
    if not done.tokenizer:
        whose = "the base model" if done.adapter else "the model it was fine-tuned from"
        click.echo(
            f"no tokenizer copied: give --base PATH ({whose}) to copy its tokenizer"
            + (", or to --merge" if done.adapter and done.base is None else "")
        )


COMMANDS = [export_cmd]
