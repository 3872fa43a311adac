"""A small training run with eval, retention and an optional SIGKILL, for the report tests.

usage: python report_train.py OUT_DIR [--steps N] [--die-at STEP] [--keep-last K]
       [--max-disk SIZE] [--emergency-at STEP]

Trains a tiny MLP; logs ``loss`` every step and ``eval_loss`` every 5 steps. The eval
loss bottoms out at step 10 (an overfitting run), so the best checkpoint is not the
latest and retention must keep it while deleting others. ``--die-at`` kills the process
with SIGKILL right after that step was logged, as a crash would (once the background
saves so far have landed: a crash with one in flight is the chaos tests' subject).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

from safepoint import Checkpointer


def eval_loss(step: int) -> float:
    return round(0.6 + 0.04 * abs(step - 10), 4)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--die-at", type=int, default=None)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--max-disk", default=None)
    p.add_argument("--emergency-at", type=int, default=None)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 8)
    y = x.sum(dim=1, keepdim=True)
    state = {"model": model, "optimizer": opt}
    with Checkpointer(
        args.out,
        save_every="5",
        keep_last=args.keep_last,
        keep_best=1,
        metric="eval_loss",
        total_steps=args.steps,
        max_disk=args.max_disk,
    ) as ckpt:
        start = ckpt.restore(state) or 0
        print(f"start {start}", flush=True)
        for step in range(start + 1, args.steps + 1):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            metrics = {"loss": round(loss.item(), 6)}
            if step % 5 == 0:
                metrics["eval_loss"] = eval_loss(step)
            ckpt.step(step, state, metrics=metrics)
            if step == args.emergency_at:
                ckpt.save(step, state, metrics=metrics, reason="emergency (SIGTERM)")
            if step == args.die_at:
                ckpt.flush()  # the saves so far have landed: the tests know what is left
                os.kill(os.getpid(), signal.SIGKILL)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
