"""Durable save of a 1 GB state: safepoint vs torch.save vs safetensors vs dd.

usage: python benchmarks/commit.py [--gb 1.0] [--repeat 3] [--dir DIR]

The state is a model plus its AdamW state (weights, exp_avg, exp_avg_sq: float32), about
``--gb`` GB in all. Every method writes the same tensor bytes to ``--dir`` (default: a
temporary folder under the system temp dir) and is timed until the data is durable:
- dd: ``dd if=/dev/zero of=FILE bs=1M count=N conv=fsync`` (the disk's own speed);
- torch.save + fsync: the stock Trainer's way (pickle; shown for comparison only);
- safetensors.save_file + fsync;
- safepoint: ``Checkpointer.save`` (staging folder, fsync of each file, manifest with
  xxh3 checksums, directory fsyncs, rename).
Targets (issue 2): safepoint within 1.25x of dd, no slower than torch.save + fsync.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from safepoint import Checkpointer

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results


def build_state(gb: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Linear layers of 2048x2048 plus AdamW state: 3 float32 copies ~= ``gb`` GB."""
    torch.manual_seed(0)
    per_layer = 2048 * 2048 * 4 * 3
    layers = max(1, round(gb * (1 << 30) / per_layer))
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # creates exp_avg / exp_avg_sq
    return model, opt


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flat(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                flat[f"opt.{i}.{k}"] = v
    return flat


def methods(
    model: torch.nn.Module, opt: torch.optim.Optimizer, nbytes: int
) -> dict[str, Callable[[Path], None]]:
    def dd(d: Path) -> None:
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={d / 'dd.bin'}", "bs=1M", f"count={nbytes >> 20}",
             "conv=fsync"],
            check=True, capture_output=True,
        )  # fmt: skip

    def torch_save(d: Path) -> None:
        path = d / "state.pt"
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())

    def st_save(d: Path) -> None:
        path = d / "state.safetensors"
        save_file(_flat(model, opt), str(path))
        _fsync_path(path)

    counter = iter(range(1, 1 << 30))

    def safepoint(d: Path) -> None:
        with Checkpointer(d, keep_last=None) as ckpt:
            ckpt.save(next(counter), {"model": model, "optimizer": opt})

    return {
        "dd conv=fsync": dd,
        "torch.save + fsync": torch_save,
        "safetensors.save_file + fsync": st_save,
        "safepoint Checkpointer.save": safepoint,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None)
    args = p.parse_args()
    model, opt = build_state(args.gb)
    nbytes = sum(t.numel() * t.element_size() for t in _flat(model, opt).values())
    print(f"state: {nbytes / 1e9:.2f} GB", flush=True)
    base = Path(tempfile.mkdtemp(prefix="sp-commit-", dir=args.dir))
    times: dict[str, list[float]] = {}
    try:
        for r in range(args.repeat):
            for name, fn in methods(model, opt, nbytes).items():
                d = base / f"{r}-{len(times.get(name, []))}-{name.split()[0]}"
                d.mkdir()
                os.sync()  # start each method with no dirty pages of another
                t0 = time.perf_counter()
                fn(d)
                times.setdefault(name, []).append(time.perf_counter() - t0)
                print(f"{name}: {times[name][-1]:.2f} s", flush=True)
                shutil.rmtree(d)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    dd = statistics.median(times["dd conv=fsync"])
    ts = statistics.median(times["torch.save + fsync"])
    rows, data = [], {}
    for name, ts_ in times.items():
        med = statistics.median(ts_)
        rows.append([name, med, min(ts_), nbytes / med / 1e9, med / dd, med / ts])
        data[name] = {"median_s": med, "best_s": min(ts_), "runs_s": ts_}
    sp = statistics.median(times["safepoint Checkpointer.save"])
    verdict = (
        f"\n\nsafepoint / dd = {sp / dd:.2f} (target <= 1.25), "
        f"safepoint / torch.save+fsync = {sp / ts:.2f} (target <= 1.0). "
        f"{nbytes / 1e9:.2f} GB, median of {args.repeat} runs, directory {base.parent}."
    )
    body = table(["method", "median s", "best s", "GB/s", "x dd", "x torch.save"], rows)
    write_results(
        "commit",
        "Durable save of a 1 GB state",
        body + verdict,
        {"bytes": nbytes, "results": data, "ratio_dd": sp / dd, "ratio_torch_save": sp / ts},
    )


if __name__ == "__main__":
    main()
