"""The Checkpointer's policy glue: disk pre-flight, save-error handling, ``auto`` feedback.

These functions are methods of ``Checkpointer`` (bound in its class body), kept here so
that the engine file stays a thin orchestrator. Each takes the checkpointer first.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from safepoint.disk import (
    DiskCheck,
    block_size,
    check_free_space,
    estimate_file_sizes,
    is_recoverable,
    on_disk,
    planned_saves,
    preflight_warnings,
    require_fits,
    used_bytes,
)
from safepoint.errors import DiskBudgetError, SaveFailedError
from safepoint.plan import overhead_warning
from safepoint.retention import Candidate, free_before_commit, policy_to_json
from safepoint.store import CheckpointInfo
from safepoint.units import format_size

if TYPE_CHECKING:
    from safepoint.checkpointer import Checkpointer
    from safepoint.snapshot import Snapshot, TensorFile

log = logging.getLogger("safepoint")


def preflight(
    self: Checkpointer,
    state: Mapping[str, Any],
    *,
    extra_files: Mapping[str, TensorFile | bytes] | None = None,
    progress: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
) -> DiskCheck | None:
    """Check, before training, that the checkpoints of ``state`` will fit on the disk.

    Estimates one checkpoint's size from ``state`` (no copy), derives the kept set from
    the retention policy and the schedule, and raises ``DiskBudgetError`` with the
    numbers and the options when the kept set plus one save in flight cannot fit.
    Runs once per Checkpointer (``restore`` calls it); later calls return the first
    result. Skipped with ``check_disk=False``. Integrations that add files to their
    snapshots (adapter weights) pass them as ``extra_files`` (uncopied, as captured),
    with the ``progress`` and manifest ``info`` their saves will carry.
    """
    if self._preflight is not None or not self.check_disk:
        return self._preflight
    # Measured (issue #12, `safepoint train` on the tiny model, 20 steps, save every 10):
    # the old estimate said 47,490 B for LoRA checkpoints of 86,782-90,016 B, and 730,822 B
    # for --full ones of 2.14 MB, because accelerate's optimizer wrapper hid AdamW's
    # state and trainer_state.json was left out; it now says 90,123 B and 2,141,054 B.
    # Estimated before training, not measured at the first save: a run that cannot fit
    # must be refused before it writes anything. ``recheck`` still compares the first
    # real checkpoint with the estimate, for what no estimate can foresee.
    sizes = estimate_file_sizes(
        state, extra_files=extra_files, progress=progress, manifest=_manifest_fields(self, info)
    )
    size = sum(sizes.values())
    check = replace(_check(self, on_disk(sizes, block_size(self.directory))), files_bytes=size)
    self._preflight = check
    self.record.event(
        "preflight",
        checkpoint_bytes=size,
        disk_bytes=check.checkpoint_bytes,
        kept=check.kept,
        needed_bytes=check.needed,
        free_bytes=check.free,
        held_bytes=check.held,
    )
    if self.schedule.auto is not None:
        note = self.schedule.auto.assume(size)
        log.info("%s", note)
        self.record.event("schedule", interval_s=self.schedule.auto.interval, reason=note)
    for note in preflight_warnings(check, self.policy):
        log.warning("%s", note)
        self.record.event("warning", message=note)
    require_fits(check, self.policy)
    return check


def _check(self: Checkpointer, size: int) -> DiskCheck:
    held = sum(used_bytes(i.path) for i in self.store.scan() if i.valid and self._ours(i))
    kinds = {t.kind for t in self.schedule.triggers}
    keep_every, total = self.policy.keep_every, self.total_steps
    return check_free_space(
        self.directory,
        size,
        self.policy,
        saves=planned_saves(kinds, self.schedule.step_interval(), total),
        milestones=total // keep_every if keep_every and total else 0,
        held=held,
    )


def _manifest_fields(self: Checkpointer, info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The manifest of a save of this run, with values of typical length where the save
    will know them only then (metrics, timings, byte counts)."""
    from safepoint.checkpointer import library_versions

    typical = 1 / 3  # a float of full precision: 18 characters in JSON
    timing = ("wait_s", "snapshot_s", "stall_s") if self._async is not None else ()
    return {
        "step": self.total_steps or 0,
        "reason": "end of training",
        "metrics": {"loss": typical, self.policy.metric: typical},
        "fingerprint": self.fingerprint,
        "versions": library_versions(),
        "info": {
            **(info or {}),
            "bytes": 10**8,
            "mode": "inline" if timing else "sync",
            **{k: 0.123456 for k in timing},
            "policy": self._policy_json(),
            "write_s": 0.123456,
        },
    }


def recheck(self: Checkpointer, info: CheckpointInfo) -> None:
    """After the first commit: if the real checkpoint is more than 10% larger than the
    pre-flight estimate, check the disk again with the real size and warn (once).

    A safety net for states the estimate cannot foresee (an optimizer outside its
    table, files an integration adds later); it warns rather than stops, because the
    run now holds a checkpoint to resume from and the save that fails frees by policy.
    """
    first, self._preflight_rechecked = not self._preflight_rechecked, True
    check = self._preflight
    if not first or check is None or info.size <= 1.1 * check.files_bytes:
        return
    real = _check(self, used_bytes(info.path))
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
        log.warning("%s", note)
        self.record.event("warning", message=note)


def scheduled_save(
    self: Checkpointer,
    step: int,
    state: Mapping[str, Any],
    metrics: Mapping[str, float] | None,
    reason: str,
) -> CheckpointInfo | None:
    """``save`` for a save the schedule asked for; ``on_save_error`` decides on failure."""
    try:
        return self.save(step, state, metrics=metrics, reason=reason)
    except SaveFailedError as e:
        self.save_failed(step, e, reason=reason)
        return None


def save_failed(self: Checkpointer, step: int, error: SaveFailedError, *, reason: str) -> None:
    """Apply ``on_save_error`` to a scheduled save that failed: re-raise ``error``
    ("stop"), or warn loudly and let training go on until the next due save ("continue").

    For integrations that commit their own snapshots: call it from ``except
    SaveFailedError`` around ``commit`` of a scheduled save.
    """
    if self.on_save_error == "stop":
        raise error
    if reason == "end of training" or (self.total_steps and step >= self.total_steps):
        # Going on would end the run with exit 0 and no final checkpoint.
        newest = next((i for i in reversed(self.store.scan()) if i.valid), None)
        self.record.event("save_skipped", step=step, reason=reason, error=str(error))
        raise SaveFailedError(
            f"the final save (step {step}) failed, so the run ends WITHOUT its final "
            f"checkpoint; {'the newest is ' + newest.name if newest else 'no checkpoint'} "
            f"(rerun the same command to resume and save again): {error}"
        ) from error
    self.schedule.failed(time.monotonic())
    log.error(
        "SAVE FAILED at step %d, training goes on WITHOUT a new checkpoint "
        "(on_save_error='continue'); the next save tries again: %s",
        step,
        error,
    )
    self.record.event("save_skipped", step=step, reason=reason, error=str(error))


def delete(self: Checkpointer, info: CheckpointInfo) -> bool:
    """Retention's deletion of ``info``; True if it is gone. Never raises ``OSError``:
    the new checkpoint is committed, so a folder that will not go (an NFS ``.nfsXXXX``
    file, an immutable file, EIO) is a warning, in every ``on_save_error`` mode."""
    try:
        self.store.delete(info)
        return True
    except OSError as e:
        where = getattr(e, "filename", None) or info.path
        if os.path.lexists(info.path):
            state = f"{info.name} is kept"
        else:  # renamed out of sight, then not fully removed: the next start sweeps it
            state = f"{info.name} is out of the run, but files of it remain"
        note = (
            f"retention could not delete {info.name} ({e.strerror or e}: {where}); {state}; "
            "the new checkpoint is committed and training goes on; remove it by hand if "
            "the disk is short"
        )
        log.warning("%s", note)
        self.record.event("warning", message=note)
        return not os.path.lexists(info.path)


def store_commit(self: Checkpointer, snapshot: Snapshot, **kwargs: Any) -> CheckpointInfo:
    """``store.commit``; after a full disk or an I/O error, free space and retry once.

    Space is freed by deleting what the retention policy would delete once this save is
    committed, sparing the newest and the best checkpoints (the save may fail again).
    """
    _check_metric(self, snapshot)
    try:
        info = self.store.commit(snapshot, **kwargs)
        recheck(self, info)
        return info
    except SaveFailedError as e:
        if not is_recoverable(e):
            raise
        first = e
    freed = _free_for(self, snapshot)
    log.warning("%s; freed %s by the retention policy, retrying once", first, format_size(freed))
    self.record.event("save_retry", step=snapshot.step, error=str(first), freed_bytes=freed)
    try:
        return self.store.commit(snapshot, **kwargs)
    except SaveFailedError as e:
        newest = next((i.name for i in reversed(self.store.scan()) if i.valid), None)
        resume = f"rerun the same command to resume from {newest}" if newest else "no checkpoint"
        raise SaveFailedError(
            f"{e} (retried once after freeing {format_size(freed)} by the retention policy; "
            f"{resume})"
        ) from e


def _check_metric(self: Checkpointer, snapshot: Snapshot) -> None:
    """Warn once when keep_best ranks by a metric that the scheduled saves do not carry.

    An emergency save (a stop signal, an exception) happens between evaluations: it has
    no metric by design and is never ranked best, so it is no sign of a misconfiguration.
    """
    policy = self.policy
    if not policy.keep_best or policy.metric in snapshot.metrics or self._warned_metric:
        return
    if snapshot.reason == "emergency" or snapshot.reason.startswith("exception"):
        return
    self._warned_metric = True
    have = ", ".join(sorted(snapshot.metrics)) or "none"
    note = (
        f"keep_best={policy.keep_best} ranks checkpoints by {policy.metric!r}, but the save "
        f"of step {snapshot.step} has no such metric (it has: {have}); {self.metric_hint}, "
        "else only the newest checkpoints are kept"
    )
    log.warning("%s", note)
    self.record.event("warning", message=note)


def _free_for(self: Checkpointer, snapshot: Snapshot) -> int:
    valid = [i for i in self.store.scan() if i.valid and self._ours(i)]
    incoming = Candidate(snapshot.step, snapshot.nbytes, dict(snapshot.metrics))
    steps = free_before_commit(
        [Candidate(i.step, i.size, i.metrics) for i in valid], self.policy, incoming
    )
    freed = 0
    for info in valid:
        if info.step in steps:
            if not delete(self, info):
                continue
            freed += info.size
            self.record.event(
                "delete",
                step=info.step,
                checkpoint=info.name,
                bytes=info.size,
                rule="free space for a failed save",
            )
    return freed


def saved(self: Checkpointer, step: int, stall: float) -> None:
    """After a save blocked training ``stall`` s: feed ``auto``, warn once if costly."""
    change = self.schedule.saved(step, time.monotonic(), stall=stall)
    auto = self.schedule.auto
    if change and auto is not None:
        log.info("%s", change)
        self.record.event("schedule", interval_s=round(auto.interval, 3), reason=change)
    step_time = self.schedule.step_time
    if step_time:  # for `safepoint plan DIR`
        self.record.event("pace", step=step, step_time_s=round(step_time, 6))
    # the first step's time may include set-up: judge from two samples or more
    # auto bounds its own overhead (max_overhead)
    if self._warned_overhead or not step_time or self.schedule.step_samples < 2:
        return
    if self.schedule.auto is not None:
        return
    self._warned_overhead = True
    interval = self.schedule.interval_seconds(step_time)
    if interval is None:
        return
    note = overhead_warning(self.schedule.describe(), interval=interval, stall=stall)
    if note:
        log.warning("%s", note)
        self.record.event("warning", message=note)


def policy_json(self: Checkpointer) -> dict[str, Any]:
    """The policy of this run, stored in each manifest's ``info`` for ``ls`` and ``plan``."""
    auto = self.schedule.auto
    return {
        **policy_to_json(self.policy),
        "save_every": self.schedule.describe(),
        "save_every_spec": ",".join(_spec(t.kind, t.value) for t in self.schedule.triggers),
        "total_steps": self.total_steps,
        "mtbf_s": self.schedule.mtbf,
        "max_overhead": auto.max_overhead if auto else None,
        "on_save_error": self.on_save_error,
    }


def _spec(kind: str, value: float) -> str:
    if kind == "steps":
        return str(int(value))
    if kind == "fraction":
        return f"{value:g}%"
    if kind == "time":
        return f"{value:g}s"
    return kind
