"""Several processes, one run: torch.distributed (torchrun, accelerate launch).

Replicated state (DDP: every rank holds the same weights and optimizer) is written once,
by rank 0, which alone holds the run lock, writes the run record and commits. What
differs between ranks is their random number generators: at each save every rank's RNG
state is gathered to rank 0 and stored in ``ranks.json`` inside the checkpoint, so the
manifest covers it like any other file. The gather is also the barrier of the commit
protocol: rank 0 commits only after every rank has handed over its state.

Agreement, so that ranks never diverge on what to do:

- saving: rank 0's schedule decides (a time-based schedule would otherwise fire at
  different steps), and a stop request on any rank (a signal) makes every rank save the
  same step; one small ``all_reduce`` per step carries both.
- resuming: rank 0 picks the checkpoint (after fetching it from a remote mirror when
  needed) and broadcasts its step; every rank loads that one.

Without torch.distributed initialised every function here is a no-op for one process.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safepoint.fileio import dumps_json, loads_json, read_regular
from safepoint.records import RunRecord
from safepoint.rng import capture_rng, restore_rng
from safepoint.snapshot import Snapshot

log = logging.getLogger("safepoint")

RANKS_NAME = "ranks.json"
"""Per-rank state of a multi-process checkpoint: world size and each rank's RNG."""


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _device() -> torch.device:
    # NCCL reduces only CUDA tensors; a gloo (or "cpu:gloo,cuda:nccl") group takes CPU ones.
    backend = str(_dist().get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, world size, whether it writes."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """From the initialised default process group, else a single process."""
        dist = _dist()
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        """True when several processes must agree (a process group of more than one)."""
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 holds the lock, writes the record and commits checkpoints."""
        return self.rank == 0

    # ------------------------------------------------------------------- saving

    def agree_to_save(self, reason: str | None, stop: Any = None) -> str | None:
        """The save decision of this step, the same on every rank.

        Rank 0's ``reason`` decides. A stop signal received by any rank (``stop`` is the
        Checkpointer's ``EmergencyStop``) is passed on to every rank, so that all of them
        save the same step and stop. Collective: every rank calls it at every step.
        """
        if not self.active:
            return reason
        guard = getattr(stop, "guard", None)
        mine = int(guard.signal) if guard is not None and guard.signal is not None else 0
        due_here = int(self.is_writer and reason is not None)
        flags = torch.tensor([due_here, mine], dtype=torch.int32, device=_device())
        _dist().all_reduce(flags, op=_dist().ReduceOp.MAX)
        due, signum = (int(v) for v in flags.tolist())
        if signum and guard is not None and guard.signal is None:
            log.warning("another rank received a stop signal; this rank stops with it")
            guard.received(signal.Signals(signum))
        if not due:
            return None
        return reason or "in step with rank 0"

    def gather_rng(self, snapshot: Snapshot) -> None:
        """Gather every rank's RNG state; on rank 0, add them to ``snapshot`` as
        ``ranks.json``. Collective: every rank calls it for the same step."""
        if not self.active:
            return
        mine = json.dumps(capture_rng())
        gathered: list[Any] | None = [None] * self.world_size if self.is_writer else None
        # Strings only, so nothing but JSON ever crosses (and nothing is unpickled from disk).
        _dist().gather_object(mine, gathered, dst=0)
        if self.is_writer and gathered is not None:
            doc = {
                "world_size": self.world_size,
                "step": snapshot.step,
                "rng": [json.loads(s) for s in gathered],
            }
            snapshot.files[RANKS_NAME] = dumps_json(doc)

    # ----------------------------------------------------------------- resuming

    def agree_on_checkpoint(self, choose: Callable[[], int | None]) -> int | None:
        """The step every rank resumes from: ``choose()`` on rank 0, broadcast to all."""
        if not self.active:
            return choose()
        box: list[Any] = [choose() if self.is_writer else None]
        _dist().broadcast_object_list(box, src=0)
        step = box[0]
        return step if isinstance(step, int) else None

    def rank_rng(self, path: Path) -> dict[str, Any] | None:
        """This rank's RNG state saved in the checkpoint ``path``, or None (single process
        checkpoint: its ``state.json`` holds the only RNG state)."""
        doc = _read_ranks(path)
        if doc is None:
            return None
        states = doc.get("rng") if isinstance(doc, dict) else None
        if not isinstance(states, list) or not states:
            return None
        state = states[self.rank % len(states)]
        return state if isinstance(state, dict) else None

    def restore_rank_rng(self, path: Path, *, rng: bool = True) -> None:
        """After a checkpoint was loaded: this rank's own RNG state, and a warning when
        the checkpoint was saved by another number of processes."""
        doc = _read_ranks(path)
        if doc is None:
            doc = {"world_size": 1, "rng": []}
        saved = doc.get("world_size") if isinstance(doc, dict) else None
        states = doc.get("rng") if isinstance(doc, dict) else None
        if saved != self.world_size and self.is_writer:  # once, not once per rank
            log.warning(
                "%s was saved by %s process(es), this run has %d: training continues from "
                "the same step and sample position, but the order in which data reaches "
                "each process changes, so the run will not match an uninterrupted one",
                path.name,
                saved,
                self.world_size,
            )
        if rng and isinstance(states, list) and states:
            restore_rng(states[self.rank % len(states)])

    def broadcast_json(self, doc: Any) -> Any:
        """Rank 0's JSON document ``doc``, on every rank. Collective."""
        if not self.active:
            return doc
        box: list[Any] = [json.dumps(doc) if self.is_writer else None]
        _dist().broadcast_object_list(box, src=0)  # a str: nothing but JSON crosses
        return json.loads(box[0])

    def gather_json(self, doc: Any) -> list[Any] | None:
        """Every rank's JSON document ``doc``, in rank order, on rank 0 (None elsewhere).
        Collective."""
        if not self.active:
            return [doc]
        gathered: list[Any] | None = [None] * self.world_size if self.is_writer else None
        _dist().gather_object(json.dumps(doc), gathered, dst=0)
        return [json.loads(s) for s in gathered] if gathered is not None else None

    def barrier(self) -> None:
        if self.active:
            _dist().barrier()


class QuietRecord(RunRecord):
    """The run record of a rank other than 0: rank 0 alone writes the run's record."""

    def __init__(self) -> None:
        super().__init__(Path("."))

    def event(self, kind: str, **fields: Any) -> None:
        pass


class FullState:
    """A sharded (FSDP) model and its optimizer, saved as one full state by rank 0.

    ``state_dict()`` gathers the full, unsharded tensors to rank 0's CPU memory
    (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True``), so the
    checkpoint is the same pickle-free folder, manifest and commit protocol as any other
    and loads under any number of processes; ``load_state_dict()`` shards it again on
    every rank. It costs one full copy of the state in rank 0's host memory per save.
    Collective: every rank must save and restore together (``Checkpointer.step`` does).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model, options=options)}
        model, optim = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model, "optimizer": optim}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"], options=options)
        else:
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optimizer"],
                options=options,
            )


_MAX_RANKS_BYTES = 64 << 20  # one RNG state per rank: tens of KB each


def _read_ranks(path: Path) -> Any:
    """The per-rank document of checkpoint ``path``, or None when it has none. Read like
    every file of a checkpoint: a regular file, no link followed, bounded size and JSON."""
    if not (path / RANKS_NAME).exists():
        return None
    data = read_regular(path / RANKS_NAME, max_size=_MAX_RANKS_BYTES)
    return loads_json(bytes(data), where=str(path / RANKS_NAME))
