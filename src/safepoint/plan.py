"""The formulas behind ``save_every="auto"``, the start-up warnings and ``safepoint plan``.

Pure functions of a few measured numbers, no I/O. Notation (all times in seconds):

- ``stall``: how long training is blocked by one save (delta in the literature);
- ``mtbf``: mean time between failures of the job (M);
- ``interval``: compute time between the end of one save and the start of the next (tau).

Young (1974): tau = sqrt(2 delta M). Daly (2006), the higher-order optimum used here:
tau = sqrt(2 delta M) * (1 + sqrt(delta / 2M) / 3 + (delta / 2M) / 9) - delta when
delta < 2M, else tau = M. The interval is then raised, if needed, so that the share of
the run spent saving, delta / (tau + delta), stays under ``max_overhead``.

A failure strikes on average half-way through a segment of tau + delta, so the work lost
per failure is (tau + delta) / 2 (restart time not included: it does not depend on the
interval).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

DEFAULT_MTBF_S = 24 * 3600.0
"""Failure rate assumed when the user gives none: one failure a day (preemptible cloud
instances and shared clusters fail more often; pass ``mtbf`` when you know better)."""
DEFAULT_MAX_OVERHEAD = 0.02
"""Largest share of the run that ``auto`` lets saving take."""


def young_interval(stall: float, mtbf: float) -> float:
    """Young's first-order optimum sqrt(2 x stall x mtbf)."""
    return math.sqrt(2.0 * stall * mtbf)


def daly_interval(stall: float, mtbf: float) -> float:
    """Daly's higher-order optimum (see the module docstring); ``mtbf`` when stall >= 2M."""
    if stall >= 2.0 * mtbf:
        return mtbf
    x = stall / (2.0 * mtbf)
    return young_interval(stall, mtbf) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - stall


def overhead_floor(stall: float, max_overhead: float) -> float:
    """The shortest interval that keeps stall / (interval + stall) <= ``max_overhead``."""
    return stall * (1.0 - max_overhead) / max_overhead


def optimal_interval(
    stall: float, mtbf: float, max_overhead: float = DEFAULT_MAX_OVERHEAD
) -> tuple[float, str]:
    """The recommended interval in seconds and which rule chose it."""
    daly = daly_interval(stall, mtbf)
    floor = overhead_floor(stall, max_overhead)
    if floor > daly:
        return floor, f"overhead bound ({max_overhead:.0%} of the run)"
    return daly, "Daly optimum"


def clamp_to_run(
    interval: float, *, step_time: float | None, total_steps: int | None
) -> float | None:
    """The run's length when ``interval`` is longer than the whole run, else None.

    Saving less often than once per run means saving once, at the end: a recommendation
    of 178 steps for a 93-step run is 93.
    """
    if not step_time or not total_steps or step_time <= 0:
        return None
    run = total_steps * step_time
    return run if interval > run else None


def overhead_share(interval: float, stall: float) -> float:
    """Share of wall time spent blocked on saves: stall / (interval + stall)."""
    return stall / (interval + stall) if interval + stall > 0 else 0.0


def work_lost_per_failure(interval: float, stall: float) -> float:
    """Expected seconds of work lost when a failure strikes: (interval + stall) / 2."""
    return (interval + stall) / 2.0


def steps_for(interval: float, step_time: float) -> int:
    """An interval in seconds as a whole number of steps, at least 1."""
    if step_time <= 0:
        return 1
    return max(1, round(interval / step_time))


@dataclass(frozen=True)
class Saves:
    """What the schedule says of a run's future saves, for the pre-flight's worst case."""

    count: int | None = None
    """How many checkpoints the run saves, when its schedule fixes it."""
    total_steps: int | None = None
    step_interval: int | None = None


class Keeps(Protocol):
    """What ``outlook`` needs of a retention policy (``retention.RetentionPolicy``)."""

    max_bytes: int | None

    def kept_count(self, saves: Saves) -> int | None: ...


def disk_needed(
    checkpoint_bytes: int, kept: int | None, *, max_bytes: int | None = None
) -> int | None:
    """Bytes the kept checkpoints plus one being written need (None: unbounded).

    ``max_bytes`` caps the kept set, but never below the newest and the best, which
    retention protects whatever the budget.
    """
    if kept is None and max_bytes is None:
        return None
    held = math.inf if kept is None else kept * checkpoint_bytes
    if max_bytes is not None:
        held = min(held, max(max_bytes, min(kept or 2, 2) * checkpoint_bytes))
    return int(held) + checkpoint_bytes


@dataclass(frozen=True)
class Outlook:
    """What a save interval gives for a run: the numbers ``safepoint plan`` prints."""

    interval_s: float
    steps: int | None
    overhead: float
    lost_per_failure_s: float
    saves: int | None
    kept: int | None
    disk_bytes: int | None


def outlook(
    interval: float,
    *,
    stall: float,
    step_time: float | None = None,
    total_steps: int | None = None,
    checkpoint_bytes: int | None = None,
    policy: Keeps | None = None,
) -> Outlook:
    """Overhead, expected loss, number of saves and disk use of saving every ``interval`` s
    (what ``policy`` keeps of them; None keeps all)."""
    steps = steps_for(interval, step_time) if step_time else None
    saves = None
    if steps and total_steps:
        # One every `steps`, plus the final checkpoint when the run does not end on one.
        saves = total_steps // steps + (1 if total_steps % steps else 0)
    kept = saves if policy is None else policy.kept_count(Saves(saves, total_steps, steps))
    disk = (
        disk_needed(checkpoint_bytes, kept, max_bytes=policy and policy.max_bytes)
        if checkpoint_bytes is not None
        else None
    )
    return Outlook(
        interval_s=interval,
        steps=steps,
        overhead=overhead_share(interval, stall),
        lost_per_failure_s=work_lost_per_failure(interval, stall),
        saves=saves,
        kept=kept,
        disk_bytes=disk,
    )


def overhead_warning(
    description: str, *, interval: float, stall: float, threshold: float = 0.10
) -> str | None:
    """A warning when saving ``description`` (e.g. "every 1 steps") costs over ``threshold``."""
    share = overhead_share(interval, stall)
    if share <= threshold:
        return None
    return (
        f"saving {description} at ~{stall:.2g} s per save spends ~{share:.0%} of the run on "
        "checkpoints; consider a longer save_every, or save_every='auto'"
    )


@dataclass(frozen=True)
class Measured:
    """What a run record tells about a run, for ``safepoint plan DIR``."""

    step_time: float | None
    stall: float | None
    checkpoint_bytes: int | None
    saves: int
    resumes: int
    config: dict[str, Any]
    """The options of the newest start of the run (``start`` event), possibly empty."""


def measured(events: Iterable[Mapping[str, Any]]) -> Measured:
    """Medians of the step times, save stalls and sizes a run recorded (recent ones)."""
    stalls: list[float] = []
    sizes: list[int] = []
    paces: list[float] = []
    resumes = 0
    config: dict[str, Any] = {}
    for e in events:
        kind = e.get("event")
        if kind == "save" and e.get("result", "committed") == "committed":
            if isinstance(e.get("stall_s"), (int, float)):
                stalls.append(float(e["stall_s"]))
            if isinstance(e.get("bytes"), int):
                sizes.append(e["bytes"])
        elif kind == "pace" and isinstance(e.get("step_time_s"), (int, float)):
            paces.append(float(e["step_time_s"]))
        elif kind == "resume":
            resumes += 1
        elif kind == "start" and isinstance(e.get("config"), dict):
            config = dict(e["config"])

    def median(xs: list[float]) -> float | None:
        return statistics.median(xs[-20:]) if xs else None

    size = median([float(s) for s in sizes])
    return Measured(
        step_time=median(paces),
        stall=median(stalls),
        checkpoint_bytes=None if size is None else int(size),
        saves=len(stalls),
        resumes=resumes,
        config=config,
    )
