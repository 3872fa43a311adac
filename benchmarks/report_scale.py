"""What the run record costs a training loop, and how long `safepoint report` takes on a
long run's record.

usage: python benchmarks/report_scale.py [--steps 1000,10000,100000]

For each run length: appends one ``metrics`` event per step (as ``Checkpointer.step``
with metrics does), a ``save`` every 100 steps and a ``delete`` after each (keep_last=3),
timing each append; then times ``last_reached_step`` (run at every Checkpointer start),
``extract`` and ``write_report``. The checkpoints themselves are not written: the record
alone is measured (``extract`` sees the 3 kept ones as not on disk).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import table, write_results

from safepoint.records import RECORD_NAME, RunRecord, last_reached_step
from safepoint.report import extract
from safepoint.report_render import write_report


def one(steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        record = RunRecord(d)
        record.event("start", pid=1, config={"keep_last": 3}, on_disk=[])
        appends = []
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            record.event("metrics", step=step, metrics={"loss": 1.0 / step, "lr": 1e-3})
            appends.append(time.perf_counter() - t0)
            if step % 100 == 0:
                save = {"stall_s": 0.01, "write_s": 0.1, "bytes": 10**6, "result": "committed"}
                record.event("save", step=step, reason="step", metrics={"loss": 1 / step}, **save)
                if step > 300:
                    record.event("delete", step=step - 300, bytes=10**6, rule="keep_last=3")
        size = (Path(d) / RECORD_NAME).stat().st_size
        t0 = time.perf_counter()
        last_reached_step(d)
        reached_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = extract(d)
        extract_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_report(data, Path(d) / "out")
        render_s = time.perf_counter() - t0
    return {
        "steps": steps,
        "record_mb": size / 1e6,
        "append_us_median": statistics.median(appends) * 1e6,
        "append_us_p99": sorted(appends)[int(len(appends) * 0.99)] * 1e6,
        "last_reached_ms": reached_s * 1e3,
        "extract_s": extract_s,
        "render_s": render_s,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", default="1000,10000,100000")
    args = p.parse_args(argv)
    rows = [one(int(n)) for n in args.steps.split(",")]
    headers = list(rows[0])
    body = table(headers, [[r[h] for h in headers] for r in rows])
    title = "Run record cost and report time by run length"
    write_results("report_scale", title, body, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
