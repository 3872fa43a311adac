"""Options that several commands share."""

from __future__ import annotations

from typing import Any

import click


def policy_options(f: Any) -> Any:
    """``--keep-last``, ``--keep-best``, ``--metric``, ``--mode``, ``--keep-every`` and
    ``--max-disk``: a retention policy over the one the run used (``ls``, ``prune``, ``plan``)."""
    for option in reversed(
        [
            click.option("--keep-last", type=click.IntRange(min=1), help="Keep the newest N."),
            click.option("--keep-best", type=click.IntRange(min=0), help="Keep the best K."),
            click.option("--metric", help="Metric that ranks checkpoints (default eval_loss)."),
            click.option("--mode", type=click.Choice(["min", "max"]), help="Lower or higher."),
            click.option("--keep-every", type=click.IntRange(min=1), help="Milestone steps."),
            click.option("--max-disk", help="Byte budget for all checkpoints, e.g. 20GB."),
        ]
    ):
        f = option(f)
    return f
