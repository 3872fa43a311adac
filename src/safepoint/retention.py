"""What to keep: small rules joined by one planner. Pure: no I/O.

Each rule answers, for the committed checkpoints of a run, "which of these do I keep,
and why" (as Orbax's preservation policies do); a checkpoint is kept if any rule keeps
it. Then the byte budget trims the oldest checkpoints that no protection covers.
Protected always: the newest valid checkpoint, and the best one when the policy asks
for best (``keep_best >= 1``): with ``keep_best=0``, ``keep_last=N`` holds exactly N,
which is what the disk pre-flight counts. The plan never leaves zero checkpoints.

A new rule is one class here (``keep`` and ``bound``), one field of ``RetentionPolicy``
that builds it in ``rules``, and one field of ``Options``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from safepoint.errors import ConfigError
from safepoint.options import Options
from safepoint.plan import Saves


@dataclass(frozen=True)
class Candidate:
    """The facts retention needs about one valid checkpoint."""

    step: int
    size: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    thin: bool = False
    """Thinned already (``thinning.py``): ``size`` is what it holds now."""


class Rule(Protocol):
    """One reason to keep checkpoints."""

    def keep(self, by_step: Sequence[Candidate]) -> Iterator[tuple[int, str]]:
        """(step, label) of each of ``by_step`` (oldest first) this rule keeps."""
        ...

    def bound(self, saves: Saves) -> int | None:
        """The most checkpoints this rule alone holds at once (None: unbounded)."""
        ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class KeepLast:
    n: int | None  # None: all

    def keep(self, by_step: Sequence[Candidate]) -> Iterator[tuple[int, str]]:
        label = "all" if self.n is None else f"last-{self.n}"
        for c in by_step[-(self.n or len(by_step)) :]:
            yield c.step, label

    def bound(self, saves: Saves) -> int | None:
        return saves.count if self.n is None else self.n

    def describe(self) -> str:
        return "keep all" if self.n is None else f"keep_last={self.n}"


@dataclass(frozen=True)
class KeepBest:
    k: int
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"

    def ranked(self, candidates: Sequence[Candidate]) -> list[int]:
        """Steps that have the metric, best first (ties: the newer wins)."""
        scored = [c for c in candidates if self.metric in c.metrics]
        sign = 1 if self.mode == "min" else -1
        scored.sort(key=lambda c: (sign * c.metrics[self.metric], -c.step))
        return [c.step for c in scored]

    def keep(self, by_step: Sequence[Candidate]) -> Iterator[tuple[int, str]]:
        for i, step in enumerate(self.ranked(by_step)[: self.k]):
            yield step, "best" if i == 0 else f"best-{self.k}"

    def bound(self, saves: Saves) -> int | None:
        return self.k

    def describe(self) -> str:
        return f"keep_best={self.k} by {self.metric} ({self.mode})"


@dataclass(frozen=True)
class KeepEvery:
    n: int

    def keep(self, by_step: Sequence[Candidate]) -> Iterator[tuple[int, str]]:
        yield from ((c.step, "milestone") for c in by_step if c.step % self.n == 0)

    def bound(self, saves: Saves) -> int | None:
        return None if not saves.total_steps else saves.total_steps // self.n

    def describe(self) -> str:
        return f"keep_every={self.n}"


@dataclass(frozen=True)
class KeepAfterStep:
    step: int

    def keep(self, by_step: Sequence[Candidate]) -> Iterator[tuple[int, str]]:
        yield from ((c.step, f"after-{self.step}") for c in by_step if c.step > self.step)

    def bound(self, saves: Saves) -> int | None:
        total, every = saves.total_steps, saves.step_interval
        if total is None or every is None:
            return None if total is None or total > self.step else 0
        # the saves at multiples of the interval past ``step``, and the final one
        later = total // every - self.step // every
        return max(0, later) + int(total % every != 0 and total > self.step)

    def describe(self) -> str:
        return f"keep_after_step={self.step}"


@dataclass(frozen=True)
class RetentionPlan:
    keep: dict[int, tuple[str, ...]]
    """Step -> the reasons it is kept (latest, best, best-K, last-N, milestone...)."""
    delete: tuple[int, ...]
    """Steps to delete, oldest first."""
    over_budget: bool = False
    """True if the protected checkpoints alone exceed ``max_bytes``."""


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints to keep: the rules, their ranking metric, the byte budget."""

    keep_last: int | None = None
    """Keep the newest N checkpoints; None keeps all."""
    keep_best: int = 0
    """Keep the best K by ``metric``; 0 ranks nothing (no checkpoint is called best)."""
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    keep_every: int | None = None
    """Keep every checkpoint whose step is a multiple of this (milestones)."""
    keep_after_step: int | None = None
    """Keep every checkpoint after this step."""
    max_bytes: int | None = None
    """Budget for all checkpoints together; the oldest unprotected go first."""

    def __post_init__(self) -> None:
        Options(**{k: v for k, v in self._options().items() if v is not None})

    def _options(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["max_disk"] = values.pop("max_bytes")
        return values

    @classmethod
    def from_options(cls, options: Options) -> RetentionPolicy:
        names = {f.name for f in dataclasses.fields(cls)} - {"max_bytes"}
        return cls(**{n: getattr(options, n) for n in names}, max_bytes=options.max_bytes)

    @property
    def best(self) -> KeepBest:
        return KeepBest(self.keep_best, self.metric, self.mode)

    @property
    def rules(self) -> tuple[Rule, ...]:
        rules: list[Rule] = [KeepLast(self.keep_last)]
        if self.keep_best:
            rules.append(self.best)
        if self.keep_every:
            rules.append(KeepEvery(self.keep_every))
        if self.keep_after_step is not None:
            rules.append(KeepAfterStep(self.keep_after_step))
        return tuple(rules)

    def describe(self) -> str:
        """In words, for a ``delete`` event: ``keep_last=3, keep_best=1 by eval_loss (min)``."""
        parts = [r.describe() for r in self.rules if r != KeepLast(None)]
        if self.max_bytes is not None:
            parts.append(f"max_disk={self.max_bytes}")
        return ", ".join(parts) or "retention"

    def kept_count(self, saves: Saves) -> int | None:
        """Most checkpoints retention holds at once (None: unbounded): the rules' worst
        cases added up, never more than are saved, never fewer than one."""
        bounds = [r.bound(saves) for r in self.rules]
        if any(b is None for b in bounds):
            return saves.count
        bound = sum(b for b in bounds if b is not None)
        return max(1, bound if saves.count is None else min(saves.count, bound))

    def to_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def best_steps(candidates: Sequence[Candidate], policy: RetentionPolicy) -> list[int]:
    """Steps that have ``policy.metric``, best first (ties: the newer wins)."""
    return policy.best.ranked(candidates)


def plan(candidates: Sequence[Candidate], policy: RetentionPolicy) -> RetentionPlan:
    """Decide which of ``candidates`` (valid checkpoints) to keep and which to delete."""
    by_step = sorted(candidates, key=lambda c: c.step)
    if not by_step:
        return RetentionPlan({}, ())
    reasons: dict[int, list[str]] = {c.step: [] for c in by_step}
    reasons[by_step[-1].step].append("latest")
    for rule in policy.rules:
        for step, label in rule.keep(by_step):
            reasons[step].append(label)
    over = False
    if policy.max_bytes is not None:
        protected = {by_step[-1].step, *best_steps(by_step, policy)[: min(policy.keep_best, 1)]}
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


def thin_steps(
    candidates: Sequence[Candidate],
    decision: RetentionPlan,
    policy: RetentionPolicy,
    keep_full: int | None,
) -> tuple[int, ...]:
    """The full checkpoints among those ``decision`` keeps that are to be thinned, oldest
    first: all but the newest ``keep_full`` full ones and (with ``keep_best``) the best
    one. ``keep_full`` None or 0 thins nothing. The newest full ones stay full so that a
    newest found damaged still falls back to a resumable one (the default 2); the best
    stays full so that a run can go on from it. A thin one is never made full again."""
    if not keep_full:
        return ()
    full = sorted((c for c in candidates if c.step in decision.keep and not c.thin),
                  key=lambda c: c.step)  # fmt: skip
    spared = {c.step for c in full[-keep_full:]}
    if policy.keep_best:
        spared.update(best_steps(candidates, policy)[:1])
    return tuple(c.step for c in full if c.step not in spared)


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
    return policy.to_json()


def policy_from_json(doc: Mapping[str, object]) -> RetentionPolicy:
    """The retention part of a stored policy (``Options.to_json`` or the older form of
    ``policy_to_json``); unknown keys are ignored, bad values raise ``ConfigError``."""
    try:
        return RetentionPolicy.from_options(Options.from_json(doc))
    except TypeError as e:
        raise ConfigError(f"unreadable retention policy {dict(doc)!r} ({e})") from e
