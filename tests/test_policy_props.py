"""Properties of retention that hold for any sequence of saves, metrics and policies."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from safepoint.retention import Candidate, RetentionPolicy, free_before_commit, plan

policies = st.builds(
    RetentionPolicy,
    keep_last=st.none() | st.integers(1, 5),
    keep_best=st.integers(0, 3),
    metric=st.just("m"),
    mode=st.sampled_from(["min", "max"]),
    keep_every=st.none() | st.integers(1, 8),
    max_bytes=st.none() | st.integers(1, 2000),
)
saves = st.lists(
    st.tuples(
        st.integers(1, 5),  # step gap
        st.integers(1, 500),  # size
        st.none() | st.floats(-10, 10, allow_nan=False) | st.sampled_from([0.0, 1.0]),  # metric
    ),
    min_size=1,
    max_size=30,
)


def best_step(candidates: list[Candidate], mode: str) -> int | None:
    scored = [c for c in candidates if "m" in c.metrics]
    if not scored:
        return None
    sign = 1 if mode == "min" else -1
    best = min(sign * c.metrics["m"] for c in scored)
    return max(c.step for c in scored if sign * c.metrics["m"] == best)  # ties: newest


@settings(max_examples=300, deadline=None)
@given(policy=policies, history=saves)
def test_retention_invariants(policy: RetentionPolicy, history: list) -> None:
    kept: list[Candidate] = []
    step = 0
    for gap, size, metric in history:
        step += gap
        kept.append(Candidate(step, size, {} if metric is None else {"m": metric}))
        decision = plan(kept, policy)
        steps = {c.step for c in kept}
        # a partition of the candidates: nothing else is ever deleted
        assert set(decision.keep) | set(decision.delete) == steps
        assert not set(decision.keep) & set(decision.delete)
        # never zero; the newest always kept, the best when keep_best asks for it
        assert decision.keep
        assert step in decision.keep and "latest" in decision.keep[step]
        best = best_step(kept, policy.mode) if policy.keep_best else None
        if best is not None:
            assert best in decision.keep and "best" in decision.keep[best]
        else:
            assert not any("best" in r for r in decision.keep.values())
        if policy.keep_last is not None and not (policy.keep_best or policy.keep_every):
            # keep_last=N holds exactly N (what the disk pre-flight counts), or fewer when
            # the byte budget cannot hold N
            want = min(policy.keep_last, len(steps))
            if policy.max_bytes is None:
                assert len(decision.keep) == want
            else:
                assert 1 <= len(decision.keep) <= want
        ordered = sorted(steps)
        if policy.max_bytes is None:
            # every rule is honoured in full
            last = ordered if policy.keep_last is None else ordered[-policy.keep_last :]
            assert set(last) <= set(decision.keep)
            if policy.keep_every:
                assert {s for s in steps if s % policy.keep_every == 0} <= set(decision.keep)
        else:
            size = {c.step: c.size for c in kept}
            used = sum(size[s] for s in decision.keep)
            assert decision.over_budget == (used > policy.max_bytes)
            if decision.over_budget:  # only the protected are left
                assert set(decision.keep) == {step} | ({best} if best is not None else set())
        kept = [c for c in kept if c.step in decision.keep]


@settings(max_examples=300, deadline=None)
@given(policy=policies, history=saves, incoming_metric=st.none() | st.floats(-10, 10))
def test_freeing_space_before_a_commit_keeps_what_resume_needs(
    policy: RetentionPolicy, history: list, incoming_metric: float | None
) -> None:
    existing, step = [], 0
    for gap, size, metric in history:
        step += gap
        existing.append(Candidate(step, size, {} if metric is None else {"m": metric}))
    incoming = Candidate(step + 1, 100, {} if incoming_metric is None else {"m": incoming_metric})
    freed = free_before_commit(existing, policy, incoming)
    steps = {c.step for c in existing}
    assert set(freed) <= steps
    assert step not in freed  # the newest existing checkpoint survives a failed retry
    best = best_step(existing, policy.mode) if policy.keep_best else None
    assert best is None or best not in freed
    assert len(freed) < len(existing)
