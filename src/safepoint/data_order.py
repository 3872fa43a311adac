"""The data order of a run as one global sample cursor, valid under any number of processes.

``GlobalOrderSampler`` is a batch sampler (``DataLoader(ds, batch_sampler=sampler)``)
whose position is not "how far each rank's iterator got" but "how many samples of this
epoch's permutation the whole run has trained on". That number means the same thing
with 1, 2 or 3 processes, so a run saved by N processes resumes on M with every
remaining sample of the epoch trained exactly once, and putting the position back is
arithmetic: nothing is iterated, however far into the epoch the run was.

Put it in the Checkpointer's state like any other stateful object::

    state = {"model": net, "optimizer": opt, "data": sampler}
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import xxhash
from torch.utils.data import Sampler

from safepoint.errors import ConfigError, IncompatibleCheckpointError, SafepointWarning

STATE_VERSION = 1


def _process_group() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"GlobalOrderSampler: {name} must be a positive int, not {value!r}")
    return value


class GlobalOrderSampler(Sampler[list[int]]):
    """Batches of sample indices in one seeded order shared by all ranks, resumable on
    any number of processes.

    **Order.** Each epoch is one permutation of ``range(dataset_size)`` drawn by
    ``torch.randperm`` from a ``torch.Generator`` seeded with ``seed + epoch``: the same
    on every rank and in every run. It is built when iteration starts (``8 *
    dataset_size`` bytes, ~10 ms per million samples) and kept for the epoch.

    **Position.** ``(epoch, cursor)``: ``cursor`` is the number of samples of this
    epoch's permutation that the run has trained on, counted over all ranks, the same
    on every rank. A step takes the next ``world_size * batch_size`` samples from the
    cursor; rank ``r`` gets the ``r``-th contiguous block of ``batch_size`` of them.

    **The tail.** With ``drop_last=False``, the last step of an epoch takes the
    ``R < world_size * batch_size`` samples left and splits them as evenly as possible
    (shares differ by at most one, lower ranks first). When ``R < world_size`` the ranks
    from ``R`` on get an empty batch ``[]``: they must still take part in the step (DDP
    waits for every rank), and the default ``collate_fn`` cannot stack nothing, so pass
    one that accepts ``[]``. Every sample of every epoch is then trained exactly once,
    whatever the process counts of the runs that made up the epoch. With
    ``drop_last=True`` the epoch ends when fewer than a global batch remain; every
    sample trained is trained once, and the ``R`` dropped are the permutation's last,
    with ``R`` smaller than the global batch of the run that reaches the end (a resume
    with another world size changes how many are dropped, not which are trained twice).

    **Consumed, not handed out.** A DataLoader asks for batches ahead of the training
    loop (with ``num_workers > 0`` it keeps ``prefetch_factor * num_workers`` batches in
    flight), so the batches the sampler has yielded are not the batches the loop has
    trained on. The position therefore moves only by ``advance()``: call it once per
    batch the loop has trained on (with gradient accumulation, once per micro-batch or
    ``advance(k)`` per optimizer step), before ``Checkpointer.step``. The checkpoint then
    holds exactly what the loop consumed, for any ``num_workers``. Each new iteration
    (``for batch in loader``) starts at the position. ``state_dict()`` warns if batches
    were yielded but ``advance()`` was never called (the position would not have moved).

    **Epochs.** When ``advance()`` consumes the epoch's last batch the position moves to
    ``(epoch + 1, 0)``, and the next iteration draws the next permutation.
    ``set_epoch(e)`` is there for ``DistributedSampler``-style loops: it does nothing for
    the current epoch (so ``for e in range(sampler.epoch, epochs): sampler.set_epoch(e)``
    continues a resumed epoch where it stopped), jumps forward to a later one and refuses
    an earlier one.

    **Resume.** ``load_state_dict`` sets the position in O(1); world size and batch size
    may differ from the run that saved it, the dataset size and seed may not
    (``IncompatibleCheckpointError``). The saved state also holds a hash (xxh3-64) of the epoch's
    permutation, checked when the permutation is rebuilt, so a ``torch.randperm`` that
    changed between torch versions is an error instead of a silently different order.

    ``rank`` and ``world_size`` default to those of the initialised default process
    group (else 0 and 1). Not thread-safe; one sampler per process.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.dataset_size = _positive_int("dataset_size", dataset_size)
        self.batch_size = _positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"GlobalOrderSampler: seed must be an int >= 0, not {seed!r}")
        self.seed = seed
        group_rank, group_world = _process_group()
        self.world_size = _positive_int(
            "world_size", group_world if world_size is None else world_size
        )
        self.rank = group_rank if rank is None else rank
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise ConfigError(f"GlobalOrderSampler: rank must be an int, not {self.rank!r}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"GlobalOrderSampler: rank {self.rank} is outside a world of "
                f"{self.world_size} process(es); pass 0 <= rank < world_size"
            )
        self.drop_last = bool(drop_last)
        if self.drop_last and self.dataset_size < self.global_batch:
            raise ConfigError(
                f"GlobalOrderSampler: {self.dataset_size} samples are fewer than one global "
                f"batch ({self.world_size} process(es) x batch_size={self.batch_size}), so "
                "drop_last=True would never draw a batch; use drop_last=False or a smaller "
                "batch_size"
            )
        self._epoch = 0
        self._cursor = 0
        self._perm: tuple[int, torch.Tensor, int] | None = None  # (epoch, order, hash)
        self._expect: tuple[int, int] | None = None  # (epoch, hash) from a checkpoint
        self._yielded = 0
        self._advanced = False
        self._warned = False

    # ------------------------------------------------------------------ position

    @property
    def epoch(self) -> int:
        """The epoch the position is in."""
        return self._epoch

    @property
    def cursor(self) -> int:
        """Samples of this epoch's permutation trained on, over all ranks."""
        return self._cursor

    @property
    def global_batch(self) -> int:
        """Samples one step takes over all ranks: ``world_size * batch_size``."""
        return self.world_size * self.batch_size

    def _take(self, cursor: int) -> int:
        """Samples the step starting at ``cursor`` takes over all ranks (0: epoch done)."""
        left = self.dataset_size - cursor
        if self.drop_last:
            return self.global_batch if left >= self.global_batch else 0
        return min(left, self.global_batch)

    def _normalise(self) -> None:
        # A position always has a batch left: an epoch with none is over.
        if self._take(self._cursor) == 0:
            self._epoch, self._cursor = self._epoch + 1, 0

    def __len__(self) -> int:
        """Batches an iteration started now yields: the rest of the current epoch."""
        left = self.dataset_size - self._cursor
        if self.drop_last:
            return left // self.global_batch
        return -(-left // self.global_batch)

    def advance(self, batches: int = 1) -> None:
        """The training loop has trained on ``batches`` more of this sampler's batches
        (on every rank): move the position past them, into the next epoch at its end."""
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise ConfigError(f"advance() takes a number of batches >= 0, not {batches!r}")
        self._advanced = True
        for _ in range(batches):
            self._cursor += self._take(self._cursor)
            self._normalise()

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch``; nothing if the position is already in it."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise ConfigError(f"set_epoch() takes an int, not {epoch!r}")
        if epoch < self._epoch:
            raise ConfigError(
                f"set_epoch({epoch}): the sampler is already in epoch {self._epoch} "
                "(restored from a checkpoint or advanced past its end); loop over "
                "range(sampler.epoch, epochs)"
            )
        if epoch > self._epoch:
            self._epoch, self._cursor = epoch, 0

    # ------------------------------------------------------------------ order

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_size, generator=gen)
            digest = xxhash.xxh3_64_intdigest(order.numpy())
            if self._expect is not None and self._expect[0] == epoch and self._expect[1] != digest:
                raise IncompatibleCheckpointError(
                    f"the permutation of epoch {epoch} (seed {self.seed}) differs from the one "
                    f"the checkpoint was saved with (torch {torch.__version__} draws another "
                    "torch.randperm order?); resume with the torch version that saved it"
                )
            self._perm = (epoch, order, digest)
        return self._perm[1]

    def _share(self, order: torch.Tensor, cursor: int, take: int) -> list[int]:
        # Shares as even as possible, lower ranks first; all equal to batch_size unless
        # this is the tail of the epoch.
        each, extra = divmod(take, self.world_size)
        lo = cursor + self.rank * each + min(self.rank, extra)
        hi = lo + each + (1 if self.rank < extra else 0)
        return order[lo:hi].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches from the position to the end of the epoch. The position
        itself moves only by ``advance()``."""
        epoch, cursor = self._epoch, self._cursor
        order = self._permutation(epoch)
        while (take := self._take(cursor)) > 0:
            self._yielded += 1
            yield self._share(order, cursor, take)
            cursor += take

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The position as JSON values: version, seed, dataset size, epoch, cursor and
        the xxh3-64 hash of the epoch's permutation. The same on every rank."""
        if self._yielded and not self._advanced and not self._warned:
            self._warned = True
            warnings.warn(
                f"GlobalOrderSampler yielded {self._yielded} batch(es) but advance() was "
                "never called, so the saved position is still where this run started; call "
                "sampler.advance() after each batch the loop trains on",
                SafepointWarning,
                stacklevel=2,
            )
        self._permutation(self._epoch)
        assert self._perm is not None
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "epoch": self._epoch,
            "cursor": self._cursor,
            "permutation_xxh3": self._perm[2],
        }

    def check_state_dict(self, state: Mapping[str, Any]) -> dict[str, int]:
        """Raise ``IncompatibleCheckpointError`` unless ``load_state_dict(state)`` would
        succeed; changes nothing (a loader can check every entry before loading any)."""
        values = _checked(state)
        if values["dataset_size"] != self.dataset_size:
            raise IncompatibleCheckpointError(
                f"the checkpoint's data position is in an order of {values['dataset_size']} "
                f"samples, this sampler has {self.dataset_size}; resume with the same data "
                "set, or leave the sampler out of the restored state to start a new order"
            )
        if values["seed"] != self.seed:
            raise IncompatibleCheckpointError(
                f"the checkpoint's data position is in the order of seed {values['seed']}, "
                f"this sampler has seed={self.seed}; resume with seed={values['seed']}"
            )
        if values["cursor"] > self.dataset_size:
            raise IncompatibleCheckpointError(
                f"the checkpoint's data cursor {values['cursor']} is past the end of "
                f"{self.dataset_size} samples; the checkpoint's data state is damaged"
            )
        return values

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put the position back in O(1), with any world size and batch size; the dataset
        size and seed must be the saving run's (``IncompatibleCheckpointError``)."""
        values = self.check_state_dict(state)
        self._epoch, self._cursor = values["epoch"], values["cursor"]
        self._expect = (self._epoch, values["permutation_xxh3"])
        if self._perm is not None and self._perm[0] == self._epoch:
            self._perm = None  # check the cached order against the checkpoint's too
        self._normalise()  # drop_last with a larger global batch: that epoch may be over
        self._yielded, self._advanced, self._warned = 0, False, False


_FIELDS = ("version", "seed", "dataset_size", "epoch", "cursor", "permutation_xxh3")


def _checked(state: Mapping[str, Any]) -> dict[str, int]:
    if not isinstance(state, Mapping):
        raise IncompatibleCheckpointError(
            f"the checkpoint's data state is a {type(state).__name__}, not a "
            "GlobalOrderSampler state; restore it into the object that saved it"
        )
    version = state.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > STATE_VERSION:
        raise IncompatibleCheckpointError(
            f"the checkpoint's data state has version {version}, this safepoint reads up "
            f"to {STATE_VERSION}; upgrade safepoint to resume it"
        )
    bad = [
        k
        for k in _FIELDS
        if isinstance(state.get(k), bool) or not isinstance(state.get(k), int) or state[k] < 0
    ]
    if bad:
        raise IncompatibleCheckpointError(
            f"the checkpoint's data state lacks valid {', '.join(bad)} (not a "
            "GlobalOrderSampler state?); restore it into the object that saved it"
        )
    return {k: int(state[k]) for k in _FIELDS}
