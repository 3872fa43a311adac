"""Whether to save at this step: the schedule, the end of the run, ``on_busy``, the ranks.

One decision per completed step, the same on every rank: the Trainer callback and a
plain loop both ask ``Decider.due`` and nothing else. ``end_of_run`` is the one place
that says a step is the last.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from safepoint.distributed import Ranks
from safepoint.errors import SaveFailedError
from safepoint.options import Options
from safepoint.plan import overhead_warning
from safepoint.records import RunRecord
from safepoint.schedule import Schedule
from safepoint.validity import CheckpointInfo
from safepoint.writer import AsyncSaver

log = logging.getLogger("safepoint")

END_OF_RUN = "end of training"


class Decider:
    """The save decisions of one run; feeds ``auto`` with the measured save stalls."""

    def __init__(self, options: Options, ranks: Ranks, record: RunRecord) -> None:
        self.options = options
        self.ranks = ranks
        self.record = record
        self.total_steps = options.total_steps
        self._schedule: Schedule | None = None
        self._started: tuple[float, int] = (time.monotonic(), 0)
        self._warned_overhead = False

    @staticmethod
    def check(options: Options, *, length_later: bool = False) -> None:
        """Raise ``ConfigError`` if the schedule cannot be built from ``options`` (and a
        ``total_steps`` given later to ``begin``, with ``length_later``)."""
        if not length_later:
            Schedule(options.triggers, total_steps=options.total_steps)

    @property
    def schedule(self) -> Schedule:
        """The schedule; a fraction of the run needs ``total_steps`` by the first step."""
        if self._schedule is None:
            o = self.options
            self._schedule = Schedule(
                o.triggers, total_steps=self.total_steps, mtbf=o.mtbf_s, max_overhead=o.max_overhead
            )
            self._schedule.start(*self._started)
        return self._schedule

    def begin(self, *, step: int = 0, total_steps: int | None = None) -> None:
        """Training starts (or resumes) at ``step``; ``total_steps`` if known only now."""
        if total_steps is not None and total_steps != self.total_steps:
            self.total_steps = total_steps
            self._schedule = None  # rebuilt with the run length, same settings
        self._started = (time.monotonic(), step)
        self.schedule.start(*self._started)

    @property
    def last_saved(self) -> int | None:
        """The step of the last save started in this process (or resumed from)."""
        return self.schedule.last_save_step

    def end_of_run(self, step: int) -> bool:
        """True at the last step of a run of known length, unless it is saved already."""
        total = self.total_steps
        return total is not None and step >= total and self.last_saved != step

    def due(
        self,
        step: int,
        *,
        epoch_end: bool = False,
        background: AsyncSaver | None = None,
        stop: Any = None,
    ) -> str | None:
        """The reason to save now that ``step`` completed, or None; the same on all ranks.

        Collective when several processes train: every rank calls it after every step.
        ``background``: the async saver, for ``on_busy``; ``stop``: the emergency logic,
        whose stop signal is shared with every rank by the same exchange.
        """
        reason = self.schedule.due(step, time.monotonic(), epoch_end=epoch_end)
        must = self.end_of_run(step)
        if reason is None and must:
            reason = END_OF_RUN
        if step == 0:
            reason = None  # nothing trained yet
        if background is not None:
            reason = background.due(step, reason, must=must)
        return self.ranks.agree_to_save(reason, stop)

    def saved(self, step: int, stall: float) -> None:
        """A save of ``step`` blocked training ``stall`` s: feed ``auto``, warn if costly."""
        schedule = self.schedule
        change = schedule.saved(step, time.monotonic(), stall=stall)
        auto = schedule.auto
        if change and auto is not None:
            log.info("%s", change)
            self.record.event("schedule", interval_s=round(auto.interval, 3), reason=change)
        step_time = schedule.step_time
        if step_time:  # for `safepoint plan DIR`
            self.record.event("pace", step=step, step_time_s=round(step_time, 6))
        # the first step's time may include set-up: judge from two samples or more;
        # auto bounds its own overhead (max_overhead)
        if self._warned_overhead or not step_time or schedule.step_samples < 2 or auto:
            return
        self._warned_overhead = True
        interval = schedule.interval_seconds(step_time)
        note = interval and overhead_warning(schedule.describe(), interval=interval, stall=stall)
        if note:
            self.record.warning(note)

    def save_failed(
        self, step: int, error: SaveFailedError, *, reason: str, newest: CheckpointInfo | None
    ) -> None:
        """Apply ``on_save_error`` to a scheduled save that failed: re-raise ``error``
        ("stop"), or warn loudly and train on until the next due save ("continue"), but
        never past the end of the run without its final checkpoint."""
        if self.options.on_save_error == "stop":
            raise error
        self.record.event("save_skipped", step=step, reason=reason, error=str(error))
        if self.end_of_run(step) or reason == END_OF_RUN:
            raise SaveFailedError(
                f"the final save (step {step}) failed, so the run ends WITHOUT its final "
                f"checkpoint; {'the newest is ' + newest.name if newest else 'no checkpoint'} "
                f"(rerun the same command to resume and save again): {error}"
            ) from error
        self.schedule.failed(time.monotonic())  # time triggers wait a full interval
        log.error(
            "SAVE FAILED at step %d, training goes on WITHOUT a new checkpoint "
            "(on_save_error='continue'); the next save tries again: %s",
            step,
            error,
        )
