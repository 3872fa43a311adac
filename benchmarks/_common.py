"""Shared helpers of the benchmark scripts: tables, result files, machine description."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import psutil
    import torch

    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table (also readable in a terminal)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, body: str, data: dict[str, Any]) -> Path:
    """Print ``body`` and write ``results/<name>.md`` and ``.json``; return the .md path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    info = machine()
    md = (
        f"# {title}\n\n`{command}` ({when}; {info['cpus']} CPUs, {info['ram_gb']} GB RAM, "
        f"load average {info['load_avg']})\n\n{body}\n"
    )
    md_path = RESULTS / f"{name}.md"
    md_path.write_text(md)
    payload = {"command": command, "when": when, "machine": info, **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(body)
    print(f"\nwrote {md_path} and {md_path.with_suffix('.json')}")
    return md_path


def dd_seconds(base: Path, nbytes: int) -> float:
    """Seconds for ``dd conv=fsync`` to write ``nbytes`` on the file system of ``base``:
    the disk's own pace, measured in the same run as what it is compared with."""
    path = base / "dd.bin"
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={max(1, nbytes >> 20)}",
         "conv=fsync"],
        check=True, capture_output=True,
    )  # fmt: skip
    secs = time.perf_counter() - t0
    path.unlink()
    return secs


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
