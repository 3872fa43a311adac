"""Time from a stop signal to exit code 3, by state size (what ``--grace`` must cover).

usage: python benchmarks/emergency_stop.py [--widths 10000,100000,800000] [--repeat 2]

Runs ``tests/programs/toy_train.py`` (a plain PyTorch loop on ``Checkpointer``; model plus AdamW
state of about 252 bytes per unit of ``--width``) with no scheduled save, sends SIGTERM
after its third step, and measures: the emergency save as recorded (``stall_s`` of the
``emergency`` save event) and the wall time from the signal to the process exit. The
step time of the loop (0.2 s) bounds the wait for the step boundary.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import table, write_results

TOY = Path(__file__).parent.parent / "tests" / "programs" / "toy_train.py"
STEP_SLEEP = 0.2


def one(width: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        argv = [sys.executable, str(TOY), str(out), "--steps", "100000", "--save-every", "100000"]
        argv += ["--width", str(width), "--step-sleep", str(STEP_SLEEP)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        while not proc.stdout.readline().startswith("step 3"):
            if proc.poll() is not None:
                raise SystemExit(f"toy_train failed: {proc.stderr.read()[-2000:]}")
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=600)
        exit_s = time.perf_counter() - sent
        if proc.returncode != 3:
            raise SystemExit(f"expected exit code 3, got {proc.returncode}")
        events = [json.loads(line) for line in (out / "safepoint.log.jsonl").open()]
        save = next(e for e in events if e["event"] == "save" and e["reason"] == "emergency")
        return {"bytes": save["bytes"], "save_s": save["stall_s"], "exit_s": exit_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--widths", default="10000,100000,800000")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    rows, data = [], []
    for width in (int(w) for w in args.widths.split(",")):
        runs = [one(width) for _ in range(args.repeat)]
        mb = runs[0]["bytes"] / 1e6
        save = statistics.median(r["save_s"] for r in runs)
        exit_s = statistics.median(r["exit_s"] for r in runs)
        rows.append([width, round(mb, 1), round(save, 3), round(exit_s, 3)])
        data.append({"width": width, "runs": runs})
        print(rows[-1], flush=True)
    body = table(["width", "state MB", "emergency save s", "signal to exit 3 s"], rows)
    body += (
        f"\n\nMedians of {args.repeat} runs. Signal to exit includes waiting for the step "
        f"boundary (steps of {STEP_SLEEP} s here) and the interpreter's exit. Set "
        "`--grace` to the scheduler's kill delay; safepoint skips the emergency save "
        "when the last measured save would not fit in what is left of it."
    )
    write_results("emergency_stop", "Emergency stop: signal to exit code 3", body, {"rows": data})


if __name__ == "__main__":
    main()
