"""What ``safepoint train`` prints: a progress line, one line per commit, the outcome."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from typing import Any

import click

from safepoint.app.config import TrainConfig
from safepoint.engine import PendingSave
from safepoint.integrations.hf import SafepointCallback
from safepoint.units import format_duration, format_size, wrap_text
from safepoint.validity import CheckpointInfo

_CLEAR_LINE = "\r\x1b[K"  # back to the start of the live progress line and erase it
_BAR_MIN, _BAR_MAX = 6, 30  # below _BAR_MIN cells a bar says nothing: drop a field instead


def bar(step: int, total: int, width: int = 24) -> str:
    filled = min(int(width * step / max(total, 1)), width)
    return "#" * filled + "." * (width - filled)


def clock(seconds: float | None) -> str:
    """``MM:SS`` or ``H:MM:SS``, like the Trainer's tqdm bar; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds > 360_000:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def rate_text(steps_per_s: float | None) -> str:
    """``3.21it/s``, or ``12.5s/it`` for slow steps, as tqdm writes them."""
    if not steps_per_s:
        return "?it/s"
    if steps_per_s >= 1:
        return f"{steps_per_s:.2f}it/s"
    return f"{1 / steps_per_s:.2f}s/it"


def progress_line(
    *,
    step: int,
    total: int,
    width: int,
    loss: float | None = None,
    elapsed: float | None = None,
    steps_per_s: float | None = None,
    next_save: str | None = None,
    last_save: str | None = None,
) -> str:
    """One progress line, at most ``width`` characters.

    ``[####....] 40/200  00:12<00:48  3.21it/s  loss 1.8173  next save 50  last save ...``:
    the bar shrinks first, then fields go in order of least value (last save, rate,
    next save, elapsed, loss); ``step/total`` always stays.
    """
    left = (total - step) / steps_per_s if steps_per_s and total > step else None
    if step >= total:
        left = 0.0
    # (drop rank: higher goes first, 0 never, text) in display order
    fields: list[tuple[int, str]] = [(0, f"{step}/{total}")]
    if elapsed is not None:
        fields.append((2, f"{clock(elapsed)}<{clock(left)}"))
    if steps_per_s is not None:
        fields.append((4, rate_text(steps_per_s)))
    if loss is not None:
        fields.append((1, f"loss {loss:.4f}"))
    if next_save:
        fields.append((3, f"next save {next_save}"))
    if last_save:
        fields.append((5, f"last save {last_save}"))
    while True:
        text = "  ".join(t for _, t in fields)
        room = width - len(text) - 3  # "[", "] "
        if room >= _BAR_MIN:
            return f"[{bar(step, total, min(room, _BAR_MAX))}] {text}"
        if len(fields) == 1:
            return text[:width]
        fields.remove(max(fields, key=lambda f: f[0]))


def terminal_width() -> int:
    """Columns of the terminal (``COLUMNS`` or 80 when there is none)."""
    return shutil.get_terminal_size().columns


class _NewLineFirst(logging.Filter):
    """Starts a message on a new line while the live progress line holds the cursor
    (a stop signal's lines would otherwise be glued after it, or after ``^C``)."""

    def __init__(self, job: JobCallback) -> None:
        super().__init__()
        self.job = job

    def filter(self, record: logging.LogRecord) -> bool:
        if self.job.line_open:
            self.job.line_open = False
            try:
                sys.stderr.write("\n")
                sys.stderr.flush()
            except (OSError, RuntimeError, ValueError):  # closed, or re-entered from a signal
                pass
        return True


class JobCallback(SafepointCallback):
    """``SafepointCallback`` that reports to the terminal (a live line on a TTY, a line
    every 5 steps otherwise) and counts its commits. Under several processes only rank
    0 reports (``RANK``); errors reach stderr from every rank."""

    def __init__(self, cfg: TrainConfig, *, tty: bool, **options: Any) -> None:
        super().__init__(**options)
        self.cfg = cfg
        self.tty = tty
        self.started = time.monotonic()
        self.commits = 0
        self.line_open = False  # the live line is on screen without its newline
        self._t0 = self.started
        self._step0 = 0
        self.reports = int(os.environ.get("RANK", "0")) == 0
        if tty and sys.stderr.isatty():
            logging.getLogger("safepoint").addFilter(_NewLineFirst(self))

    def resuming(self, info: CheckpointInfo) -> None:
        """The header line of ``on_train_begin`` says it (or the finished-run warning)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        super().on_train_begin(args, state, control, **kw)
        self._t0, self._step0 = time.monotonic(), state.global_step
        where = (
            f"resuming from {self.resumed_from.path} (step {self.resumed_from.step})"
            if self.resumed_from
            else "starting fresh"
        )
        self._echo(
            f"safepoint train: {where}; {state.max_steps} steps, saving {self.cfg.save_every}"
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        super().on_log(args, state, control, logs=logs, **kw)
        logs = logs or {}
        if "loss" not in logs or self.checkpointer is None:
            return
        step, total = state.global_step, state.max_steps
        if not self.tty and not (step % 5 == 0 or step == total):
            return
        elapsed = time.monotonic() - self._t0
        done = step - self._step0
        line = progress_line(
            step=step,
            total=total,
            # A terminal wraps a line that fills its last column: one column spare.
            width=terminal_width() - (1 if self.tty else 0),
            loss=logs["loss"],
            elapsed=elapsed,
            steps_per_s=done / elapsed if done > 0 and elapsed > 0 else None,
            next_save=self._next_save(step, total),
            last_save=self._last_save(),
        )
        if self.tty:
            self._echo(_CLEAR_LINE + line, nl=False)
            self.line_open = self.reports
        else:
            self._echo(line)

    def _next_save(self, step: int, total: int) -> str:
        assert self.checkpointer is not None
        interval = self.checkpointer.decider.schedule.step_interval()
        if interval:
            return str(min((step // interval + 1) * interval, total))
        return str(self.cfg.save_every)

    def _last_save(self) -> str:
        if self.last_commit is not None and self.last_commit_seconds is not None:
            return f"{self.last_commit.step} ({format_duration(self.last_commit_seconds)})"
        if self.resumed_from is not None:
            return f"resumed {self.resumed_from.step}"
        return "-"

    def committed(self, save: PendingSave, seconds: float) -> None:
        self.commits += 1
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(save.metrics.items()))
        # A background save returns once the host copy is made; the write goes on behind.
        info = save.wait() if save.done and not save.failed else None
        took = format_duration(seconds)
        if info is not None:
            what = f"saved {save.path} in {took} ({format_size(info.size)})"
        else:
            what = f"saving {save.path} in the background ({took} stall)"
        # Too wide for one line: the metrics go on the next, whole (a terminal would
        # wrap inside a number).
        whole = f"{what}  {metrics}" if metrics else what
        if len(whole) > terminal_width():
            whole = f"{what}\n  {metrics}" if metrics else what
        if self.tty and self.reports:
            click.echo(_CLEAR_LINE, nl=False)
        self._echo(whole)
        self.line_open = False

    def _echo(self, text: str, *, nl: bool = True) -> None:
        """``text`` to stdout (rank 0 only); a whole line is fitted to the terminal."""
        if self.reports:
            if nl:
                text = "\n".join(wrap_text(text, terminal_width()))
            click.echo(text, nl=nl)
