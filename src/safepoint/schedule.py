"""When to save: pure decisions from the step, the clock and epoch boundaries. No I/O.

``save_every`` is a comma-separated list of triggers; a save is due when any is:
``"500"`` (every 500 steps), ``"10%"`` (of ``total_steps``), ``"30s"``/``"15m"``/``"2h"``
(of wall-clock training time since the last save), ``"epoch"`` (each epoch end).
Step triggers fire on multiples of the interval, so a resumed run saves at the same
steps as an uninterrupted one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from safepoint.errors import ConfigError
from safepoint.units import parse_duration

TriggerKind = Literal["steps", "fraction", "time", "epoch", "auto"]


@dataclass(frozen=True)
class Trigger:
    kind: TriggerKind
    value: float = 0.0

    def __str__(self) -> str:
        if self.kind == "steps":
            return f"every {int(self.value)} steps"
        if self.kind == "fraction":
            return f"every {self.value:g}% of the run"
        if self.kind == "time":
            return f"every {self.value:g} s"
        return "each epoch" if self.kind == "epoch" else "auto"


def parse_save_every(spec: str | int | None) -> tuple[Trigger, ...]:
    """Parse ``save_every``; raises ``ConfigError`` with an example on bad input."""
    if spec is None:
        return ()
    if isinstance(spec, bool):
        raise ConfigError(f"save_every={spec!r} is not a schedule; write e.g. 500, 10%, 15m")
    triggers = []
    for part in str(spec).split(","):
        part = part.strip().lower()
        if re.fullmatch(r"\d+", part):
            n = int(part)
            if n <= 0:
                raise ConfigError(f"save_every={spec!r}: a step interval must be at least 1")
            triggers.append(Trigger("steps", n))
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", part):
            pct = float(m.group(1))
            if not 0 < pct <= 100:
                raise ConfigError(f"save_every={spec!r}: a fraction must be in (0%, 100%]")
            triggers.append(Trigger("fraction", pct))
        elif part == "epoch":
            triggers.append(Trigger("epoch"))
        elif part == "auto":
            triggers.append(Trigger("auto"))
        elif re.fullmatch(r"\d+(?:\.\d+)?\s*(ms|s|m|h|d)", part):
            triggers.append(Trigger("time", parse_duration(part, what="save_every")))
        else:
            raise ConfigError(
                f"save_every={spec!r}: cannot read {part!r}; write steps (500), a fraction "
                "of the run (10%), a time (30s, 15m, 2h), 'epoch' or 'auto', comma-separated"
            )
    return tuple(triggers)


class Schedule:
    """Decides whether a save is due. Time is passed in, so it is testable as a table."""

    def __init__(self, triggers: tuple[Trigger, ...], *, total_steps: int | None = None) -> None:
        self.triggers = triggers
        self.total_steps = total_steps
        self.last_save_step: int | None = None
        self.last_save_time: float | None = None
        for t in triggers:
            if t.kind == "fraction" and not total_steps:
                raise ConfigError(
                    f"save_every {t.value:g}% needs the run length: pass total_steps "
                    "(or --max-steps), or save every N steps instead"
                )

    def step_interval(self) -> int | None:
        """The smallest step interval among the step and fraction triggers."""
        steps = [int(t.value) for t in self.triggers if t.kind == "steps"]
        steps += [
            max(1, math.floor((self.total_steps or 0) * t.value / 100 + 0.5))
            for t in self.triggers
            if t.kind == "fraction"
        ]
        return min(steps) if steps else None

    def start(self, now: float, step: int = 0) -> None:
        """Training (re)starts at ``step``: time triggers count from ``now``."""
        self.last_save_time = now
        self.last_save_step = step

    def saved(self, step: int, now: float) -> None:
        self.last_save_step = step
        self.last_save_time = now

    def due(self, step: int, now: float, *, epoch_end: bool = False) -> str | None:
        """The reason a save is due at ``step`` (after it completed), or None."""
        if step == self.last_save_step:
            return None
        interval = self.step_interval()
        if interval and step % interval == 0:
            return f"step {step} (every {interval} steps)"
        if epoch_end and any(t.kind == "epoch" for t in self.triggers):
            return "end of epoch"
        if self.last_save_time is None:
            self.last_save_time = now
        for t in self.triggers:
            if t.kind == "time" and now - self.last_save_time >= t.value:
                return (
                    f"{now - self.last_save_time:.0f} s since the last save (every {t.value:g} s)"
                )
        return None
