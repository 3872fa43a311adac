"""Start-up time of the read-only commands: ``--version``, ``ls``, ``verify``, ``plan``, ``prune``.

usage: python benchmarks/cli_startup.py [--repeat 7] [--width 512] [--checkpoints 4]

Writes a plain-loop run (an MLP of ``--width``, AdamW, one checkpoint every 5 steps)
into a temporary directory, then times each command as a fresh process, the way a user
runs it, and reports the median wall time of ``--repeat`` runs. Targets (issue #11):
``--version`` and ``ls`` under 0.5 s, ``verify`` under 1 s. For scale: the bare
interpreter and ``import torch``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results

TARGETS = {"--version": 0.5, "ls": 0.5, "verify": 1.0}


def make_run(out: Path, *, width: int, checkpoints: int) -> int:
    """A finished plain-loop run with ``checkpoints`` checkpoints; returns one's bytes."""
    import torch

    from safepoint import Checkpointer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": model, "optimizer": opt}
    steps = 5 * checkpoints
    with Checkpointer(out, save_every="5", keep_last=checkpoints, total_steps=steps) as ckpt:
        for step in range(1, steps + 1):
            loss = model(torch.randn(8, width)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.step(step, state, metrics={"loss": float(loss)})
    return sum(f.stat().st_size for f in (out / f"checkpoint-{steps}").iterdir())


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("safepoint")
    return [str(script)] if script.exists() else [sys.executable, "-m", "safepoint"]


def median_time(cmd: list[str], repeat: int) -> tuple[float, list[float]]:
    """Median wall time of ``cmd`` over ``repeat`` fresh processes (after one warm-up)."""
    subprocess.run(cmd, capture_output=True, check=True)  # warm the page cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--checkpoints", type=int, default=4)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="safepoint-cli-startup-"))
    try:
        run = base / "run"
        size = make_run(run, width=args.width, checkpoints=args.checkpoints)
        cli = _cli()
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "--version": [*cli, "--version"],
            "ls": [*cli, "ls", str(run)],
            "ls --json": [*cli, "ls", "--json", str(run)],
            "verify": [*cli, "verify", str(run)],
            "plan": [*cli, "plan", str(run)],
            "prune --dry-run": [*cli, "prune", str(run), "--keep-last", "1", "--dry-run"],
        }
        rows, data = [], {}
        for name, cmd in commands.items():
            med, times = median_time(cmd, args.repeat)
            target = TARGETS.get(name)
            ok = None if target is None else ("yes" if med < target else "NO")
            data[name] = {"median_s": med, "times_s": times, "target_s": target}
            rows.append([name, med, min(times), max(times), target, ok])
            print(f"{name}: {med:.3f} s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    body = table(["command", "median s", "min s", "max s", "target s", "met"], rows)
    body += (
        f"\n\nRun: {args.checkpoints} checkpoints of {size / 1e6:.1f} MB (MLP width "
        f"{args.width} with AdamW state); `verify` re-hashes all of them. Each command is a "
        f"fresh process (the `{Path(cli[-1]).name}` entry point), median of {args.repeat} "
        "after one warm-up run. None of them imports torch (`tests/test_cli_startup.py`)."
    )
    write_results(
        "cli_startup",
        "CLI start-up time",
        body,
        {"repeat": args.repeat, "checkpoint_bytes": size, "results": data},
    )


if __name__ == "__main__":
    main()
