"""The run record: an append-only JSON-lines log of what happened to a run.

``safepoint.log.jsonl`` in the output directory gets one line per event: metrics,
saves (with stall and write times), deletions, resumes, signals, errors. Each line is
written with a single ``write`` to a file opened with ``O_APPEND``; a line torn by a
crash is skipped on reading, never fatal.

Every event has ``t`` (Unix time) and ``event`` (its kind). The kinds and their fields:

=========  ===================================================================
start      a process opened the directory: ``pid``, ``config`` (the policy: save_every,
           keep_last, keep_best, metric, mode, keep_every, max_disk bytes,
           total_steps), ``on_disk`` (``[{"step", "bytes"}]`` valid checkpoints found)
metrics    training or eval metrics as logged: ``step``, ``metrics`` (name -> number)
save       ``step``, ``reason``, ``stall_s`` (training waited), ``write_s`` (writing
           and committing), ``bytes``, ``metrics``, ``result`` (committed | failed |
           skipped)
delete     retention removed a checkpoint: ``step``, ``checkpoint``, ``bytes``, ``rule``
resume     ``step``, ``checkpoint`` resumed from, ``reached`` (last step the previous
           process recorded), ``steps_lost``, ``skipped`` (newer folders passed over:
           ``[{"checkpoint", "status", "problem"}]``)
signal     ``signal`` (name), ``step``, and what was done about it
error      ``where``, ``error`` (one line), optional ``step``
swept      ``folders`` left by crashed saves and removed at start
close      the process finished cleanly: ``step`` (last step seen)
=========  ===================================================================

Readers must ignore kinds and fields they do not know: the record grows with the code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from safepoint.errors import CorruptCheckpointError, UnsafeFileError
from safepoint.fileio import loads_json, open_regular

log = logging.getLogger("safepoint")

RECORD_NAME = "safepoint.log.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class RunRecord:
    """Appends events to the record of one output directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory) / RECORD_NAME
        self._failed = False
        self._tail_checked = False
        self._metrics: tuple[int, dict[str, Any]] | None = None  # the last step's, sent

    def warning(self, message: str) -> None:
        """Say ``message`` on the ``safepoint`` logger and keep it in the record."""
        log.warning("%s", message)
        self.event("warning", message=message)

    def metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """A ``metrics`` event of what ``step`` reached; values already recorded for the
        same step are not written twice (a callback may pass them through two paths)."""
        fresh = dict(metrics)
        if self._metrics is not None and self._metrics[0] == step:
            fresh = {k: v for k, v in fresh.items() if self._metrics[1].get(k, object()) != v}
            self._metrics[1].update(fresh)
        else:
            self._metrics = (step, dict(fresh))
        if fresh:
            self.event("metrics", step=step, metrics=fresh)

    def event(self, kind: str, **fields: Any) -> None:
        """Append one event. A failure to write the record is logged once, never raised:
        the record serves the reports and must not stop training."""
        line = (
            json.dumps(
                {"t": round(time.time(), 3), "event": kind, **_clean(fields)},
                allow_nan=False,
                separators=(",", ":"),
            )
            + "\n"
        )
        try:
            fd, _ = open_regular(
                self.path, flags=os.O_WRONLY | os.O_APPEND | os.O_CREAT, error=UnsafeFileError
            )
            try:
                if not self._tail_checked:
                    # A crash may have torn the last line: start ours on a fresh line so
                    # that only the torn one is lost.
                    if _ends_torn(self.path):
                        line = "\n" + line
                    self._tail_checked = True
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as e:
            if not self._failed:
                log.warning(
                    "cannot append to the run record %s (%s); training goes on",
                    self.path,
                    e.strerror or e,
                )
            self._failed = True


def _open_record(path: Path) -> BinaryIO:
    """The run record for reading: a regular file, never a symlink or FIFO followed or
    blocked on (``UnsafeFileError`` says which file and to remove it)."""
    fd, _ = open_regular(path, error=UnsafeFileError)
    return os.fdopen(fd, "rb")


def _ends_torn(path: Path) -> bool:
    try:
        with _open_record(path) as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def read_events(directory: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The events of a run record, in order; torn or garbled lines are skipped, and so
    is a line longer than ``MAX_LINE`` bytes (damage, e.g. the NUL block a power cut
    leaves), with one warning."""
    path = Path(directory) / RECORD_NAME
    try:
        f = _open_record(path)
    except FileNotFoundError:
        return
    with f:
        # up to the size the file had when opened: a file appended to forever (or grown
        # by a writer while we read) still ends
        left = os.fstat(f.fileno()).st_size
        damaged = False  # inside a line already longer than MAX_LINE
        while left > 0 and (raw := f.readline(min(left, MAX_LINE + 1))):
            left -= len(raw)
            whole = raw.endswith(b"\n")
            if damaged or (not whole and len(raw) > MAX_LINE):
                if not damaged:
                    _warn_damaged(path)
                damaged = not whole
                continue
            if (event := _parse(raw)) is not None:
                yield event


MAX_LINE = 1 << 20
"""Bytes of the longest line the run record holds (a ``start`` event with a long config
is a few kB); a longer line is damage and is skipped. Bounds the time and memory of
reading a record to linear in its size whatever it holds."""

_warned: set[Path] = set()


def _warn_damaged(path: Path) -> None:
    if path not in _warned:  # once per record and process: every reader meets it again
        _warned.add(path)
        log.warning(
            "%s has a line longer than %d bytes (damage, e.g. zeros left by a power cut); "
            "skipped it, the events around it are read",
            path,
            MAX_LINE,
        )


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        event = loads_json(raw, where=RECORD_NAME)  # bounded depth and numbers
    except CorruptCheckpointError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def last_reached_step(directory: str | os.PathLike[str]) -> int | None:
    """``reached_step`` of the record of ``directory``, reading it backwards only as far as
    the last ``metrics`` or ``start`` event (a long run's record can be large; this runs at
    every start). Assumes a process logs metrics in step order, as training loops do.
    Linear in the bytes read: a line longer than ``MAX_LINE`` is skipped as damage."""
    path = Path(directory) / RECORD_NAME
    reached: int | None = None
    try:
        with _open_record(path) as f:
            for raw in _lines_backwards(f, path):
                event = _parse(raw)
                if event is None:
                    continue
                if event["event"] == "start":
                    return reached
                if event["event"] in _PROGRESS and isinstance(event.get("step"), int):
                    reached = max(event["step"], reached or 0)
                    if event["event"] == "metrics":
                        # Metrics come from the loop in step order: nothing earlier in
                        # this process is further. (A background save's event may be
                        # written after later metrics, hence the max above.)
                        return reached
    except FileNotFoundError:
        return None
    return reached


_BLOCK = 1 << 16


def _lines_backwards(f: BinaryIO, path: Path) -> Iterator[bytes]:
    """The lines of ``f``, last first, none longer than ``MAX_LINE`` (longer ones are
    skipped with one warning). The partial first line of each block is carried into the
    next read only up to the cap: carrying it whole made a record with no newline (a NUL
    block) quadratic, 38 s for 16 MB."""
    pos = f.seek(0, os.SEEK_END)
    head: list[bytes] = []  # pieces of the line that starts before ``pos``, last first
    carried = 0  # their total length
    damaged = False  # the line that starts before ``pos`` is over the cap
    while pos > 0:
        size = min(pos, _BLOCK)
        pos -= size
        f.seek(pos)
        first, *rest = f.read(size).split(b"\n")  # ``first`` may start before ``pos``
        if rest:  # a newline in this block: the carried line starts right after it
            start = rest.pop()
            if not damaged and len(start) + carried <= MAX_LINE:
                yield b"".join([start, *reversed(head)])
            elif not damaged:
                _warn_damaged(path)
            yield from reversed(rest)
            head, carried, damaged = [], 0, False
        if damaged:
            continue
        head.append(first)
        carried += len(first)
        if carried > MAX_LINE:
            _warn_damaged(path)
            head, carried, damaged = [], 0, True
    if head and not damaged:
        yield b"".join(reversed(head))


_PROGRESS = ("metrics", "save", "resume")


def reached_step(events: Iterable[Mapping[str, Any]]) -> int | None:
    """The last step the most recent process recorded (metrics, save, resume), or None.

    Looks only at the events after the last ``start``: that process's own progress.
    """
    reached: int | None = None
    for event in events:
        if event.get("event") == "start":
            reached = None
        elif event.get("event") in _PROGRESS and isinstance(event.get("step"), int):
            reached = max(event["step"], reached or 0)
    return reached


def save_timings(directory: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """Step -> the last committed ``save`` event of that step (stall_s, write_s, bytes...)."""
    return {
        e["step"]: e
        for e in read_events(directory)
        if e["event"] == "save" and e.get("result", "committed") == "committed" and "step" in e
    }


def retention_rule(policy: Any) -> str:
    """The retention policy in words, for a ``delete`` event: ``keep_last=3, best 1 by
    eval_loss (min), max_disk=2000000``. Takes a ``RetentionPolicy``."""
    parts = []
    if policy.keep_last is not None:
        parts.append(f"keep_last={policy.keep_last}")
    if policy.keep_best:
        parts.append(f"keep_best={policy.keep_best} by {policy.metric} ({policy.mode})")
    if policy.keep_every:
        parts.append(f"keep_every={policy.keep_every}")
    if policy.max_bytes is not None:
        parts.append(f"max_disk={policy.max_bytes}")
    return ", ".join(parts) or "retention"
