"""The ``safepoint`` command line. Each command lives in its own module of this package."""

from __future__ import annotations

import logging
import sys

import click

from safepoint import __version__
from safepoint.errors import SafepointError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="safepoint")
@click.option("-v", "--verbose", is_flag=True, help="Log every save and decision.")
def cli(verbose: bool) -> None:
    """Crash-proof checkpointing for fine-tuning runs."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="safepoint: %(message)s",
        stream=sys.stderr,
    )


def _register() -> None:
    # Imported here so that `safepoint ls` does not pay for importing transformers.
    from safepoint.cli import inspect_cmds

    for command in inspect_cmds.COMMANDS:
        cli.add_command(command)
    for module_name in ("train", "policy_cmds", "report", "chaos", "export"):
        try:
            module = __import__(f"safepoint.cli.{module_name}", fromlist=["COMMANDS"])
        except ModuleNotFoundError as e:
            if e.name != f"safepoint.cli.{module_name}":
                raise
            continue
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


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
