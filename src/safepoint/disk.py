"""Disk safety: estimate a checkpoint's size, check free space before training, and tell
the disk errors that freeing space may cure.

The estimate serialises nothing: ``capture(..., copy=False)`` only references the live
tensors, and the safetensors headers are computed exactly by ``safetensors_layout``.
Optimizers such as Adam create their state at the first step, so before training that
state is missing from ``state_dict()``; it is added from the optimizer's kind.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safepoint.errors import DiskBudgetError
from safepoint.format import safetensors_layout
from safepoint.plan import disk_needed, kept_count
from safepoint.retention import RetentionPolicy
from safepoint.snapshot import TensorFile, capture
from safepoint.units import format_size

MANIFEST_BASE = 700
MANIFEST_PER_FILE = 128
"""``safepoint.json``: ~700 bytes of versions and info, plus a line per file it lists."""

# Tensors per parameter that each optimizer creates lazily, at its first step.
_LAZY_STATE = {
    "Adam": 2,
    "AdamW": 2,
    "Adamax": 2,
    "NAdam": 2,
    "RAdam": 2,
    "Adagrad": 1,
    "Adadelta": 2,
    "RMSprop": 1,
    "ASGD": 2,
    "Rprop": 2,
}

RECOVERABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})
"""Disk errors after which safepoint frees space by retention and retries once."""


def is_recoverable(exc: BaseException) -> bool:
    """True if ``exc`` (or the error it wraps) is a full disk, a quota or an I/O error."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in RECOVERABLE_ERRNOS:
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


def _unwrap_optimizer(value: Any) -> torch.optim.Optimizer | None:
    # accelerate wraps the optimizer (AcceleratedOptimizer.optimizer); an LR scheduler
    # also has an ``optimizer`` attribute, but saves none of its state
    if isinstance(value, torch.optim.lr_scheduler.LRScheduler):
        return None
    for candidate in (value, getattr(value, "optimizer", None)):
        if isinstance(candidate, torch.optim.Optimizer):
            return candidate
    return None


def _lazy_optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the state ``opt`` will create at its first step for params without state."""
    total = 0
    for group in opt.param_groups:
        per_param = _LAZY_STATE.get(type(opt).__name__)
        if per_param is None:  # SGD and unknown optimizers
            per_param = 1 if group.get("momentum") else 0
        if type(opt).__name__ == "RMSprop":
            per_param += int(bool(group.get("momentum"))) + int(bool(group.get("centered")))
        for p in group["params"]:
            if p.requires_grad and not opt.state.get(p):
                # each state tensor is a copy of the parameter, plus a `step` scalar and
                # roughly 80 bytes of safetensors header per tensor
                total += per_param * (p.numel() * p.element_size() + 80) + 100
    return total


def files_bytes(files: Mapping[str, TensorFile | bytes]) -> int:
    """Exact bytes the files of a snapshot take once written (safetensors headers too)."""
    total = 0
    for content in files.values():
        if isinstance(content, TensorFile):
            header, _ = safetensors_layout(content.tensors, content.metadata)
            total += len(header) + content.nbytes
        else:
            total += len(content)
    return total


def estimate_checkpoint_bytes(
    state: Mapping[str, Any], *, extra_files: Mapping[str, TensorFile | bytes] | None = None
) -> int:
    """Bytes one checkpoint of ``state`` will take on disk (within a few percent).

    Copies no tensor. Includes optimizer state that does not exist yet (before the
    first optimizer step), headers, ``state.json`` and the manifest. ``extra_files``:
    files an integration adds to the snapshot itself (adapter weights, configs).
    """
    snapshot = capture(state, step=0, copy=False, rng=True)
    files = {**snapshot.files, **(extra_files or {})}
    total = MANIFEST_BASE + MANIFEST_PER_FILE * len(files) + files_bytes(files)
    seen: set[int] = set()
    for value in state.values():
        opt = _unwrap_optimizer(value)
        if opt is not None and id(opt) not in seen:
            seen.add(id(opt))
            total += _lazy_optimizer_bytes(opt)
    return total


@dataclass(frozen=True)
class DiskCheck:
    """The numbers behind the pre-flight check."""

    directory: Path
    checkpoint_bytes: int
    kept: int | None
    """Most checkpoints retention will hold at once; None when nothing bounds it."""
    needed: int
    """Free bytes needed now: the kept set plus one in flight, less what the run holds."""
    free: int
    held: int
    """Bytes this run's checkpoints already take in ``directory``."""
    unbounded: bool = False
    milestones: int = 0

    @property
    def fits(self) -> bool:
        return self.free >= self.needed


def check_free_space(
    directory: Path,
    checkpoint_bytes: int,
    policy: RetentionPolicy,
    *,
    saves: int | None = None,
    milestones: int = 0,
    held: int = 0,
    free: int | None = None,
) -> DiskCheck:
    """Compare the space the retention policy needs with the free space of ``directory``.

    ``saves``: how many saves the run will make, if known; ``held``: bytes of this run's
    checkpoints already on disk (a resumed run); ``free`` overrides the measured free
    space (for tests and ``plan``).
    """
    if free is None:
        free = shutil.disk_usage(directory).free
    kept = kept_count(
        saves, keep_last=policy.keep_last, keep_best=policy.keep_best, milestones=milestones
    )
    total = disk_needed(checkpoint_bytes, kept, max_bytes=policy.max_bytes)
    unbounded = total is None
    if total is None:  # keeps everything of a run of unknown length: check one save
        total = 2 * checkpoint_bytes
    needed = max(checkpoint_bytes, total - held)
    return DiskCheck(directory, checkpoint_bytes, kept, needed, free, held, unbounded, milestones)


def require_fits(check: DiskCheck, policy: RetentionPolicy) -> None:
    """Raise ``DiskBudgetError`` with the numbers and the options if ``check`` fails."""
    size = check.checkpoint_bytes
    if policy.max_bytes is not None and policy.max_bytes < size:
        raise DiskBudgetError(
            f"max_disk={format_size(policy.max_bytes)} is smaller than one checkpoint "
            f"(~{format_size(size)}); raise --max-disk to at least {format_size(2 * size)}"
        )
    if check.fits:
        return
    where = check.directory
    if check.free < size:
        raise DiskBudgetError(
            f"{where} has {format_size(check.free)} free, not enough for even one checkpoint "
            f"(~{format_size(size)}); free space or choose another --output-dir"
        )
    slots = (check.free + check.held) // size - 1  # one slot for the save in flight
    keep_last = slots - policy.keep_best - check.milestones
    options = [f"--keep-last {keep_last}"] if keep_last >= 1 else []
    if slots >= 2:
        options.append(f"--max-disk {format_size(slots * size).replace(' ', '')}")
    options.append("another --output-dir with more space")
    kept = f"{check.kept} kept" if check.kept is not None else "all kept"
    raise DiskBudgetError(
        f"{where} has {format_size(check.free)} free but the checkpoints need "
        f"~{format_size(check.needed)} ({kept} x ~{format_size(size)} + 1 being written"
        + (f", less {format_size(check.held)} already on disk" if check.held else "")
        + "); use "
        + ", or ".join(options)
    )


def planned_saves(
    triggers_kinds: set[str], step_interval: int | None, total_steps: int | None
) -> int | None:
    """How many checkpoints a run saves, when its schedule fixes it (steps, fractions)."""
    if not total_steps:
        return None
    if not triggers_kinds:
        return 1  # only the final checkpoint
    if triggers_kinds - {"steps", "fraction"} or not step_interval:
        return None  # time, epoch and auto depend on the run
    return total_steps // step_interval + (1 if total_steps % step_interval else 0)


def preflight_warnings(check: DiskCheck, policy: RetentionPolicy) -> list[str]:
    """Choices that will work but probably hurt, found by the pre-flight check."""
    size = check.checkpoint_bytes
    notes = []
    room = (check.free + check.held) // size if size else 0
    if check.unbounded and room < 100:
        notes.append(
            f"every checkpoint is kept (no keep_last or max_disk) at ~{format_size(size)} each; "
            f"{format_size(check.free)} free holds ~{room} of them; consider --keep-last or "
            "--max-disk"
        )
    if policy.max_bytes is not None and size <= policy.max_bytes < 2 * size:
        notes.append(
            f"max_disk={format_size(policy.max_bytes)} holds one checkpoint of "
            f"~{format_size(size)}: the newest is always kept, so every save briefly needs "
            "two; raise --max-disk to at least twice the checkpoint size"
        )
    return notes
