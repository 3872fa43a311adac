"""What ``safepoint train`` prints: a progress line, one line per commit, the outcome."""

from __future__ import annotations

import time
from typing import Any

import click

from safepoint.app.config import TrainConfig
from safepoint.integrations.hf import SafepointCallback
from safepoint.store import CheckpointInfo
from safepoint.units import format_size

_CLEAR_LINE = "\r\x1b[K"  # back to the start of the live progress line and erase it


def bar(step: int, total: int, width: int = 24) -> str:
    filled = int(width * step / max(total, 1))
    return "#" * filled + "." * (width - filled)


class JobCallback(SafepointCallback):
    """``SafepointCallback`` that reports to the terminal (a live line on a TTY, a line
    every 5 steps otherwise) and counts its commits."""

    def __init__(self, cfg: TrainConfig, *, tty: bool, **options: Any) -> None:
        super().__init__(**options)
        self.cfg = cfg
        self.tty = tty
        self.started = time.monotonic()
        self.commits = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        super().on_train_begin(args, state, control, **kw)
        where = (
            f"resuming from {self.resumed_from.path} (step {state.global_step})"
            if self.resumed_from
            else "starting fresh"
        )
        click.echo(
            f"safepoint train: {where}; {state.max_steps} steps, saving {self.cfg.save_every}"
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        super().on_log(args, state, control, logs=logs, **kw)
        logs = logs or {}
        if "loss" not in logs or self.checkpointer is None:
            return
        step, total = state.global_step, state.max_steps
        interval = self.checkpointer.schedule.step_interval()
        nxt = f"step {min((step // interval + 1) * interval, total)}" if interval else None
        last = f"{self.last_commit_seconds:.2f} s" if self.last_commit_seconds else "-"
        line = (
            f"[{bar(step, total)}] {step}/{total}  loss {logs['loss']:.4f}  "
            f"next save {nxt or self.cfg.save_every}  last save {last}"
        )
        if self.tty:
            click.echo("\r" + line, nl=False)
        elif step % 5 == 0 or step == total:
            click.echo(line)

    def committed(self, info: CheckpointInfo, seconds: float) -> None:
        self.commits += 1
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(info.metrics.items()))
        # An async save returns once the host copy is made; the write goes on behind.
        what = "saved" if info.valid else "saving"
        size = f" ({format_size(info.size)})" if info.valid else ", writing in the background"
        click.echo(
            f"{_CLEAR_LINE if self.tty else ''}{what} {info.path} in {seconds:.2f} s"
            f"{size}{'  ' + metrics if metrics else ''}"
        )
