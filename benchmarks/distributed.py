"""Cost of safepoint under torch.distributed (gloo on CPU, torchrun --nproc_per_node 2).

usage: python benchmarks/distributed.py [--steps 2000] [--saves 10] [--width 1024]

Per-step cost: ``Checkpointer.step`` with no save due still runs one small all_reduce
(rank 0's save decision and any rank's stop signal), measured against a loop without
safepoint. Per-save cost: the RNG gather to rank 0 and rank 0's commit, as seen by
rank 0 (the writer) and by rank 1 (which only hands over its RNG state).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(out: Path, steps: int, saves: int, width: int) -> None:
    import torch
    import torch.distributed as dist

    from safepoint import Checkpointer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    state = {"w": torch.randn(width, width)}
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        pass
    bare = time.perf_counter() - t0
    flags = torch.zeros(2, dtype=torch.int32)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    allreduce = (time.perf_counter() - t0) / steps
    with Checkpointer(out, save_every=str(10**9)) as ckpt:
        dist.barrier()
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            ckpt.step(step, state)
        per_step = (time.perf_counter() - t0 - bare) / steps
        stalls = []
        for i in range(saves):
            dist.barrier()
            t0 = time.perf_counter()
            ckpt.save(steps + i + 1, state)
            stalls.append(time.perf_counter() - t0)
    stalls.sort()
    result = {
        "rank": rank,
        "per_step_us": per_step * 1e6,
        "allreduce_us": allreduce * 1e6,
        "save_s": stalls[len(stalls) // 2],
    }
    print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--saves", type=int, default=10)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--worker", default=None)
    args = p.parse_args()
    if args.worker:
        worker(Path(args.worker), args.steps, args.saves, args.width)
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import table, write_results

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", "2", __file__, "--worker", tmp]
        cmd += ["--steps", str(args.steps), "--saves", str(args.saves)]
        cmd += ["--width", str(args.width)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    results = sorted((json.loads(line[7:]) for line in lines), key=lambda r: r["rank"])
    mb = args.width * args.width * 4 / 1e6
    rows = [[r["rank"], r["per_step_us"], r["allreduce_us"], r["save_s"]] for r in results]
    heads = ["rank", "step(), no save due (us)", "of which: one all_reduce alone (us)"]
    body = table([*heads, f"save() of {mb:.0f} MB (s)"], rows)
    body += (
        f"\n\n{args.steps} steps, median of {args.saves} saves; 2 processes, gloo on "
        "loopback. Rank 1 writes nothing: its save cost is handing over its RNG state "
        "(sync save: it does not wait for rank 0's commit)."
    )
    write_results("distributed", "torch.distributed overhead", body, {"results": results})


if __name__ == "__main__":
    main()
