"""What to keep: a pure function from the committed checkpoints to a keep/delete plan.

Rules combine by union (a checkpoint is kept if any rule keeps it), then the byte
budget trims the oldest checkpoints that no protection covers. Protected always: the
newest valid checkpoint, and the best one when the policy asks for best
(``keep_best >= 1``): with ``keep_best=0``, ``keep_last=N`` holds exactly N, which is
what the disk pre-flight counts. Only valid checkpoints are ever candidates for
deletion, and the plan never leaves zero valid checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from safepoint.errors import ConfigError


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints to keep."""

    keep_last: int | None = None
    """Keep the newest N checkpoints; None keeps all."""
    keep_best: int = 0
    """Keep the best K by ``metric`` (the best one is then protected even from the byte
    budget); 0 ranks nothing: no checkpoint is kept, nor called best, for its metric."""
    metric: str = "eval_loss"
    """The metric that ranks checkpoints (a key of the metrics saved with each one)."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (``min``) or higher (``max``) ``metric`` is better."""
    keep_every: int | None = None
    """Keep every checkpoint whose step is a multiple of this (milestones)."""
    max_bytes: int | None = None
    """Budget for all checkpoints together; the oldest unprotected go first."""

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(
                f"keep_last={self.keep_last}: keep at least 1 checkpoint (None keeps all)"
            )
        if self.keep_best < 0:
            raise ConfigError(f"keep_best={self.keep_best} must be 0 or more")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"mode={self.mode!r} must be 'min' or 'max'")
        if self.keep_every is not None and self.keep_every < 1:
            raise ConfigError(f"keep_every={self.keep_every} must be a step count >= 1")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ConfigError(f"max_disk={self.max_bytes} must be larger than zero")


@dataclass(frozen=True)
class Candidate:
    """The facts retention needs about one valid checkpoint."""

    step: int
    size: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RetentionPlan:
    keep: dict[int, tuple[str, ...]]
    """Step -> the reasons it is kept (latest, best, best-K, last-N, milestone)."""
    delete: tuple[int, ...]
    """Steps to delete, oldest first."""
    over_budget: bool = False
    """True if the protected checkpoints alone exceed ``max_bytes``."""


def best_steps(candidates: Sequence[Candidate], policy: RetentionPolicy) -> list[int]:
    """Steps that have ``policy.metric``, best first (ties: the newer wins)."""
    scored = [c for c in candidates if policy.metric in c.metrics]
    sign = 1 if policy.mode == "min" else -1
    scored.sort(key=lambda c: (sign * c.metrics[policy.metric], -c.step))
    return [c.step for c in scored]


def plan(candidates: Sequence[Candidate], policy: RetentionPolicy) -> RetentionPlan:
    """Decide which of ``candidates`` (valid checkpoints) to keep and which to delete."""
    by_step = sorted(candidates, key=lambda c: c.step)
    if not by_step:
        return RetentionPlan({}, ())
    reasons: dict[int, list[str]] = {c.step: [] for c in by_step}
    reasons[by_step[-1].step].append("latest")
    ranked = best_steps(by_step, policy) if policy.keep_best else []
    if ranked:
        reasons[ranked[0]].append("best")
        for step in ranked[1 : policy.keep_best]:
            reasons[step].append(f"best-{policy.keep_best}")
    keep_last = len(by_step) if policy.keep_last is None else policy.keep_last
    for c in by_step[-keep_last:]:
        reasons[c.step].append(f"last-{keep_last}" if policy.keep_last else "all")
    if policy.keep_every:
        for c in by_step:
            if c.step % policy.keep_every == 0:
                reasons[c.step].append("milestone")

    over = False
    if policy.max_bytes is not None:
        protected = {by_step[-1].step, *ranked[:1]}
        size = {c.step: c.size for c in by_step}
        used = sum(size[s] for s, r in reasons.items() if r)
        for c in by_step:  # oldest first
            if used <= policy.max_bytes:
                break
            if reasons[c.step] and c.step not in protected:
                reasons[c.step] = []
                used -= size[c.step]
        over = used > policy.max_bytes
    keep = {s: tuple(r) for s, r in reasons.items() if r}
    delete = tuple(s for s, r in reasons.items() if not r)
    return RetentionPlan(keep, delete, over)


def next_deletions(
    candidates: Sequence[Candidate], policy: RetentionPolicy, *, step: int, size: int = 0
) -> tuple[int, ...]:
    """What committing a checkpoint at ``step`` (no metrics yet) would make retention delete."""
    return plan([*candidates, Candidate(step, size)], policy).delete


def free_before_commit(
    candidates: Sequence[Candidate], policy: RetentionPolicy, incoming: Candidate
) -> tuple[int, ...]:
    """Steps that may be deleted *before* ``incoming`` is committed, to make room for it.

    What the policy would delete once ``incoming`` is committed, except the newest and
    (with ``keep_best``) the best of ``candidates``: the save may still fail, and then
    they are what resume needs. Never all of ``candidates``.
    """
    if not candidates:
        return ()
    decision = plan([*candidates, incoming], policy)
    best = best_steps(candidates, policy)[:1] if policy.keep_best else []
    protected = {max(c.step for c in candidates), *best}
    return tuple(s for s in decision.delete if s not in protected and s != incoming.step)


def policy_to_json(policy: RetentionPolicy) -> dict[str, object]:
    """The policy as JSON, stored with each checkpoint so that ``ls`` can explain it."""
    return {
        "keep_last": policy.keep_last,
        "keep_best": policy.keep_best,
        "metric": policy.metric,
        "mode": policy.mode,
        "keep_every": policy.keep_every,
        "max_bytes": policy.max_bytes,
    }


def policy_from_json(doc: Mapping[str, object]) -> RetentionPolicy:
    """Inverse of ``policy_to_json``; unknown keys are ignored, bad values raise ConfigError."""
    fields = ("keep_last", "keep_best", "metric", "mode", "keep_every", "max_bytes")
    try:
        return RetentionPolicy(**{k: doc[k] for k in fields if k in doc})  # type: ignore[arg-type]
    except TypeError as e:
        raise ConfigError(f"unreadable retention policy {dict(doc)!r} ({e})") from e
