"""Time to put the data position back on resume: safepoint's GlobalOrderSampler vs the
Hugging Face way (accelerate's ``skip_first_batches``, what the Trainer calls).

usage: python benchmarks/data_resume.py [--size 2000000] [--batch 8] [--repeat 3]
       [--cursors 10000,100000,1000000]

For each cursor (samples of the epoch already trained), from a fresh DataLoader over
an in-memory data set of ints (loading a sample costs next to nothing, so only the
positioning is measured), the time until the first batch after the cursor is in hand:

- safepoint: ``GlobalOrderSampler.load_state_dict`` (arithmetic) and the first batch
  (which draws the epoch's permutation: the same cost at any cursor);
- accelerate, map-style data set: ``skip_first_batches(loader, cursor // batch)`` and the
  first batch (the skipped batches' indices are drawn one by one, their samples not
  loaded): what the Trainer does on resume;
- accelerate, iterable data set: the same call on a loader over an ``IterableDataset``
  (streamed data): the skipped batches are loaded, collated and thrown away.

Median of ``--repeat`` runs per cell, all in one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results


class Ints(IterableDataset):
    """0, 1, 2, ...: a stream whose items cost nothing to make."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.size))


def safepoint(size: int, batch: int, cursor: int) -> float:
    from safepoint.data_order import GlobalOrderSampler

    state = {"version": 1, "seed": 0, "dataset_size": size, "epoch": 0, "cursor": 0}
    state["permutation_xxh3"] = GlobalOrderSampler(size, batch).state_dict()["permutation_xxh3"]
    data = range(size)
    t0 = time.perf_counter()
    sampler = GlobalOrderSampler(size, batch, rank=0, world_size=1)
    sampler.load_state_dict({**state, "cursor": cursor})
    first = next(iter(DataLoader(data, batch_sampler=sampler)))
    elapsed = time.perf_counter() - t0
    assert len(first) == batch
    return elapsed


def accelerate_map(size: int, batch: int, cursor: int) -> float:
    from accelerate import skip_first_batches

    data = range(size)
    t0 = time.perf_counter()
    loader = DataLoader(data, batch_size=batch, shuffle=True)
    first = next(iter(skip_first_batches(loader, cursor // batch)))
    elapsed = time.perf_counter() - t0
    assert len(first) == batch
    return elapsed


def accelerate_iterable(size: int, batch: int, cursor: int) -> float:
    from accelerate import skip_first_batches

    t0 = time.perf_counter()
    loader = DataLoader(Ints(size), batch_size=batch)
    first = next(iter(skip_first_batches(loader, cursor // batch)))
    elapsed = time.perf_counter() - t0
    assert first.tolist() == list(range(cursor, cursor + batch))
    return elapsed


WAYS: dict[str, Callable[[int, int, int], float]] = {
    "safepoint": safepoint,
    "accelerate_map": accelerate_map,
    "accelerate_iterable": accelerate_iterable,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2_000_000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cursors", default="10000,100000,1000000")
    args = p.parse_args()
    cursors = [int(c) for c in args.cursors.split(",")]
    if max(cursors) + args.batch > args.size:
        p.error("every cursor must leave a batch: --size > largest cursor + --batch")
    torch.set_num_threads(1)
    from accelerate import PartialState

    PartialState()  # accelerate's one-time set-up, outside the timings
    for way in WAYS.values():  # first calls pay imports and allocator warm-up
        way(args.size, args.batch, 0)
    results = []
    for cursor in cursors:
        cell = {}
        for name, way in WAYS.items():
            cell[name] = statistics.median(
                way(args.size, args.batch, cursor) for _ in range(args.repeat)
            )
        results.append({"cursor": cursor, "batches": cursor // args.batch, **cell})
        print(f"cursor {cursor}: " + ", ".join(f"{k} {v:.4f} s" for k, v in cell.items()))
    fresh = statistics.median(accelerate_map(args.size, args.batch, 0) for _ in range(args.repeat))
    rows = [
        [
            f"{r['cursor']:,}",
            f"{r['batches']:,}",
            r["safepoint"],
            r["accelerate_map"],
            r["accelerate_map"] / r["safepoint"],
            r["accelerate_iterable"],
            r["accelerate_iterable"] / r["safepoint"],
        ]
        for r in results
    ]
    heads = [
        "cursor (samples)",
        "batches skipped",
        "safepoint load_state_dict + 1st batch (s)",
        "accelerate skip_first_batches, map-style (s)",
        "x safepoint",
        "accelerate skip_first_batches, iterable (s)",
        "x safepoint",
    ]
    body = table(heads, rows)
    body += (
        f"\n\n{args.size:,} samples of an in-memory data set of ints, batch {args.batch}, one "
        f"process, one thread, median of {args.repeat}. safepoint's cost is the epoch's "
        "permutation (torch.randperm of the data set), the same at any cursor; "
        "skip_first_batches draws every skipped batch (map-style: the indices; iterable: "
        "the samples too, here free ints, real ones are read and tokenized). For scale: a "
        f"fresh shuffled DataLoader's first batch, nothing skipped, takes {fresh:.3g} s "
        "(torch's RandomSampler turns the whole permutation into a Python list)."
    )
    write_results(
        "data_resume",
        "Putting the data position back on resume",
        body,
        {
            "size": args.size,
            "batch": args.batch,
            "repeat": args.repeat,
            "fresh_loader_s": fresh,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
