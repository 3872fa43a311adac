"""Before training: will the checkpoints this run keeps fit on the disk?

Estimated before training, not measured at the first save: a run that cannot fit must
be refused before it writes anything. Measured (issue #12, ``safepoint train`` on the
tiny model, 20 steps, save every 10): the old estimate said 47,490 B for LoRA
checkpoints of 86,782-90,016 B, and 730,822 B for --full ones of 2.14 MB, because
accelerate's optimizer wrapper hid AdamW's state and trainer_state.json was left out;
it now says 90,123 B and 2,141,054 B. ``recheck`` still compares the first real
checkpoint with the estimate, for what no estimate can foresee.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from safepoint.disk import (
    DiskCheck,
    block_size,
    check_free_space,
    estimate_file_sizes,
    on_disk,
    preflight_warnings,
    require_fits,
    used_bytes,
)
from safepoint.errors import DiskBudgetError
from safepoint.manifest import library_versions
from safepoint.options import Options
from safepoint.records import RunRecord
from safepoint.retention import RetentionPolicy, Saves
from safepoint.store import Store
from safepoint.units import format_size
from safepoint.validity import CheckpointInfo

if TYPE_CHECKING:
    from safepoint.engine.decide import Decider
    from safepoint.snapshot import TensorFile

log = logging.getLogger("safepoint")


class Preflight:
    """The disk check of one run: once before training, once after the first save."""

    def __init__(
        self,
        store: Store,
        record: RunRecord,
        options: Options,
        decider: Decider,
        ours: Callable[[CheckpointInfo], bool],
    ) -> None:
        self.store = store
        self.record = record
        self.options = options
        self.policy = RetentionPolicy.from_options(options)
        self.decider = decider
        self.ours = ours
        self.result: DiskCheck | None = None
        self._rechecked = False

    def run(
        self,
        state: Mapping[str, Any],
        *,
        extra_files: Mapping[str, TensorFile | bytes] | None = None,
        progress: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> DiskCheck | None:
        """Estimate one checkpoint of ``state`` (no copy), derive the kept set from the
        retention rules and the schedule, and raise ``DiskBudgetError`` with the numbers
        and the options when the kept set plus one save in flight cannot fit. Once per
        run: later calls return the first result. ``extra_files``: what an integration
        adds to its snapshots (adapter weights), uncopied, with the ``progress`` and the
        manifest ``info`` its saves will carry."""
        if self.result is not None or not self.options.check_disk:
            return self.result
        sizes = estimate_file_sizes(
            state, extra_files=extra_files, progress=progress, manifest=self._manifest(info)
        )
        size = sum(sizes.values())
        check = replace(
            self._check(on_disk(sizes, block_size(self.store.directory))), files_bytes=size
        )
        self.result = check
        self.record.event(
            "preflight",
            checkpoint_bytes=size,
            disk_bytes=check.checkpoint_bytes,
            kept=check.kept,
            needed_bytes=check.needed,
            free_bytes=check.free,
            held_bytes=check.held,
        )
        auto = self.decider.schedule.auto
        if auto is not None:
            note = auto.assume(size)
            log.info("%s", note)
            self.record.event("schedule", interval_s=auto.interval, reason=note)
        for note in preflight_warnings(check, self.policy):
            self.record.warning(note)
        require_fits(check, self.policy)
        return check

    def _check(self, size: int) -> DiskCheck:
        held = sum(used_bytes(i.path) for i in self.store.scan() if i.valid and self.ours(i))
        schedule, total = self.decider.schedule, self.decider.total_steps
        saves = Saves(
            count=schedule.planned_saves(),
            total_steps=total,
            step_interval=schedule.step_interval(),
        )
        return check_free_space(self.store.directory, size, self.policy, saves=saves, held=held)

    def _manifest(self, info: Mapping[str, Any] | None) -> dict[str, Any]:
        """The manifest of a save of this run, with values of typical length where the
        save will know them only then (metrics, timings, byte counts)."""
        typical = 1 / 3  # a float of full precision: 18 characters in JSON
        timing = ("wait_s", "snapshot_s", "stall_s") if self.options.async_save else ()
        return {
            "step": self.decider.total_steps or 0,
            "reason": "end of training",
            "metrics": {"loss": typical, self.policy.metric: typical},
            "fingerprint": self.options.fingerprint,
            "versions": library_versions(),
            "info": {
                **(info or {}),
                "bytes": 10**8,
                "mode": "inline" if timing else "sync",
                **{k: 0.123456 for k in timing},
                "policy": self.options.to_json(),
                "write_s": 0.123456,
            },
        }

    def recheck(self, info: CheckpointInfo) -> None:
        """After the first commit: if the real checkpoint is more than 10% larger than
        the estimate, check the disk again with the real size and warn (once).

        It warns rather than stops: the run now holds a checkpoint to resume from, and
        the save that fails frees space by the policy.
        """
        first, self._rechecked = not self._rechecked, True
        check = self.result
        if not first or check is None or info.size <= 1.1 * check.files_bytes:
            return
        real = self._check(used_bytes(info.path))
        self.record.event(
            "preflight",
            step=info.step,
            checkpoint_bytes=info.size,
            estimate_bytes=check.files_bytes,
            disk_bytes=real.checkpoint_bytes,
            kept=real.kept,
            needed_bytes=real.needed,
            free_bytes=real.free,
            held_bytes=real.held,
        )
        if real.fits:
            return
        try:
            require_fits(real, self.policy)
        except DiskBudgetError as e:
            note = (
                f"{info.path.name} takes {format_size(info.size)}, more than the "
                f"~{format_size(check.files_bytes)} estimated before training: {e}"
            )
            self.record.warning(note)
