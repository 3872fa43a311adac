"""``safepoint prune``: apply a retention policy to a directory's checkpoints, by hand.

Only the policy's deletions of valid checkpoints (and, when asked, foreign ones) are
made; incomplete and corrupt folders are never touched, and never while a run holds
the directory's lock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from safepoint.app.runs import (
    checkpoints,
    policy_from_options,
    retention_view,
    run_directory,
    run_policy,
)
from safepoint.lock import RunLock
from safepoint.records import RunRecord
from safepoint.retention import RetentionPolicy
from safepoint.store import Store
from safepoint.validity import CheckpointInfo


@dataclass(frozen=True)
class Row:
    """One folder and what pruning does to it."""

    info: CheckpointInfo
    action: Literal["delete", "keep", "foreign", "untouched"]
    why: str = ""
    """Why it is kept (``keep`` rows)."""


@dataclass(frozen=True)
class PrunePlan:
    directory: Path
    rows: list[Row]

    @property
    def delete(self) -> list[CheckpointInfo]:
        return [r.info for r in self.rows if r.action == "delete"]

    @property
    def freed(self) -> int:
        return sum(i.size for i in self.delete)


def prune_policy(directory: str, options: Mapping[str, Any]) -> tuple[Path, RetentionPolicy]:
    """The directory and the policy to prune it by: the ``--keep-last``... ``options``
    over the policy the run used; ``ConfigError`` if neither gives one."""
    path = run_directory(directory, "give the run's --output-dir")
    policy = policy_from_options(run_policy(path, checkpoints(path)), options, required=True)
    assert policy is not None
    return path, policy


def plan_prune(path: Path, policy: RetentionPolicy, *, include_foreign: bool) -> PrunePlan:
    """What pruning ``path`` by ``policy`` would do now, folder by folder."""
    infos = checkpoints(path)
    why, delete, _ = retention_view(infos, policy, include_foreign=include_foreign)
    rows = []
    for i in infos:
        if i.name in delete:
            rows.append(Row(i, "delete"))
        elif i.name in why:
            rows.append(Row(i, "keep", why[i.name]))
        else:
            rows.append(Row(i, "foreign" if i.status == "foreign" else "untouched"))
    return PrunePlan(path, rows)


def prune(
    path: Path,
    policy: RetentionPolicy,
    *,
    include_foreign: bool,
    before: Callable[[PrunePlan], None] = lambda plan: None,
) -> PrunePlan:
    """Delete what the policy no longer keeps, under the run lock (``RunLockedError``
    while a run holds it: a live run prunes by itself). ``before`` sees the plan, made
    under the lock, before anything is deleted; each deletion goes to the run record."""
    with RunLock(path):
        plan = plan_prune(path, policy, include_foreign=include_foreign)
        before(plan)
        store, record = Store(path), RunRecord(path)
        for info in plan.delete:
            store.delete(info, allow_foreign=include_foreign)
            record.event(
                "delete", step=info.step, checkpoint=info.name, bytes=info.size, rule="prune"
            )
    return plan
