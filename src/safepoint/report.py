"""What ``safepoint report`` shows, as data: a pure function of an output directory.

``extract(directory)`` reads the run record (``safepoint.log.jsonl``) and the checkpoint
folders and returns a ``ReportData``: the loss points, the checkpoint marks, the resume
points, the per-save timings, the disk use over time and the kept checkpoints. Drawing
(``safepoint.report_render``, ``safepoint.report_html``) only turns that into pictures
and a page, so tests check the data behind every plot. A directory written by the stock
Trainer (``checkpoint-N`` folders with ``trainer_state.json``, no record) gives what it
can: loss curves and checkpoints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from safepoint.app.runs import best_checkpoint, checkpoints, keep_reasons, run_directory, run_policy
from safepoint.errors import CorruptCheckpointError
from safepoint.fileio import loads_json, read_regular
from safepoint.records import read_events
from safepoint.retention import RetentionPolicy
from safepoint.schema import MAX_TRAINER_STATE_BYTES
from safepoint.validity import CheckpointInfo

TRAIN_KEY = "loss"
EVAL_KEY = "eval_loss"

MarkKind = Literal["kept", "deleted", "best", "emergency"]


@dataclass(frozen=True)
class Point:
    """One logged value. ``attempt`` counts the processes of the run from 0."""

    step: int
    value: float
    attempt: int = 0


@dataclass(frozen=True)
class CheckpointMark:
    """A checkpoint as the loss plot marks it."""

    step: int
    name: str
    kind: MarkKind
    reason: str = ""
    bytes: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    y: float | None = None
    """Where the mark sits on the loss plot: on the eval curve if an eval loss was logged
    at its step (the best is best by that), else on the train curve; None if neither."""
    deleted_by: str | None = None
    """The retention rule that deleted it (deleted marks only)."""


@dataclass(frozen=True)
class Resume:
    """A restart: the run went back from ``reached`` to ``step`` and redid the steps."""

    step: int
    checkpoint: str
    reached: int | None
    steps_lost: int | None
    skipped: tuple[dict[str, str], ...] = ()
    attempt: int = 0


@dataclass(frozen=True)
class SaveTiming:
    """One save attempt: how long training waited and how long the write took."""

    step: int
    reason: str
    stall_s: float | None
    write_s: float | None
    bytes: int | None
    result: str
    attempt: int = 0


@dataclass(frozen=True)
class KeptRow:
    """A row of the kept-checkpoints table."""

    name: str
    step: int
    bytes: int
    status: str
    created: float | None
    metrics: dict[str, float]
    kept_because: tuple[str, ...]
    stall_s: float | None = None
    write_s: float | None = None


@dataclass
class ReportData:
    """Everything the report draws. JSON-able through ``to_json``."""

    directory: str
    source: Literal["record", "trainer_state", "checkpoints", "empty"]
    metric: str = EVAL_KEY
    mode: str = "min"
    train_loss: list[Point] = field(default_factory=list)
    eval_loss: list[Point] = field(default_factory=list)
    checkpoints: list[CheckpointMark] = field(default_factory=list)
    resumes: list[Resume] = field(default_factory=list)
    saves: list[SaveTiming] = field(default_factory=list)
    disk: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since the run's first event, bytes of all checkpoints) after each change."""
    budget: int | None = None
    kept: list[KeptRow] = field(default_factory=list)
    attempts: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    skipped_saves: list[int] = field(default_factory=list)
    """Steps whose save was skipped because the background writer was still busy."""
    signals: list[dict[str, Any]] = field(default_factory=list)
    """``signal`` and ``emergency_save`` events as recorded."""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _numbers(raw: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): n for k, v in raw.items() if (n := _number(v)) is not None}


def is_emergency(reason: str) -> bool:
    """Whether a save reason names an emergency save (a signal or an exception)."""
    reason = reason.lower()
    return any(word in reason for word in ("emergency", "signal", "exception"))


# --------------------------------------------------------------------------- extract


def extract(directory: str | os.PathLike[str]) -> ReportData:
    """The data of the report of ``directory``. Reads only; never fails on a torn record.

    Raises ``CheckpointNotFoundError`` if ``directory`` is not a directory.
    """
    directory = run_directory(directory, "give the run's output dir")
    events = list(read_events(directory))
    infos = checkpoints(directory)
    if events:
        return _from_record(directory, events, infos)
    if any(i.status == "foreign" for i in infos):
        return _from_trainer_state(directory, infos)
    return _from_checkpoints(directory, infos)


def _from_record(
    directory: Path, events: list[dict[str, Any]], infos: list[CheckpointInfo]
) -> ReportData:
    policy = run_policy(directory, infos, events=events) or RetentionPolicy()
    data = ReportData(str(directory), "record", policy.metric, policy.mode)
    data.budget = policy.max_bytes
    t0 = events[0].get("t", 0.0)
    attempt = -1
    on_disk: dict[int, int] = {}
    saved: dict[int, dict[str, Any]] = {}
    deleted: dict[int, dict[str, Any]] = {}

    def disk_changed(event: Mapping[str, Any]) -> None:
        data.disk.append((round(float(event.get("t", t0)) - t0, 3), sum(on_disk.values())))

    for e in events:
        kind, step = e["event"], e.get("step")
        if kind == "start":
            attempt += 1
            on_disk = {
                d["step"]: int(d.get("bytes") or 0)
                for d in e.get("on_disk") or []
                if isinstance(d, dict) and isinstance(d.get("step"), int)
            }
            disk_changed(e)
        elif kind == "metrics" and isinstance(step, int):
            _add_points(data, step, _numbers(e.get("metrics")), max(attempt, 0))
        elif kind == "save" and isinstance(step, int):
            data.saves.append(_save_timing(step, e, max(attempt, 0)))
            if data.saves[-1].result == "committed":
                saved[step] = e
                deleted.pop(step, None)
                on_disk[step] = int(e.get("bytes") or 0)
                disk_changed(e)
        elif kind == "save_skipped" and isinstance(step, int):
            if e.get("error"):  # on_save_error="continue": the save failed, training went on
                data.saves.append(_save_timing(step, {**e, "result": "failed"}, max(attempt, 0)))
            else:  # the background writer was still busy
                data.skipped_saves.append(step)
        elif kind == "delete" and isinstance(step, int):
            deleted[step] = e
            if on_disk.pop(step, None) is not None:
                disk_changed(e)
        elif kind == "resume" and isinstance(step, int):
            data.resumes.append(_resume(step, e, max(attempt, 0)))
        elif kind == "error":
            data.errors.append(e)
        elif kind in ("signal", "emergency_save"):  # written by safepoint.signals
            data.signals.append(e)
    data.attempts = attempt + 1
    # A background save's event is written when its commit ends, maybe after the next
    # save began: show the saves of each process in step order.
    data.saves.sort(key=lambda s: (s.attempt, s.step))
    if not data.train_loss and not data.eval_loss:
        # Nothing logged metrics (an integration that does not record metrics): the
        # metrics saved with each checkpoint still draw a coarse curve.
        for step, e in sorted(saved.items()):
            _add_points(data, step, _numbers(e.get("metrics")), 0)
        if saved:
            data.notes.append("no metrics were logged: the curves show the saved checkpoints only")
    _marks(data, saved, deleted, infos, policy)
    return data


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _save_timing(step: int, e: Mapping[str, Any], attempt: int) -> SaveTiming:
    return SaveTiming(
        step,
        str(e.get("reason") or ""),
        _number(e.get("stall_s")),
        _number(e.get("write_s")),
        _int(e.get("bytes")),
        str(e.get("result") or "committed"),
        attempt,
    )


def _resume(step: int, e: Mapping[str, Any], attempt: int) -> Resume:
    return Resume(
        step,
        str(e.get("checkpoint") or f"checkpoint-{step}"),
        _int(e.get("reached")),
        _int(e.get("steps_lost")),
        tuple(s for s in e.get("skipped") or [] if isinstance(s, dict)),
        attempt,
    )


def _add_points(data: ReportData, step: int, metrics: Mapping[str, float], attempt: int) -> None:
    if TRAIN_KEY in metrics:
        data.train_loss.append(Point(step, metrics[TRAIN_KEY], attempt))
    if EVAL_KEY in metrics:
        data.eval_loss.append(Point(step, metrics[EVAL_KEY], attempt))


def _loss_at(data: ReportData) -> dict[int, float]:
    """Step -> where a checkpoint of that step sits on the loss plot (``CheckpointMark.y``).

    The last value logged wins: after a resume, the redone step's."""
    at = {p.step: p.value for p in data.train_loss}
    at.update((p.step, p.value) for p in data.eval_loss)
    return at


def _marks(
    data: ReportData,
    saved: Mapping[int, Mapping[str, Any]],
    deleted: Mapping[int, Mapping[str, Any]],
    infos: list[CheckpointInfo],
    policy: RetentionPolicy,
) -> None:
    valid = [i for i in infos if i.valid]
    keep = keep_reasons(valid, policy)
    best_info = best_checkpoint(valid, policy)
    best = best_info.step if best_info else None
    loss_at = _loss_at(data)
    present = {i.step: i for i in valid}
    for step in sorted(set(saved) | set(present)):
        event = saved.get(step, {})
        info = present.get(step)
        reason = info.manifest.reason if info and info.manifest else str(event.get("reason", ""))
        metrics = info.metrics if info else _numbers(event.get("metrics"))
        if step == best:
            kind: MarkKind = "best"
        elif is_emergency(reason):
            kind = "emergency"
        elif info is not None:
            kind = "kept"
        else:
            kind = "deleted"
        gone = deleted.get(step)
        data.checkpoints.append(
            CheckpointMark(
                step,
                info.name if info else f"checkpoint-{step}",
                kind,
                reason,
                info.size if info else int(event.get("bytes") or 0),
                metrics,
                loss_at.get(step, metrics.get(TRAIN_KEY)),
                None if info else str((gone or {}).get("rule") or "no longer on disk"),
            )
        )
    timings = {s.step: s for s in data.saves if s.result == "committed"}
    for info in valid:
        t = timings.get(info.step)
        data.kept.append(
            KeptRow(
                info.name,
                info.step,
                info.size,
                info.status,
                info.created,
                info.metrics,
                keep.get(info.step, ()),
                t.stall_s if t else None,
                t.write_s if t else None,
            )
        )


# ------------------------------------------------------------------ stock Trainer


def _trainer_state(infos: Iterable[CheckpointInfo], directory: Path) -> dict[str, Any]:
    """The most complete ``trainer_state.json``: the one with the highest global step."""
    paths = [directory / "trainer_state.json", *(i.path / "trainer_state.json" for i in infos)]
    best: dict[str, Any] = {}
    for path in paths:
        try:
            # Another tool's folder is untrusted: a regular file only (no link, no FIFO),
            # bounded in size and in JSON depth and numbers; NaN and Infinity as the
            # Trainer writes them (a non-finite value is left out of the plots).
            data = read_regular(path, max_size=MAX_TRAINER_STATE_BYTES)
            state = loads_json(bytes(data), where=str(path), nonfinite=True)
        except (OSError, CorruptCheckpointError):
            continue
        step = state.get("global_step") if isinstance(state, dict) else None
        if isinstance(step, int) and step >= int(best.get("global_step") or -1):
            best = state
    return best


def _from_trainer_state(directory: Path, infos: list[CheckpointInfo]) -> ReportData:
    state = _trainer_state(infos, directory)
    metric = str(state.get("metric_for_best_model") or EVAL_KEY)  # absent in older versions
    data = ReportData(str(directory), "trainer_state", metric)
    data.attempts = 1
    by_step: dict[int, dict[str, float]] = {}
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            metrics = _numbers(entry)
            _add_points(data, entry["step"], metrics, 0)
            by_step.setdefault(entry["step"], {}).update(metrics)
    best_path = state.get("best_model_checkpoint")
    best_name = Path(str(best_path)).name if best_path else None
    loss_at = _loss_at(data)
    for info in infos:
        if info.step < 0:
            continue
        metrics = {k: v for k, v in by_step.get(info.step, {}).items() if k != "step"}
        kind: MarkKind = "best" if info.name == best_name else "kept"
        data.checkpoints.append(
            CheckpointMark(
                info.step, info.name, kind, "", info.size, metrics, loss_at.get(info.step)
            )
        )
        data.kept.append(
            KeptRow(
                info.name,
                info.step,
                info.size,
                info.status,
                _mtime(info.path),
                metrics,
                ("best",) if kind == "best" else (),
            )
        )
    data.notes.append(
        "written by the stock Trainer: no run record, so no save timings, deletions, "
        "resumes or disk history"
    )
    return data


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _from_checkpoints(directory: Path, infos: list[CheckpointInfo]) -> ReportData:
    """No record (deleted, or an old version wrote it): the manifests' metrics only."""
    policy = run_policy(directory, infos, events=()) or RetentionPolicy()
    source = "checkpoints" if infos else "empty"
    data = ReportData(str(directory), source, policy.metric, policy.mode)
    for info in infos:
        if info.valid:
            _add_points(data, info.step, info.metrics, 0)
    data.attempts = 1 if infos else 0
    _marks(data, {}, {}, infos, policy)
    data.notes.append(
        "no run record (safepoint.log.jsonl) in this directory: only the metrics saved "
        "with each checkpoint are shown"
        if infos
        else "nothing to report yet: no run record and no checkpoints"
    )
    return data
