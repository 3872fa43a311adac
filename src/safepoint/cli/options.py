"""Options that several commands share, made from ``Options``."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import click

from safepoint.app.runs import POLICY_KEYS
from safepoint.options import Options

_HELP = {"keep_last": "Keep the newest N checkpoints."}  # here N >= 1: no "0 keeps all"


def flagged(text: str) -> str:
    """An option's help with the other options it names written as flags
    (``save_every`` as ``--save-every``): the library's words for a command line."""
    names = "|".join(n for n in Options.names() if "_" in n)
    return re.sub(rf"\b({names})\b", lambda m: "--" + m[1].replace("_", "-"), text)


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
        text = _HELP.get(name) or flagged(Options.help(name, flag=True))
        f = click.option("--" + name.replace("_", "-"), type=ctype, help=text)(f)
    return f
