"""The ``safepoint`` command line. Each command lives in its own module of this package."""

from __future__ import annotations

import errno
import importlib
import logging
import re
import shutil
import sys
from typing import Any

import click

from safepoint import __version__
from safepoint.errors import SafepointError
from safepoint.units import wrap_text

# Command name -> "module:attribute" in this package. A command's module is imported only
# when that command runs (or `--help` lists it): `safepoint ls` never imports `train`'s
# transformers/TRL stack, and no read-only command imports torch (`benchmarks/cli_startup.py`).
_COMMANDS = {
    "train": "train:train_cmd",
    "ls": "ls:ls_cmd",
    "verify": "verify:verify_cmd",
    "prune": "prune:prune_cmd",
    "plan": "plan:plan_cmd",
    "report": "report:report_cmd",
    "export": "export:export_cmd",
    "chaos": "chaos:chaos_cmd",
}


class LazyGroup(click.Group):
    """A group that imports a command's module on first use (click's lazy-loading pattern)."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module_name, attr = self.lazy[cmd_name].split(":")
            module = importlib.import_module(f"{__name__}.{module_name}")
            self.add_command(getattr(module, attr), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy=_COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="safepoint")
@click.option("-v", "--verbose", is_flag=True, help="Log every save and decision.")
def cli(verbose: bool) -> None:
    """Crash-proof checkpointing for fine-tuning runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Fitted("safepoint: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


class _Fitted(logging.Formatter):
    """Log lines that fit the terminal (``COLUMNS``, else 80 when piped), broken at a
    clause or a space into indented continuation lines: never inside a number or a path."""

    def format(self, record: logging.LogRecord) -> str:
        width = shutil.get_terminal_size().columns
        return "\n".join(wrap_text(super().format(record), max(width, 40)))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning safepoint errors into ``Error: ...`` and an exit code.

    Every error a user can cause is one line on stderr and exit code 2 (DESIGN.md).
    """
    try:
        # standalone_mode=False: click returns a command's exit code instead of exiting.
        rv = cli.main(args=argv, prog_name="safepoint", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.UsageError as e:
        # click would print the usage block and a hint over several lines.
        where = e.ctx.command_path if e.ctx else "safepoint"
        return _fail(f"{e.format_message()} (see '{where} --help')", e.exit_code)
    except click.ClickException as e:
        return _fail(e.format_message(), e.exit_code)
    except click.exceptions.Exit as e:
        return e.exit_code
    except SystemExit as e:  # TrainingStopped (exit 3) raised outside a command's own
        # handling, e.g. by a late stop signal: its line was logged where it was raised
        if not isinstance(e, SafepointError):
            raise
        return e.code if isinstance(e.code, int) else 1
    except SafepointError as e:
        return _fail(str(e), e.exit_code)
    except OSError as e:
        # Last resort for a user's path that a command did not check itself: say what
        # failed and where; anything else is a bug and keeps its traceback.
        if e.errno not in _USER_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}; {_USER_ERRNOS[e.errno]}", 2)
    return rv if isinstance(rv, int) else 0


_USER_ERRNOS = {
    errno.ENOENT: "check the path",
    errno.EEXIST: "choose another path",
    errno.ENOTDIR: "a part of the path is a file; give a directory",
    errno.EISDIR: "give a file, not a directory",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "choose a path on a writable file system",
    errno.ENOSPC: "free space or choose another disk",
    errno.EDQUOT: "free space or choose another disk",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def _fail(message: str, code: int) -> int:
    # One line, whatever the message: scripts and people read the first line only.
    click.echo("Error: " + as_flags(" ".join(message.split())), err=True)
    return code


def as_flags(message: str) -> str:
    """The library names options (``keep_last=2 keep_best=0``, "another output
    directory"); on the command line they are flags (``--keep-last 2 --keep-best 0``)."""
    from safepoint.options import Options

    names = "|".join(sorted(Options.names(), key=len, reverse=True))

    def flag(m: re.Match[str]) -> str:
        name, value = m[1].replace("_", "-"), m[2]
        if value in ("True", "False"):  # a switch: --async-save, --no-check-disk
            off = "--sync-save" if name == "async-save" else f"--no-{name}"
            return f"--{name}" if value == "True" else off
        return f"--{name} {value}"

    message = re.sub(rf"(?<![\w.-])({names})=([^\s,;)]+)", flag, message)
    return message.replace("another output directory", "another --output-dir")


if __name__ == "__main__":
    sys.exit(main())
