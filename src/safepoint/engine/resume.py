"""Which checkpoint to resume from, and loading it: one implementation for every entry.

The plain loop (``Checkpointer.restore``), the Trainer callback and ``safepoint train``
all pick through ``Resumer.pick``, so the same damaged or foreign checkpoint gives the
same error everywhere:

- a path or step that is not there: ``CheckpointNotFoundError``;
- a folder safepoint did not write, or one of another configuration (fingerprint), or
  one the live objects do not fit: ``IncompatibleCheckpointError``;
- a damaged or unfinished one named explicitly: ``CorruptCheckpointError``.

Picking the newest, a damaged or misfitting checkpoint is skipped for the next older
one with a warning; if none fits the model, the first misfit is raised: training from
scratch would hide a changed model.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from safepoint.distributed import Ranks
from safepoint.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from safepoint.options import Options
from safepoint.records import RunRecord, last_reached_step
from safepoint.restore import apply
from safepoint.store import Store
from safepoint.validity import CheckpointInfo, inspect, newest_first, scan

if TYPE_CHECKING:
    from safepoint.engine.replica import Replica

log = logging.getLogger("safepoint")

T = TypeVar("T")


@dataclass(frozen=True)
class Resumed(Generic[T]):
    info: CheckpointInfo
    loaded: T
    skipped: dict[str, str] = field(default_factory=dict)
    """Newer checkpoints passed over, and why."""


class Resumer:
    """Picks and loads the checkpoint a run resumes from."""

    def __init__(self, store: Store, record: RunRecord, options: Options, ranks: Ranks) -> None:
        self.store = store
        self.record = record
        self.options = options
        self.ranks = ranks
        self.source: Replica | None = None  # where a fresh machine gets checkpoints
        # What the previous process reached gives "steps lost" when this one resumes.
        self.reached_before = last_reached_step(store.directory)

    def pick(
        self,
        checkpoint: str | os.PathLike[str] | int | None,
        load: Callable[[CheckpointInfo], T],
    ) -> Resumed[T] | None:
        """``load`` the checkpoint to resume from: ``checkpoint`` (a path or a step), or
        the newest one that loads. None when there is nothing to resume from. ``load``
        raises ``CorruptCheckpointError`` / ``IncompatibleCheckpointError`` to pass."""
        if checkpoint is None and self.source is not None:
            self.source.fetch_if_empty()  # a fresh machine: the newest remote one, verified
        if checkpoint is None and self.ranks.active:
            # Every rank resumes from the checkpoint rank 0 picks; none of them guesses.
            checkpoint = self.ranks.agree_on_checkpoint(
                lambda: next((i.step for i in newest_first(self.store.directory)), None)
            )
            if checkpoint is None:
                return None
        if checkpoint is not None:
            info = self.explicit(checkpoint)
            return self._resumed(info, load(info), {})
        failed: dict[str, str] = {}
        misfit: IncompatibleCheckpointError | None = None
        for info in newest_first(self.store.directory, deep=self.options.verify_on_resume):
            self.check_ours(info)
            try:
                loaded = load(info)
            except (CorruptCheckpointError, IncompatibleCheckpointError) as e:
                log.warning("skipping %s: %s; trying the next older checkpoint", info.path, e)
                failed[info.name] = str(e)
                if isinstance(e, IncompatibleCheckpointError):
                    misfit = misfit or e
                continue
            return self._resumed(info, loaded, failed)
        if misfit is not None:
            raise misfit
        return None

    def explicit(self, checkpoint: str | os.PathLike[str] | int) -> CheckpointInfo:
        """The checkpoint named by a path or a step, checked (``check_resumable``), of
        this configuration."""
        path = self.store.path_for(checkpoint) if isinstance(checkpoint, int) else Path(checkpoint)
        info = check_resumable(path, self.store.directory, deep=self.options.verify_on_resume)
        self.check_ours(info)
        return info

    def check_ours(self, info: CheckpointInfo) -> None:
        """Raise ``IncompatibleCheckpointError`` if another configuration wrote ``info``."""
        mine = self.options.fingerprint
        theirs = info.manifest.fingerprint if info.manifest else None
        if mine and theirs and theirs != mine:
            raise IncompatibleCheckpointError(
                f"{info.path} was written by another configuration (fingerprint {theirs}, "
                f"this run {mine}); use the same configuration or another output directory"
            )

    def load_state(
        self, info: CheckpointInfo, state: MutableMapping[str, Any], *, rng: bool
    ) -> dict[str, Any]:
        """Load ``info`` into ``state`` (and this rank's RNG states when ``rng``)."""
        progress = apply(info.path, state, rng=rng, manifest=info.manifest)
        self.ranks.restore_rank_rng(info.path, rng=rng)
        return progress

    def _resumed(self, info: CheckpointInfo, loaded: T, failed: Mapping[str, str]) -> Resumed[T]:
        log.info("resumed from %s (step %d)", info.path, info.step)
        reached = self.reached_before
        self.record.event(
            "resume",
            step=info.step,
            checkpoint=info.name,
            reached=reached,
            steps_lost=None if reached is None else max(reached - info.step, 0),
            skipped=self._skipped_newer(info.step, failed),
        )
        return Resumed(info, loaded, dict(failed))

    def _skipped_newer(self, step: int, failed: Mapping[str, str]) -> list[dict[str, str]]:
        """Why each folder newer than ``step`` was passed over, for the run record."""
        skipped = []
        for i in self.store.scan():
            if i.step <= step or i.status == "staging":
                continue
            problem = failed.get(i.name) or "; ".join(i.problems)
            if i.valid and not problem:
                problem = "checksum verification failed"
            skipped.append({"checkpoint": i.name, "status": i.status, "problem": problem})
        return skipped


def say_resumed(info: CheckpointInfo) -> int:
    """The plain ``Checkpointer.restore`` resumed from ``info``: its INFO line (``_resumed``)
    is hidden by Python's default logging, so say it on stderr then, as the Trainer
    callback does; otherwise a resume looks like a loop that jumped ahead. Its step."""
    if not (log.isEnabledFor(logging.INFO) and log.hasHandlers()):
        print(f"safepoint: resumed from {info.path} (step {info.step})", file=sys.stderr)
    return info.step


def check_resumable(path: Path, directory: Path, *, deep: bool) -> CheckpointInfo:
    """The checkpoint at ``path``, or the error that says why no run can resume from it
    (the same for every entry point: see the module docstring). ``directory``: the run
    whose valid checkpoints a missing ``path`` lists."""
    if not os.path.lexists(path):
        valid = scan(directory) if directory.is_dir() else []
        have = ", ".join(i.name for i in valid if i.valid) or "none"
        raise CheckpointNotFoundError(
            f"{path}: no such checkpoint; valid checkpoints in {directory}: {have}"
        )
    info = inspect(path, deep=deep)
    if info.status == "foreign":  # e.g. the stock Trainer's: never resumed from
        from safepoint.foreign import describe_foreign

        raise IncompatibleCheckpointError(
            f"{path} was not written by safepoint ({'; '.join(info.problems)}); "
            f"{describe_foreign(path)}"
        )
    if not info.valid:
        raise CorruptCheckpointError(
            f"{path} is {info.status}: {'; '.join(info.problems)}; resume from another "
            "checkpoint or run `safepoint verify` for details"
        )
    if info.thin:  # valid, but its optimizer and RNG state were dropped (keep_full)
        full = [i.name for i in scan(directory) if i.resumable] if directory.is_dir() else []
        raise IncompatibleCheckpointError(
            f"{path} is thin (weights only: its optimizer, scheduler and RNG state were "
            f"dropped by keep_full), so no run resumes from it; resume from a full one "
            f"({', '.join(full) or 'none'}) or export it"
        )
    return info
