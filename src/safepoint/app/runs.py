"""One run's output directory as the commands see it: its checkpoints, the retention
policy it used, why each checkpoint is kept, and which one is best.

The one app module that speaks the retention API (``safepoint.retention``): ``ls``,
``prune``, ``plan``, ``report``, ``export`` and ``train``'s summary all come here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from safepoint.errors import CheckpointNotFoundError, ConfigError
from safepoint.options import Options
from safepoint.records import read_events
from safepoint.retention import (
    Candidate,
    RetentionPolicy,
    best_steps,
    next_deletions,
    plan,
    policy_from_json,
)
from safepoint.units import parse_size
from safepoint.validity import CheckpointInfo, scan

# ------------------------------------------------------------------ the directory


def run_directory(path: str | Path, hint: str) -> Path:
    """``path`` as a ``Path``; ``CheckpointNotFoundError`` (``hint`` says what to give)
    if it is no directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{directory}: no such directory; {hint}")
    return directory


def checkpoints(directory: Path) -> list[CheckpointInfo]:
    """The checkpoint folders of ``directory``, oldest first, less saves in progress."""
    return [i for i in scan(directory) if i.status != "staging"]


# ------------------------------------------------------------- the run's policy


def recorded_policy_doc(infos: Sequence[CheckpointInfo]) -> dict[str, Any] | None:
    """The ``policy`` the newest valid checkpoint that has one stored in its manifest, as
    stored (``Options.to_json``, or the older form that ``Options.from_json`` also
    reads); None when no checkpoint records one."""
    for info in reversed(infos):
        doc = info.manifest.info.get("policy") if info.valid and info.manifest else None
        if isinstance(doc, dict):
            return doc
    return None


def run_policy(
    directory: Path | None,
    infos: Sequence[CheckpointInfo],
    *,
    events: Iterable[Mapping[str, Any]] | None = None,
) -> RetentionPolicy | None:
    """The retention policy the run used: the one its newest valid checkpoint recorded,
    else the options of its newest start in the run record (``events``, else read from
    ``directory``); None when neither says.

    A policy stored in a checkpoint that does not hold raises ``ConfigError``; one in the
    record that does not hold is passed over (the record is for reports).
    """
    doc = recorded_policy_doc(infos)
    if doc is not None:
        return policy_from_json(doc)
    if events is None:
        events = read_events(directory) if directory is not None else ()
    config = None
    for e in events:
        if e.get("event") == "start" and isinstance(e.get("config"), dict):
            config = e["config"]
    if config is None:
        return None
    try:
        return policy_from_json(config)
    except ConfigError:
        return None  # the record is for reports: a policy that does not hold is passed over


POLICY_KEYS = (*(f.name for f in fields(RetentionPolicy) if f.name != "max_bytes"), "max_disk")
"""The retention options, as ``ls``, ``prune`` and ``plan`` take them (``--keep-last``...)."""


def policy_from_options(
    base: RetentionPolicy | None, options: Mapping[str, Any], *, required: bool
) -> RetentionPolicy | None:
    """The policy given by the ``--keep-last``... options (``options``: keep_last,
    keep_best, metric, mode, keep_every, max_disk; None for not given) over ``base``,
    the one the run used. None when neither gives one, unless ``required``."""
    given = {k: v for k, v in options.items() if v is not None}
    if "max_disk" in given:
        given["max_bytes"] = parse_size(given.pop("max_disk"), what="--max-disk")
    if not given and base is None:
        if required:
            raise ConfigError(
                "no retention policy given and none recorded in the checkpoints; pass "
                "--keep-last N (and/or --keep-best, --keep-every, --max-disk)"
            )
        return None
    return RetentionPolicy(**{**(asdict(base) if base else {}), **given})


def recorded_options(infos: Sequence[CheckpointInfo]) -> Options | None:
    """The ``Options`` the newest checkpoint that recorded them was saved with, or None
    (also None when they do not hold: a tool reading them must not fail on that)."""
    doc = recorded_policy_doc(infos)
    try:
        return None if doc is None else Options.from_json(doc)
    except ConfigError:
        return None


def by_metric(metric: str, mode: str = "min") -> RetentionPolicy:
    """A policy that only ranks: the best checkpoint by ``metric`` (lower is better
    with ``mode`` min)."""
    return RetentionPolicy(keep_best=1, metric=metric, mode=mode)  # type: ignore[arg-type]


# ---------------------------------------------------------------- what it keeps


def candidates(infos: Iterable[CheckpointInfo]) -> list[Candidate]:
    return [Candidate(i.step, i.size, i.metrics) for i in infos]


def best_checkpoint(
    infos: Iterable[CheckpointInfo], policy: RetentionPolicy
) -> CheckpointInfo | None:
    """The valid checkpoint best by ``policy``'s metric and mode (of equals, the newer);
    None when no valid checkpoint has that metric."""
    valid = [i for i in infos if i.valid]
    ranked = best_steps(candidates(valid), policy)
    return next(i for i in valid if i.step == ranked[0]) if ranked else None


def keep_reasons(
    infos: Iterable[CheckpointInfo], policy: RetentionPolicy
) -> dict[int, tuple[str, ...]]:
    """Step -> why ``policy`` keeps that valid checkpoint (latest, best, last-N, ...);
    the valid checkpoints it would delete are absent."""
    return plan(candidates(i for i in infos if i.valid), policy).keep


def retention_view(
    infos: Sequence[CheckpointInfo], policy: RetentionPolicy, *, include_foreign: bool = False
) -> tuple[dict[str, str], list[str], list[str]]:
    """For ``ls`` and ``prune``: why each folder is kept, what the policy deletes now, and
    what the next save would delete (folder names).

    Only valid checkpoints (and foreign ones with ``include_foreign``) are candidates;
    the newest valid safepoint checkpoint is never deleted.
    """
    eligible = [i for i in infos if i.valid or (include_foreign and i.status == "foreign")]
    by_step = {i.step: i for i in eligible}
    cands = [
        Candidate(i.step, i.size, i.metrics if i.valid else _foreign_metrics(i))
        for i in by_step.values()
    ]
    decision = plan(cands, policy)
    newest_valid = max((i.step for i in eligible if i.valid), default=None)
    why = {by_step[s].name: ", ".join(r) for s, r in decision.keep.items()}
    delete = [by_step[s].name for s in decision.delete if s != newest_valid]
    if newest_valid is not None and by_step[newest_valid].name not in why:
        why[by_step[newest_valid].name] = "newest valid"
    kept = [c for c in cands if by_step[c.step].name in why]
    size = max((c.size for c in kept), default=0)
    step = max((c.step for c in kept), default=0) + 1
    nxt = [by_step[s].name for s in next_deletions(kept, policy, step=step, size=size)]
    return why, delete, nxt


def _foreign_metrics(info: CheckpointInfo) -> dict[str, float]:
    """Metrics the stock Trainer logged at this checkpoint's step (trainer_state.json)."""
    try:
        state = json.loads((info.path / "trainer_state.json").read_text())
        history = state.get("log_history") or []
    except (OSError, ValueError, AttributeError):
        return {}
    metrics: dict[str, float] = {}
    for entry in history:
        if isinstance(entry, dict) and entry.get("step") == info.step:
            metrics.update(
                {
                    k: float(v)
                    for k, v in entry.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
                }
            )
    return metrics
