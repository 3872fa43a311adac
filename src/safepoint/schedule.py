"""When to save: pure decisions from the step, the clock and epoch boundaries. No I/O.

``save_every`` is a comma-separated list of triggers; a save is due when any is:
``"500"`` (every 500 steps), ``"10%"`` (of ``total_steps``), ``"30s"``/``"15m"``/``"2h"``
(of wall-clock training time since the last save), ``"epoch"`` (each epoch end),
``"auto"`` (an interval chosen from the measured save stall and the failure rate, see
``plan``). Step triggers fire on multiples of the interval, so a resumed run saves at
the same steps as an uninterrupted one.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Literal

from safepoint.errors import ConfigError
from safepoint.plan import DEFAULT_MAX_OVERHEAD, DEFAULT_MTBF_S, optimal_interval, steps_for
from safepoint.units import format_duration, parse_duration

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


ASSUMED_WRITE_BYTES_PER_S = 200e6
"""Until the first save is measured, ``auto`` assumes saves run at this speed."""


class AutoInterval:
    """The interval of ``save_every="auto"``, re-evaluated from measurements.

    Starts from an assumed stall (``assume``) and switches to the median of the last
    five measured stalls as saves happen. ``observe`` returns a message saying what
    changed and why when the interval moves by more than 20% (smaller moves are noise).
    """

    def __init__(
        self, *, mtbf: float = DEFAULT_MTBF_S, max_overhead: float = DEFAULT_MAX_OVERHEAD
    ) -> None:
        if mtbf <= 0:
            raise ConfigError(f"mtbf={mtbf!r} must be longer than zero; write e.g. 6h, 24h")
        if not 0 < max_overhead < 1:
            raise ConfigError(f"max_overhead={max_overhead!r} must be a share in (0, 1)")
        self.mtbf = mtbf
        self.max_overhead = max_overhead
        self.stall = 1.0
        self.step_time: float | None = None
        self.measured = False
        self._stalls: deque[float] = deque(maxlen=5)
        self.interval, self.rule = optimal_interval(self.stall, mtbf, max_overhead)

    def assume(self, checkpoint_bytes: int) -> str:
        """Set the starting point from an estimated checkpoint size (before any save)."""
        if not self.measured:
            self.stall = max(0.1, checkpoint_bytes / ASSUMED_WRITE_BYTES_PER_S)
            self.interval, self.rule = optimal_interval(self.stall, self.mtbf, self.max_overhead)
        return self.describe("until a save is measured, assuming")

    def observe(self, *, stall: float | None = None, step_time: float | None = None) -> str | None:
        """Feed a measured save stall and/or step time; the change message, or None."""
        if step_time is not None and step_time > 0:
            self.step_time = step_time
        if stall is None:
            return None
        self._stalls.append(stall)
        estimate = statistics.median(self._stalls)
        interval, rule = optimal_interval(estimate, self.mtbf, self.max_overhead)
        first = not self.measured
        self.stall, self.measured = estimate, True
        if not first and abs(interval - self.interval) <= 0.2 * self.interval:
            return None
        old, self.interval, self.rule = self.interval, interval, rule
        return self.describe("measured", was=old)

    def describe(self, what: str, *, was: float | None = None) -> str:
        steps = (
            f", ~{steps_for(self.interval, self.step_time)} steps of "
            f"{format_duration(self.step_time)}"
            if self.step_time
            else ""
        )
        return (
            f"auto save interval {format_duration(self.interval)}"
            + (f" (was {format_duration(was)})" if was is not None else "")
            + f"{steps} ({self.rule}; "
            f"{what} {self.stall:.3g} s per save, MTBF {format_duration(self.mtbf)})"
        )


class Schedule:
    """Decides whether a save is due. Time is passed in, so it is testable as a table."""

    def __init__(
        self,
        triggers: tuple[Trigger, ...],
        *,
        total_steps: int | None = None,
        mtbf: float = DEFAULT_MTBF_S,
        max_overhead: float = DEFAULT_MAX_OVERHEAD,
    ) -> None:
        self.triggers = triggers
        self.total_steps = total_steps
        self.last_save_step: int | None = None
        self.last_save_time: float | None = None
        self.auto = (
            AutoInterval(mtbf=mtbf, max_overhead=max_overhead)
            if any(t.kind == "auto" for t in triggers)
            else None
        )
        self.mtbf = mtbf
        self.max_overhead = max_overhead
        self.step_time: float | None = None
        """Mean compute seconds per step (moving average), measured by ``due``."""
        self.step_samples = 0
        self._mark: tuple[int, float] | None = None
        for t in triggers:
            if t.kind == "fraction" and not total_steps:
                raise ConfigError(
                    f"save_every {t.value:g}% needs the run length: set total_steps, "
                    "or save every N steps instead"
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

    def planned_saves(self) -> int | None:
        """How many checkpoints the run saves, when the schedule fixes it (steps,
        fractions and a known ``total_steps``); None when time or epochs decide."""
        total = self.total_steps
        if not total:
            return None
        if not self.triggers:
            return 1  # only the final checkpoint
        every = self.step_interval()
        if {t.kind for t in self.triggers} - {"steps", "fraction"} or not every:
            return None
        return total // every + (1 if total % every else 0)

    def start(self, now: float, step: int = 0) -> None:
        """Training (re)starts at ``step``: time triggers count from ``now``."""
        self.last_save_time = now
        self.last_save_step = step
        self._mark = (step, now)

    def saved(self, step: int, now: float, *, stall: float | None = None) -> str | None:
        """A save of ``step`` ended at ``now`` after blocking training ``stall`` s.

        Returns the message of a change of the ``auto`` interval, if any.
        """
        self.last_save_step = step
        self.last_save_time = now
        self._mark = (step, now)  # the next step's time excludes the save
        if self.auto is None or stall is None:
            return None
        return self.auto.observe(stall=stall, step_time=self.step_time)

    def _tick(self, step: int, now: float) -> None:
        if self._mark is not None and step > self._mark[0]:
            sample = (now - self._mark[1]) / (step - self._mark[0])
            old = self.step_time
            self.step_time = sample if old is None else 0.8 * old + 0.2 * sample
            self.step_samples += 1
        self._mark = (step, now)

    def failed(self, now: float) -> None:
        """A due save failed and training goes on: time triggers wait a full interval."""
        self.last_save_time = now

    def interval_seconds(self, step_time: float) -> float | None:
        """The shortest gap between saves in seconds at ``step_time`` per step, if known."""
        gaps = [t.value for t in self.triggers if t.kind == "time"]
        steps = self.step_interval()
        if steps:
            gaps.append(steps * step_time)
        if self.auto:
            gaps.append(max(self.auto.interval, step_time))
        return min(gaps) if gaps else None

    def describe(self) -> str:
        return ", ".join(str(t) for t in self.triggers) or "no schedule"

    def due(self, step: int, now: float, *, epoch_end: bool = False) -> str | None:
        """The reason a save is due at ``step`` (after it completed), or None.

        Call once per completed step: the calls also measure the step time.
        """
        self._tick(step, now)
        if step == self.last_save_step:
            return None
        interval = self.step_interval()
        if interval and step % interval == 0:
            return f"step {step} (every {interval} steps)"
        if epoch_end and any(t.kind == "epoch" for t in self.triggers):
            return "end of epoch"
        if self.last_save_time is None:
            self.last_save_time = now
        elapsed = now - self.last_save_time
        for t in self.triggers:
            if t.kind == "time" and elapsed >= t.value:
                return f"{elapsed:.0f} s since the last save (every {t.value:g} s)"
        if self.auto and elapsed >= self.auto.interval:
            return (
                f"auto: {format_duration(elapsed)} since the last save "
                f"(interval {format_duration(self.auto.interval)}, {self.auto.rule})"
            )
        return None
