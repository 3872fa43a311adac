"""Checksum speed: sha256 vs blake2b vs xxh3_128 vs crc32 over 1 GB in memory.

usage: python benchmarks/checksum.py [--gb 1.0] [--repeat 3]

Hashes a 64 MB random buffer repeatedly (the speed does not depend on the content) in
64 MB updates, as the writer does, and reports the best of ``--repeat`` runs in s/GB.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results


def _crc32() -> Callable[[memoryview], object]:
    state = [0]

    def update(b: memoryview) -> object:
        state[0] = zlib.crc32(b, state[0])
        return state[0]

    return update


ALGORITHMS: dict[str, Callable[[], Callable[[memoryview], object]]] = {
    "sha256": lambda: hashlib.sha256().update,
    "blake2b": lambda: hashlib.blake2b().update,
    "xxh3_128": lambda: xxhash.xxh3_128().update,
    "crc32 (zlib)": _crc32,
}


def measure(
    update_factory: Callable[[], Callable[[memoryview], object]], buf: memoryview, total: int
) -> float:
    update = update_factory()
    t0 = time.perf_counter()
    done = 0
    while done < total:
        update(buf)
        done += len(buf)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    buf = memoryview(os.urandom(64 << 20))
    total = int(args.gb * (1 << 30))
    rows, data = [], {}
    for name, factory in ALGORITHMS.items():
        best = min(measure(factory, buf, total) for _ in range(args.repeat))
        s_per_gb = best / (total / (1 << 30))
        data[name] = {"s_per_gb": s_per_gb, "gb_per_s": 1 / s_per_gb}
        rows.append([name, s_per_gb, 1 / s_per_gb])
        print(f"{name}: {s_per_gb:.3f} s/GB", flush=True)
    body = table(["checksum", "s per GB", "GB/s"], rows)
    body += (
        "\n\nsafepoint uses xxh3_128: the fastest by an order of magnitude, 128 bits so "
        "accidental collisions are out of the question; corruption detection is its job "
        "(it is not a signature)."
    )
    write_results("checksum", "Checksum speed", body, {"gb": args.gb, "results": data})


if __name__ == "__main__":
    main()
