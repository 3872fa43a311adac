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
def export_cmd(directory: str, which: str, out: str, merge: bool, metric: str) -> None:
    """Export a checkpoint of DIRECTORY as a model folder that from_pretrained loads."""
    from safepoint.app.export import export, pick

    info = pick(Path(directory), which, metric=metric)
    _check_writable(Path(out))
    names = ("adapter_model.safetensors", "adapter_config.json")
    if not (info.path / names[0]).is_file():
        names = ("model.safetensors", "config.json")
    if missing := [n for n in names if not (info.path / n).is_file()]:
        raise ConfigError(
            f"{info.path}: no {', '.join(missing)}; export takes the checkpoints of "
            "`safepoint train` or of the Trainer callback (a Hugging Face model folder)"
        )
    _check_space(Path(out), sum((info.path / n).stat().st_size for n in names))
    try:
        path = export(info, Path(out), merge=merge)
    except OSError as e:
        # A full or read-only disk fails on writing, but the error names the source file.
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise ConfigError(
            f"--out {out}: cannot write the model there ({e.strerror}); nothing was "
            "exported; free space or choose another folder"
        ) from None
    is_adapter = (info.path / "adapter_config.json").is_file()
    kind = "merged model" if merge and is_adapter else "adapter" if is_adapter else "model"
    click.echo(f"exported {info.path} ({kind}) to {path}")


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
    if existing != out and not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file; give a new folder")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out {out}: {existing} is not writable (read-only file system or no "
            "permission); choose another folder"
        )


COMMANDS = [export_cmd]
