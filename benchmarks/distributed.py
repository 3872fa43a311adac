"""Cost of safepoint under torch.distributed (gloo on CPU, torchrun, OMP_NUM_THREADS=1).

usage: python benchmarks/distributed.py [--only overhead,sharded] [--quick]
       [--steps 2000] [--saves 10] [--width 1024]            (overhead)
       [--size-mb 500] [--worlds 2,3] [--sharded-saves 3]    (sharded)

overhead (2 processes): ``Checkpointer.step`` with no save due still runs one small
all_reduce (rank 0's save decision and any rank's stop signal), measured against a loop
without safepoint. Per-save cost: the RNG gather to rank 0 and rank 0's commit, as seen
by rank 0 (the writer) and by rank 1 (which only hands over its RNG state).
Writes ``results/distributed.md``.

sharded (issue #16): a stack of 2048-wide Linear layers, float32, ``--size-mb`` of
weights + AdamW state, FSDP2-sharded (``fully_shard`` per layer and whole), a few
optimizer steps, then ``--sharded-saves`` in-line saves, for each world size and each
way of saving it: ``{"model": net, "optimizer": opt}`` (every rank writes its pieces)
or ``{"sharded": FullState(net, opt)}`` (gathered to rank 0, which writes alone). Each
configuration is a fresh torchrun; each rank reports the time it was blocked in
``save().wait()`` (median), the bytes of the files it wrote, its peak RSS in setup and
training (``ru_maxrss`` before the saves) and during the saves (``VmHWM``, the peak reset
through ``/proc/self/clear_refs`` before each save; the reset clears ``ru_maxrss`` too),
and how far its RSS rose while saving: that peak minus the RSS before the first save
(after ``malloc_trim``, so that pages freed in setup do not hide what the saves need;
none is trimmed between saves). Write throughput is compared with ``dd conv=fsync`` of
the checkpoint's size, measured after each configuration (safepoint writes tensor
files with ``O_DIRECT``, dd through the page cache). Writes
``results/distributed_sharded.md``.
``--quick`` shrinks both parts to check that the script works (numbers meaningless).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import dd_seconds, leave_process_group, table, write_results

PARTS = ("overhead", "sharded")
MODES = ("sharded", "full")
MODE_NAMES = {"sharded": "sharded", "full": "FullState"}
WIDTH = 2048  # of the sharded part's Linear layers: 16 MB of weights each
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- overhead (2 ranks)


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
    leave_process_group()


def overhead(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*TORCHRUN, "--nproc_per_node", "2", __file__, "--worker", tmp]
        cmd += ["--steps", str(args.steps), "--saves", str(args.saves)]
        cmd += ["--width", str(args.width)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=True)
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
    name = "distributed_quick" if args.quick else "distributed"
    write_results(name, "torch.distributed overhead", body, {"results": results})


# ------------------------------------------------- sharded vs FullState (FSDP2, N ranks)


def layers_for(size_mb: float) -> int:
    """Linear layers whose weights + AdamW state (3 float32 copies) are ~``size_mb``."""
    return max(1, round(size_mb * 1e6 / (12 * WIDTH * (WIDTH + 1))))


def _vm(field: str) -> int:
    """A size from /proc/self/status (VmRSS, VmHWM), in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) * 1024


def _written_by(folder: Path, rank: int) -> int:
    """Bytes of the files of checkpoint ``folder`` that ``rank`` wrote: its own
    ``*.shard-<rank+1>-of-*`` files; rank 0 also every file that is not a shard."""
    own = f".shard-{rank + 1:05d}-of-"
    return sum(
        f.stat().st_size
        for f in folder.iterdir()
        if own in f.name or (rank == 0 and ".shard-" not in f.name)
    )


def shard_worker(out: Path, mode: str, size_mb: float, saves: int, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from safepoint import Checkpointer
    from safepoint.distributed import FullState

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers_for(size_mb))))
    for layer in net:
        fully_shard(layer)
    fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    for _ in range(steps):  # so that AdamW's exp_avg / exp_avg_sq exist
        loss = net(torch.randn(8, WIDTH)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {"model": net, "optimizer": opt}
    if mode == "full":
        state = {"sharded": FullState(net, opt)}
    setup_s = time.perf_counter() - t0
    peak_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gc.collect()
    # Free pages that malloc kept from setup (the unsharded model): else a save can reuse
    # them unseen and the rise below understates what it needs.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_before = _vm("VmRSS")
    stalls: list[float] = []
    peaks: list[int] = []
    with Checkpointer(out / "ckpt", save_every=str(10**9)) as ckpt:
        for i in range(saves):
            dist.barrier()
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            t0 = time.perf_counter()
            info = ckpt.save(steps + i + 1, state).wait()
            stalls.append(time.perf_counter() - t0)
            peaks.append(_vm("VmHWM"))
        dist.barrier()  # every rank's files are in place
        result = {
            "rank": rank,
            "world": world,
            "mode": mode,
            "setup_s": setup_s,
            "stalls_s": stalls,
            "stall_s": statistics.median(stalls),
            "bytes": _written_by(info.path, rank),
            "checkpoint_bytes": sum(f.stat().st_size for f in info.path.iterdir()),
            "rss_before": rss_before,
            "peak_setup": peak_setup,
            "peaks_saves": peaks,
            "rss_rise": max(peaks) - rss_before,
            "rss_after": _vm("VmRSS"),
        }
    if rank == 0:
        lines = (out / "ckpt" / "safepoint.log.jsonl").read_text().splitlines()
        events = [e for e in map(json.loads, lines) if e.get("event") == "save"]
        result["record"] = [
            {k: e.get(k) for k in ("stall_s", "write_s", "bytes", "mode")} for e in events
        ]
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    leave_process_group()


def _config(base: Path, mode: str, world: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh torchrun of ``world`` ranks saving with ``mode``; its ranks' reports."""
    out = base / f"{mode}-{world}"
    out.mkdir()
    cmd = [*TORCHRUN, "--nproc_per_node", str(world), __file__, "--shard-worker", str(out)]
    cmd += ["--mode", mode, "--size-mb", str(args.size_mb)]
    cmd += ["--sharded-saves", str(args.sharded_saves), "--train-steps", str(args.train_steps)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} x {world} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(out / "ckpt")
    dd_s = dd_seconds(base, ranks[0]["checkpoint_bytes"])
    print(f"  {MODE_NAMES[mode]} x {world}: {wall:.0f} s", flush=True)
    return {"mode": mode, "world": world, "wall_s": wall, "dd_s": dd_s, "ranks": ranks}


def _per_rank(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in values)


def _tables(runs: list[dict[str, Any]]) -> str:
    main_rows, io_rows = [], []
    for run in runs:
        ranks, r0 = run["ranks"], run["ranks"][0]
        total = r0["checkpoint_bytes"]
        name = MODE_NAMES[run["mode"]]
        stalls = [r["stall_s"] for r in ranks]
        peaks = [r0["peak_setup"] / 1e9, max(r0["peaks_saves"]) / 1e9]
        rises = [(r0["peaks_saves"][0] - r0["rss_before"]) / 1e6, r0["rss_rise"] / 1e6]
        main_rows.append([
            name, run["world"], _per_rank(stalls, ".2f"),
            _per_rank([r["bytes"] / 1e6 for r in ranks], ".0f"),
            _per_rank(peaks, ".2f"), _per_rank(rises, ".0f"), total / 1e6,
        ])  # fmt: skip
        write_s = statistics.median(e["write_s"] for e in r0["record"] if e["write_s"])
        io_rows.append([
            name, run["world"],
            _per_rank([r["bytes"] / r["stall_s"] / 1e6 for r in ranks], ".0f"),
            total / max(stalls) / 1e6, total / write_s / 1e6, total / run["dd_s"] / 1e6,
            _per_rank([r["rss_rise"] / 1e6 for r in ranks], ".0f"),
        ])  # fmt: skip
    main = table(
        ["mode", "ranks", "save stall per rank, median (s)", "MB written per rank",
         "rank 0 peak RSS: training / saves (GB)",
         "rank 0 RSS rise while saving: 1st save / all (MB)", "checkpoint (MB)"],
        main_rows,
    )  # fmt: skip
    io = table(
        ["mode", "ranks", "MB/s per rank (its bytes / its stall)",
         "MB/s all ranks (checkpoint / slowest stall)", "MB/s checkpoint / write_s (record)",
         "dd conv=fsync MB/s", "RSS rise while saving per rank (MB)"],
        io_rows,
    )  # fmt: skip
    return f"{main}\n\n{io}"


def _ratios(runs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    by = {(run["mode"], run["world"]): run["ranks"] for run in runs}
    lines, data = [], {}
    for world in sorted({w for _, w in by}):
        if ("sharded", world) not in by or ("full", world) not in by:
            continue
        sh, fu = by["sharded", world], by["full", world]
        ratio = {
            "rank0_rss_rise": sh[0]["rss_rise"] / fu[0]["rss_rise"],
            "rank0_stall": sh[0]["stall_s"] / fu[0]["stall_s"],
            "slowest_stall": max(r["stall_s"] for r in sh) / max(r["stall_s"] for r in fu),
        }
        data[str(world)] = ratio
        lines.append(
            f"{world} ranks, sharded / FullState: rank 0 RSS rise x{ratio['rank0_rss_rise']:.2f}, "
            f"rank 0 stall x{ratio['rank0_stall']:.2f}, slowest rank's stall "
            f"x{ratio['slowest_stall']:.2f}."
        )
    return "\n".join(lines), data


def sharded(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="sp-dist-"))
    runs = []
    t_start = time.perf_counter()
    try:
        for world in args.worlds:
            for mode in MODES:
                runs.append(_config(base, mode, world, args))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    total = time.perf_counter() - t_start
    ratios, ratio_data = _ratios(runs)
    layers = layers_for(args.size_mb)
    body = (
        f"{layers} Linear({WIDTH}, {WIDTH}) layers, float32, FSDP2 (`fully_shard` per layer "
        f"and whole), {args.train_steps} AdamW steps, then {args.sharded_saves} in-line "
        "saves (`ckpt.save(step, state).wait()`, after a barrier); medians of the saves. "
        "A fresh torchrun (gloo, OMP_NUM_THREADS=1) per row. RSS rise while saving: peak "
        "RSS during the saves minus RSS before them (after setup and `malloc_trim`); "
        "peak RSS in training: `ru_maxrss` before the saves (setup: each rank builds the "
        "whole model, then shards it).\n\n"
        f"{_tables(runs)}\n\n{ratios}\n\nWhole benchmark: {total:.0f} s."
    )
    data = {
        "size_mb": args.size_mb,
        "layers": layers,
        "width": WIDTH,
        "saves": args.sharded_saves,
        "train_steps": args.train_steps,
        "runs": runs,
        "ratios": ratio_data,
        "run_s": total,
    }
    name = "distributed_sharded" + ("_quick" if args.quick else "")
    write_results(name, "Sharded vs FullState saves under FSDP2", body, data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(PARTS), help="overhead,sharded")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script only")
    p.add_argument("--steps", type=int, default=2000, help="overhead: step() calls")
    p.add_argument("--saves", type=int, default=10, help="overhead: saves")
    p.add_argument("--width", type=int, default=1024, help="overhead: one width x width tensor")
    p.add_argument("--size-mb", type=float, default=500, help="sharded: weights + AdamW state")
    p.add_argument("--worlds", default="2,3", help="sharded: process counts")
    p.add_argument("--sharded-saves", type=int, default=3, help="sharded: saves per run")
    p.add_argument("--train-steps", type=int, default=2, help="sharded: AdamW steps first")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shard-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="sharded", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(Path(args.worker), args.steps, args.saves, args.width)
        return
    if args.shard_worker:
        shard_worker(
            Path(args.shard_worker), args.mode, args.size_mb, args.sharded_saves, args.train_steps
        )
        return
    if args.quick:
        args.steps, args.saves, args.size_mb, args.sharded_saves = 200, 3, 40, 2
    args.worlds = [int(w) for w in args.worlds.split(",")]
    only = set(args.only.split(","))
    if "overhead" in only:
        overhead(args)
    if "sharded" in only:
        sharded(args)


if __name__ == "__main__":
    main()
