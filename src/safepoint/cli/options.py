"""Options that several commands share, made from ``Options``."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from safepoint.app.runs import POLICY_KEYS
from safepoint.options import Options


def policy_options(f: Any) -> Any:
    """A flag for each retention option (``--keep-last``, ``--keep-best``, ``--metric``,
    ``--mode``, ``--keep-every``, ``--keep-after-step``, ``--max-disk``): a policy over
    the one the run used. A rule added to ``RetentionPolicy`` gets its flag here."""
    types = {f.name: str(f.type) for f in dataclasses.fields(Options)}
    for name in reversed(POLICY_KEYS):
        kind = types[name]
        if kind.startswith("Literal"):
            ctype: Any = click.Choice(["min", "max"])
        elif name in ("keep_last", "keep_every"):
            ctype = click.IntRange(min=1)
        elif kind.startswith("int"):
            ctype = click.IntRange(min=0)
        else:
            ctype = None
        f = click.option("--" + name.replace("_", "-"), type=ctype, help=Options.help(name))(f)
    return f
