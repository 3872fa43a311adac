"""Disk safety: estimate a checkpoint's size, check free space before training, and tell
the disk errors that freeing space may cure.

The estimate serialises nothing: ``capture(..., copy=False)`` only references the live
tensors, and the safetensors headers are computed exactly by ``safetensors_layout``.
Optimizers such as Adam create their state at the first step, so before training that
state is missing from ``state_dict()``; it is added from the optimizer's kind, as meta
tensors, so that the headers and ``state.json`` come out exact.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safepoint.errors import DiskBudgetError
from safepoint.fileio import dumps_json
from safepoint.format import dtype_of, safetensors_layout
from safepoint.manifest import MANIFEST_NAME, FileEntry, Manifest
from safepoint.plan import Saves, disk_needed
from safepoint.retention import KeepLast, RetentionPolicy
from safepoint.schema import STATE_NAME
from safepoint.sharding import SHARDS_NAME, build_index, shard_file
from safepoint.snapshot import Snapshot, TensorFile, capture
from safepoint.units import format_size

MANIFEST_BASE = 700
MANIFEST_PER_FILE = 128
"""``safepoint.json`` when its content is not known: ~700 bytes plus a line per file."""

# What each torch optimizer creates lazily, at its first step, per parameter with a
# gradient: "p" a tensor like the parameter, "s" a float32 scalar tensor. Adagrad
# creates its state in __init__, so it is already in ``state_dict()``.
_LAZY_STATE: dict[str, tuple[tuple[str, str], ...]] = {
    "Adam": (("step", "s"), ("exp_avg", "p"), ("exp_avg_sq", "p")),
    "AdamW": (("step", "s"), ("exp_avg", "p"), ("exp_avg_sq", "p")),
    "Adamax": (("step", "s"), ("exp_avg", "p"), ("exp_inf", "p")),
    "NAdam": (("step", "s"), ("mu_product", "s"), ("exp_avg", "p"), ("exp_avg_sq", "p")),
    "RAdam": (("step", "s"), ("exp_avg", "p"), ("exp_avg_sq", "p")),
    "Adadelta": (("step", "s"), ("square_avg", "p"), ("acc_delta", "p")),
    "ASGD": (("step", "s"), ("eta", "s"), ("mu", "s"), ("ax", "p")),
    "Rprop": (("step", "s"), ("prev", "p"), ("step_size", "p")),
    "RMSprop": (("step", "s"), ("square_avg", "p")),
    "SGD": (),
}
# Optimizers not in the table (bitsandbytes, Adafactor...) are assumed to keep what
# AdamW keeps: two tensors per parameter, which over-counts the factored or 8-bit ones.
_UNKNOWN_STATE = _LAZY_STATE["AdamW"]

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
    # accelerate wraps the optimizer (AcceleratedOptimizer.optimizer); the wrapper is an
    # Optimizer too, so look inside first: its class name says nothing of the state.
    # An LR scheduler also has an ``optimizer`` attribute, but saves none of its state.
    if isinstance(value, torch.optim.lr_scheduler.LRScheduler):
        return None
    inner = getattr(value, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer) and inner is not value:
        return _unwrap_optimizer(inner)
    return value if isinstance(value, torch.optim.Optimizer) else None


def _lazy_entries(opt: torch.optim.Optimizer, group: Mapping[str, Any]) -> list[tuple[str, str]]:
    entries = list(_LAZY_STATE.get(type(opt).__name__, _UNKNOWN_STATE))
    name = type(opt).__name__
    if name in ("Adam", "AdamW") and group.get("amsgrad"):
        entries.append(("max_exp_avg_sq", "p"))
    if name in ("SGD", "RMSprop") and group.get("momentum"):
        entries.append(("momentum_buffer", "p"))
    if name == "RMSprop" and group.get("centered"):
        entries.append(("grad_avg", "p"))
    return entries


class _ProjectedOptimizer:
    """An optimizer's ``state_dict()`` as it will be after its first step: the state it
    creates lazily is added as meta tensors (no memory), so that ``capture`` computes the
    exact safetensors header and ``state.json`` of a real save."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def state_dict(self) -> dict[str, Any]:
        doc = self.opt.state_dict()
        state = dict(doc["state"])
        index = 0
        for group in self.opt.param_groups:
            entries = _lazy_entries(self.opt, group)
            for p in group["params"]:
                if p.requires_grad and not self.opt.state.get(p) and entries:
                    state[index] = {
                        key: torch.empty(
                            p.shape if kind == "p" else (),
                            dtype=p.dtype if kind == "p" else torch.float32,
                            device="meta",
                        )
                        for key, kind in entries
                    }
                index += 1
        return {**doc, "state": state}

    def load_state_dict(self, _doc: Any) -> None:  # makes ``capture`` see a stateful object
        raise NotImplementedError


def projected_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with each optimizer replaced by its state after the first step."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        opt = _unwrap_optimizer(value)
        out[key] = _ProjectedOptimizer(opt) if opt is not None else value
    return out


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


def manifest_bytes(sizes: Mapping[str, int], **fields: Any) -> int:
    """Bytes of the ``safepoint.json`` listing files of ``sizes``; ``fields``: the other
    ``Manifest`` fields (step, metrics, versions, info...) as the save will fill them."""
    files = {name: FileEntry(size, "0" * 32) for name, size in sizes.items()}
    return len(Manifest(files=files, **{"step": 0, **fields}).to_json())


def estimate_checkpoint_bytes(
    state: Mapping[str, Any],
    *,
    extra_files: Mapping[str, TensorFile | bytes] | None = None,
    progress: Mapping[str, Any] | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> int:
    """Bytes one checkpoint of ``state`` will take on disk (within 1% when ``manifest``
    is given, see ``benchmarks/preflight.py``).

    Copies no tensor. Includes the optimizer state that does not exist yet (before the
    first optimizer step), headers, ``state.json`` and the manifest. ``extra_files``:
    files an integration adds to the snapshot itself (adapter weights, configs; bytes of
    the expected size stand for a file that grows, like ``trainer_state.json``).
    ``progress``: as passed to ``capture``. ``manifest``: ``Manifest`` fields as the save
    will fill them (info, versions, metrics); without it a typical size is assumed.
    """
    return sum(
        estimate_file_sizes(
            state, extra_files=extra_files, progress=progress, manifest=manifest
        ).values()
    )


def estimate_file_sizes(
    state: Mapping[str, Any],
    *,
    extra_files: Mapping[str, TensorFile | bytes] | None = None,
    progress: Mapping[str, Any] | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """``estimate_checkpoint_bytes`` file by file (``safepoint.json`` included)."""
    snapshot = capture(
        projected_state(state), step=0, copy=False, rng=True, progress=progress
    ).resolve()
    files = {**snapshot.files, **(extra_files or {})}
    sizes = {name: files_bytes({name: content}) for name, content in files.items()}
    sizes |= _other_ranks_pieces(snapshot, sizes) | _ranks_doc(snapshot)
    if manifest is None:
        sizes[MANIFEST_NAME] = MANIFEST_BASE + MANIFEST_PER_FILE * len(files)
    else:
        sizes[MANIFEST_NAME] = manifest_bytes(sizes, **manifest)
    return sizes


def _other_ranks_pieces(snapshot: Snapshot, sizes: Mapping[str, int]) -> dict[str, int]:
    """Of a sharded state: the files the other ranks write and ``shards.json``. This
    rank captured only its own pieces; the global shapes say what the others hold."""
    import torch.distributed as dist

    if not snapshot.sharded:
        return {}
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out: dict[str, int] = {}
    for key, layout in snapshot.shards.items():
        total = sum(
            math.prod(spec["shape"]) * dtype_of(spec["dtype"], where=key).itemsize
            for spec in layout.values()
        )
        mine = shard_file(key, rank, world)
        payload = snapshot.files[mine].nbytes if mine in snapshot.files else 0  # type: ignore[union-attr]
        header = sizes.get(mine, 0) - payload
        rest = max(total - payload, 0)
        for r in range(world):
            if r != rank:
                out[shard_file(key, r, world)] = header + rest // max(world - 1, 1)
    layouts = [snapshot.shards] * world  # every rank lists about as many pieces as this one
    out[SHARDS_NAME] = len(dumps_json(build_index(world, layouts)))
    return out


def _ranks_doc(snapshot: Snapshot) -> dict[str, int]:
    """Several processes: ``ranks.json``, every rank's RNG state (``distributed.py``)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2:
        return {}
    one = len(snapshot.files[STATE_NAME])  # type: ignore[arg-type]  # mostly the RNG state
    return {"ranks.json": one * dist.get_world_size()}


def block_size(directory: Path) -> int:
    """The allocation unit of the file system of ``directory`` (4096 on ext4 and tmpfs)."""
    try:
        return os.statvfs(directory).f_frsize or 4096
    except OSError:
        return 4096


def on_disk(sizes: Mapping[str, int], block: int) -> int:
    """Space files of ``sizes`` take in one folder: each rounded up to whole blocks, plus
    the folder itself. On the 300 KB tmpfs of issue #12 a LoRA checkpoint of 86.8 KB of
    files takes 106.5 KB; counting bytes alone let a run start that could not finish."""
    return block + sum(-(-size // block) * block for size in sizes.values())


def used_bytes(path: Path) -> int:
    """Space a committed checkpoint folder takes on its disk (allocated blocks)."""
    try:
        total = path.stat().st_blocks * 512
        for child in path.iterdir():
            total += child.stat().st_blocks * 512
    except OSError:
        return 0
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
    others: int = 0
    """Of ``kept``, how many the rules other than keep_last hold (best, milestones...)."""
    files_bytes: int = 0
    """The estimated bytes of one checkpoint's files (what ``ls`` shows as its size);
    ``checkpoint_bytes`` is the space they take on this disk, whole blocks."""

    @property
    def fits(self) -> bool:
        return self.free >= self.needed


def check_free_space(
    directory: Path,
    checkpoint_bytes: int,
    policy: RetentionPolicy,
    *,
    saves: Saves | None = None,
    held: int = 0,
    free: int | None = None,
) -> DiskCheck:
    """Compare the space the retention policy needs with the free space of ``directory``.

    ``saves``: what the schedule fixes of the run's saves, if anything; ``held``: bytes
    of this run's checkpoints already on disk (a resumed run); ``free`` overrides the
    measured free space (for tests and ``plan``).
    """
    if free is None:
        free = shutil.disk_usage(directory).free
    saves = saves or Saves()
    kept = policy.kept_count(saves)
    total = disk_needed(checkpoint_bytes, kept, max_bytes=policy.max_bytes)
    unbounded = total is None
    if total is None:  # keeps everything of a run of unknown length: check one save
        total = 2 * checkpoint_bytes
    needed = max(checkpoint_bytes, total - held)
    bounds = [r.bound(saves) for r in policy.rules if not isinstance(r, KeepLast)]
    others = sum(b or 0 for b in bounds)
    return DiskCheck(directory, checkpoint_bytes, kept, needed, free, held, unbounded, others)


def require_fits(check: DiskCheck, policy: RetentionPolicy) -> None:
    """Raise ``DiskBudgetError`` with the numbers and the options if ``check`` fails."""
    size = check.checkpoint_bytes
    if policy.max_bytes is not None and policy.max_bytes < size:
        raise DiskBudgetError(
            f"max_disk={format_size(policy.max_bytes)} is smaller than one checkpoint "
            f"(~{format_size(size)}); raise max_disk to at least {_size(2 * size)}"
        )
    if check.fits:
        return
    where = check.directory
    short = format_size(check.needed - check.free)
    if check.free < size:
        raise DiskBudgetError(
            f"{where} has {format_size(check.free)} free, not enough for even one checkpoint "
            f"(~{format_size(size)}); free {short} more or choose another output directory"
        )
    slots = (check.free + check.held) // size - 1  # one slot for the save in flight
    options = [f"free {short} more"]
    keep_last = slots - check.others
    if keep_last >= 1:
        options.append(f"keep_last={keep_last}")
    elif policy.keep_best and slots - check.others + policy.keep_best >= 1:
        options.append(f"keep_last={slots - check.others + policy.keep_best} keep_best=0")
    if slots >= 2:
        options.append(f"max_disk={_size(slots * size)}")
    options.append("another output directory with more space")
    kept = f"{check.kept} kept" if check.kept is not None else "all kept"
    raise DiskBudgetError(
        f"{where} has {format_size(check.free)} free but the checkpoints need "
        f"~{format_size(check.needed)} ({kept} x ~{format_size(size)} + 1 being written"
        + (f", less {format_size(check.held)} already on disk" if check.held else "")
        + "); "
        + ", or ".join(options)
    )


def preflight_warnings(check: DiskCheck, policy: RetentionPolicy) -> list[str]:
    """Choices that will work but probably hurt, found by the pre-flight check."""
    size = check.checkpoint_bytes
    notes = []
    room = (check.free + check.held) // size if size else 0
    if check.unbounded and room < 100:
        notes.append(
            f"every checkpoint is kept (no keep_last or max_disk) at ~{format_size(size)} each; "
            f"{format_size(check.free)} free holds ~{room} of them; consider keep_last or "
            "max_disk"
        )
    if policy.max_bytes is not None and size <= policy.max_bytes < 2 * size:
        notes.append(
            f"max_disk={format_size(policy.max_bytes)} holds one checkpoint of "
            f"~{format_size(size)}: the newest is always kept, so every save briefly needs "
            "two; raise max_disk to at least twice the checkpoint size"
        )
    return notes


def _size(n: int) -> str:
    return format_size(n).replace(" ", "")
