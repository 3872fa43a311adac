"""Shared helpers of the benchmark scripts: tables, result files, machine description,
``dd`` baselines and bootstrap intervals."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent


def load_avg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> str:
    """The commit the benchmark ran on, ``+dirty`` where ``src/`` or ``benchmarks/`` had
    uncommitted changes (then the numbers are of code no commit holds)."""

    def git(*a: str) -> str:
        done = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short=10", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "src", "benchmarks") else "")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil
    import torch

    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_avg": load_avg(),
    }


def machine_line(info: dict[str, Any], *, disk: str | None = None) -> str:
    """One line a reader needs beside any number: cores, memory, disk, load, commit."""
    load = info["load_avg"]
    before = info.get("load_avg_before")
    load_text = f"load average {before} before, {load} after" if before else f"load {load}"
    return (
        f"{info['cpus_usable']} of {info['cpus']} CPUs, {info['ram_gb']} GB RAM"
        + (f", GPU {info['cuda']}" if info.get("cuda") else "")
        + (f", disk {disk}" if disk else "")
        + f"; {load_text}; torch {info['torch']}, Python {info['python']}"
    )


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table (also readable in a terminal)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str,
    title: str,
    body: str,
    data: dict[str, Any],
    *,
    load_before: list[float] | None = None,
    disk: str | None = None,
) -> Path:
    """Print ``body`` and write ``results/<name>.md`` and ``.json``; return the .md path.

    Both start with the command line, the date, the git commit and the machine (cores,
    memory, ``disk``: its speed measured in the same run, and the load average before
    the benchmark, ``load_before``, and now)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    commit = git_commit()
    info = machine()
    if load_before is not None:
        info["load_avg_before"] = load_before
    header = f"`{command}`\n\n{when}, commit {commit}; {machine_line(info, disk=disk)}"
    md = f"# {title}\n\n{header}\n\n{body}\n"
    md_path = RESULTS / f"{name}.md"
    md_path.write_text(md)
    payload = {"command": command, "when": when, "commit": commit, "machine": info, **data}
    if disk:
        payload["disk"] = disk
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\n{header}\n\n{body}")
    print(f"\nwrote {md_path} and {md_path.with_suffix('.json')}")
    return md_path


def dd_write(base: Path, nbytes: int, *, direct: bool) -> dict[str, Any] | None:
    """Time ``dd`` writing about ``nbytes`` of zeros to the file system of ``base`` and
    making them durable: ``oflag=direct conv=fsync`` (``direct``, the baseline of an
    ``O_DIRECT`` writer) or ``conv=fsync`` through the page cache. 8 MiB blocks from
    8 MiB up (each baseline at its best: 1 MiB ``O_DIRECT`` blocks are slower), else
    1 MiB. Returns mode, bytes written, seconds and GB/s; None where the file system
    refuses ``O_DIRECT`` (tmpfs)."""
    block = 8 << 20 if nbytes >= 8 << 20 else 1 << 20
    count = max(1, round(nbytes / block))
    flags = ["oflag=direct", "conv=fsync"] if direct else ["conv=fsync"]
    path = base / "dd.bin"
    t0 = time.perf_counter()
    done = subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}", *flags],
        capture_output=True,
    )  # fmt: skip
    secs = time.perf_counter() - t0
    path.unlink(missing_ok=True)
    if done.returncode != 0:
        if direct:
            return None
        raise RuntimeError(f"dd failed: {done.stderr.decode(errors='replace')}")
    written = block * count
    return {"mode": " ".join(flags), "bytes": written, "s": secs, "gb_s": written / secs / 1e9}


def dd_seconds(base: Path, nbytes: int) -> float:
    """Seconds for ``dd conv=fsync`` to write ``nbytes`` on the file system of ``base``:
    the disk's own pace, measured in the same run as what it is compared with."""
    result = dd_write(base, nbytes, direct=False)
    assert result is not None
    return result["s"] * nbytes / result["bytes"]


def bootstrap_ci(
    values: Sequence[float | None],
    *,
    statistic: Callable[..., Any] | None = None,
    level: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float] | None:
    """``statistic`` (default: the median) of ``values`` and its percentile bootstrap
    interval at ``level``: (point, low, high). ``None`` values are dropped; None if none
    is left. Seeded: the same values give the same interval. With one value the
    interval is that value; with a handful the interval is wide, as it should be."""
    import numpy as np

    stat = statistic or np.median
    xs = np.asarray([v for v in values if v is not None], dtype=float)
    if xs.size == 0:
        return None
    point = float(stat(xs))
    rng = np.random.default_rng(seed)
    samples = xs[rng.integers(0, xs.size, size=(resamples, xs.size))]
    stats = stat(samples, axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return point, float(low), float(high)


def format_ci(ci: tuple[float, float, float] | None, digits: int = 3) -> str:
    """``point [low, high]`` with ``digits`` significant digits; ``-`` for none."""
    if ci is None:
        return "-"
    return "{:.{d}g} [{:.{d}g}, {:.{d}g}]".format(*ci, d=digits)


def leave_process_group() -> None:
    """End a torchrun worker whose results are written: destroy the process group and
    exit past the interpreter's teardown, where torch's gloo aborts now and then
    ("terminate called without an active exception"; 5 of 40 runs of a plain DDP script,
    2026-12-02; tests/programs/_leave.py says the same)."""
    import torch.distributed as dist

    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
