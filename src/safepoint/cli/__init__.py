"""The ``safepoint`` command line. Each command lives in its own module of this package."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from safepoint import __version__
from safepoint.errors import SafepointError

# Command name -> "module:attribute" in this package. A command's module is imported only
# when that command runs (or `--help` lists it): `safepoint ls` never imports `train`'s
# transformers/TRL stack, and no read-only command imports torch (`benchmarks/cli_startup.py`).
_COMMANDS = {
    "train": "train:train_cmd",
    "ls": "inspect_cmds:ls_cmd",
    "verify": "inspect_cmds:verify_cmd",
    "prune": "policy_cmds:prune_cmd",
    "plan": "policy_cmds:plan_cmd",
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
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="safepoint: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning safepoint errors into ``Error: ...`` and an exit code."""
    try:
        # standalone_mode=False: click returns a command's exit code instead of exiting.
        rv = cli.main(args=argv, prog_name="safepoint", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except SafepointError as e:
        click.echo(f"Error: {e}", err=True)
        return e.exit_code
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
