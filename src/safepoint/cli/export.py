"""``safepoint export``: a clean, loadable model folder from a run's checkpoint."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import click

from safepoint.errors import ConfigError
from safepoint.units import format_size


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
    help="Base model folder for an adapter (default: the model the run's config names).",
)
def export_cmd(
    directory: str, which: str, out: str, merge: bool, metric: str, base: str | None
) -> None:
    """Export a checkpoint of DIRECTORY as a model folder that from_pretrained loads.

    Only the files the checkpoint's manifest lists are read. The base model of a LoRA
    adapter is --base, or the model the run's own config names; never a folder the
    checkpoint's adapter_config.json points to.
    """
    from safepoint.app.export import base_model, export, is_adapter, listed_files, pick

    info = pick(Path(directory), which, metric=metric)
    assert info.manifest is not None
    # The user's --out first (nothing read yet), then what the checkpoint holds.
    _check_writable(Path(out))
    _check_space(Path(out), info.manifest.total_bytes)
    listed_files(info)  # refuses a checkpoint that is not a model folder
    adapter = is_adapter(info)
    trusted = base_model(info, base) if adapter else None
    try:
        path = export(info, Path(out), merge=merge, base=trusted)
    except OSError as e:
        # A full or read-only disk fails on writing, but the error names the source file.
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise ConfigError(
            f"--out {out}: cannot write the model there ({e.strerror}); nothing was "
            "exported; free space or choose another folder"
        ) from None
    kind = "merged model" if merge and adapter else "adapter" if adapter else "model"
    click.echo(f"exported {info.path} ({kind}) to {path}")
    if trusted is not None:
        click.echo(f"base model: {trusted.path} ({trusted.source})")
    elif adapter:
        click.echo(
            "base model: none named by the run's config; no tokenizer copied (give --base "
            "PATH to copy the base model's tokenizer, or to --merge)"
        )


def _existing(out: Path) -> Path:
    while not out.exists() and out != out.parent:
        out = out.parent
    return out


def _check_space(out: Path, needed: int) -> None:
    # A merged model is about the base model's size, more than this: the write itself
    # still fails cleanly, but after a temporary folder came and went.
    free = shutil.disk_usage(_existing(out)).free
    if free < needed:
        raise ConfigError(
            f"--out {out}: {format_size(needed)} to write but {format_size(free)} free on "
            "that disk; free space or choose another folder"
        )


def _check_writable(out: Path) -> None:
    existing = _existing(out)
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file; give a new folder")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out {out}: {existing} is not writable (read-only file system or no "
            "permission); choose another folder"
        )


COMMANDS = [export_cmd]
