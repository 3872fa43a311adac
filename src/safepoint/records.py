"""The run record: an append-only JSON-lines log of what happened to a run.

``safepoint.log.jsonl`` in the output directory gets one line per event: metrics,
saves (with stall and write times), deletions, resumes, signals, errors. Each line is
written with a single ``write`` to a file opened with ``O_APPEND``; a line torn by a
crash is skipped on reading, never fatal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as e:
            if not self._failed:
                log.warning(
                    "cannot append to the run record %s (%s); training goes on",
                    self.path,
                    e.strerror,
                )
            self._failed = True


def read_events(directory: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The events of a run record, in order; torn or garbled lines are skipped."""
    path = Path(directory) / RECORD_NAME
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(event, dict) and "event" in event:
                    yield event
    except FileNotFoundError:
        return
