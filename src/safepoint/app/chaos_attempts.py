"""The attempts of ``safepoint chaos``'s random kills: what each did, the verdict on
each resume (steps lost, an older checkpoint resumed), and the table that reports them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safepoint.units import format_table, wrap_text


@dataclass
class Attempt:
    """One run of the command in the chaos directory."""

    number: int
    kill_at: float | None  # seconds after launch, None: run to the end
    signal: str | None = None
    exit: str = ""
    resumed_from: int | None = None
    reached: int | None = None
    lost: int | None = None
    verdict: str = "ok"
    log: Path | None = None
    landed: bool = False  # killed after a checkpoint existed and before the end
    why_not: str = ""  # a kill that did not count: why (the table's "counted" column)
    round: int = 1  # which fresh output directory (a run that ends early starts another)

    @property
    def failed(self) -> bool:
        return self.verdict != "ok"


# --------------------------------------------------------------------- judging


def judge(attempts: list[Attempt]) -> None:
    """Steps lost per kill, and a verdict on each resume.

    An attempt stopped before it chose where to resume from (``resumed_from`` None: in
    its imports, or before its restore) says nothing about the one before it: each
    attempt that got somewhere is judged against the next one that resumed."""
    for i, prev in enumerate(attempts):
        if prev.reached is None:
            continue
        nxt = next(
            (i + 1 + j for j, x in enumerate(attempts[i + 1 :]) if x.resumed_from is not None), None
        )
        if nxt is None:
            continue
        a = attempts[nxt]
        prev.lost = max(prev.reached - a.resumed_from, 0)  # type: ignore[operator]
        earlier = [x.resumed_from for x in attempts[:nxt] if x.resumed_from]
        if earlier and a.resumed_from < max(earlier) and not a.failed:  # type: ignore[operator]
            a.verdict = f"FAIL: resumed from step {a.resumed_from}, older than {max(earlier)}"
        if prev.signal == "TERM" and prev.exit == "3" and prev.lost and not prev.failed:
            prev.verdict = f"FAIL: {prev.lost} steps lost after SIGTERM (no emergency save)"


# Why a kill did not count, as the table says it (short) and as a sentence.
WHY_NOT = {
    "no checkpoint": "killed before the first checkpoint, so no resume is tested",
    "after the end": "killed after the final checkpoint, so no resume is tested",
    "ended first": "the run ended before the kill",
}


def exit_said(exit_: str) -> str:
    return exit_ if exit_ in ("", "killed", "hung", "timeout") else f"exit {exit_}"


def table(attempts: list[Attempt], kills: int) -> list[str]:
    """The attempts as a table that fits 80 columns (a failure's reason follows it),
    what its columns mean, and how many kills counted of the ``kills`` asked."""
    head = ("#", "kill at", "signal", "exit", "counted", "resumed", "reached", "lost")
    head += ("verdict",)
    rows = [
        (
            str(a.number),
            "-" if a.kill_at is None else f"{a.kill_at:.1f} s",
            a.signal or "-",
            a.exit,
            "yes" if a.landed else f"no: {a.why_not}" if a.why_not else "-",
            "?" if a.resumed_from is None else str(a.resumed_from or "start"),
            "?" if a.reached is None else str(a.reached),
            "?" if a.lost is None else str(a.lost),
            "FAIL" if a.failed else "ok",
        )
        for a in attempts
    ]
    lines = format_table(head, rows)
    lines += [f"attempt {a.number}: {a.verdict}" for a in attempts if a.failed]
    lines += [
        "resumed: the step the attempt resumed from; reached: its last step; lost: steps",
        "the next attempt trained again; ?: not known (the run stopped before its record",
        "said it, or no later attempt resumed); counted: a kill between the first",
        "checkpoint and the final one, which is what tests a resume",
    ]
    counted = sum(a.landed for a in attempts)
    extra = [a for a in attempts if a.why_not and a.kill_at is not None]
    lines.append(f"{counted} of {kills} kills counted")
    if extra:
        lines[-1] += f"; {len(extra)} more not counted: " + "; ".join(
            f"attempt {a.number}, {WHY_NOT[a.why_not]}" for a in extra
        )
    return [part for line in lines for part in wrap_text(line, 80)]
