"""A small plain-PyTorch training loop on safepoint, run as a real process by the tests.

usage: python toy_train.py OUT_DIR [--steps N] [--save-every S] [--keep-last K]
       [--keep-full F] [--width W] [--step-sleep SECONDS] [--reference-step-sleep SECONDS]
       [--async-save] [--copy-free] [--on-busy wait|skip]

Draws its data and dropout masks from the torch and numpy RNGs, so a resume that does
not restore every RNG exactly ends with different weights. At the end it writes the
final weights to OUT_DIR/final.safetensors. ``--reference-step-sleep`` replaces the
step sleep when OUT_DIR is named ``reference``: chaos's uninterrupted run, slowed as
when it shares the machine with other work.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from safepoint import Checkpointer


def build(width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, width),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(width, 4),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
    return model, opt, sched


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object) -> float:
    x = torch.randn(8, 16)
    noise = float(np.random.rand()) + random.random()
    y = torch.randn(8, 4) * noise
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save-every", default="5")
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--keep-full", type=int, default=2)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--reference-step-sleep", type=float, default=None)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--copy-free", action="store_true")
    p.add_argument("--on-busy", default="wait", choices=["wait", "skip"])
    args = p.parse_args(argv)

    model, opt, sched = build(args.width)
    sleep = args.step_sleep
    if args.reference_step_sleep is not None and Path(args.out).name == "reference":
        sleep = args.reference_step_sleep
    random.seed(1)
    np.random.seed(2)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "extra": {"note": "toy"}}
    with Checkpointer(
        args.out,
        save_every=args.save_every,
        keep_last=args.keep_last,
        keep_full=args.keep_full,
        total_steps=args.steps,
        async_save=args.async_save,
        copy_free=args.copy_free,
        on_busy=args.on_busy,
    ) as ckpt:
        start = ckpt.restore(state) or 0
        print(f"start {start}", flush=True)
        for step in range(start, args.steps):
            loss = train_step(model, opt, sched)
            time.sleep(sleep)
            ckpt.step(step + 1, state, metrics={"loss": loss})
            print(f"step {step + 1}", flush=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, f"{args.out}/final.safetensors"
    )
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
