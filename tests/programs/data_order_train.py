"""A plain DDP loop whose data order is a GlobalOrderSampler saved by the Checkpointer;
each rank logs the sample ids it trained on at each step.

usage: [torchrun --standalone --nproc_per_node N] python data_order_train.py OUT_DIR
       --steps S [--size N] [--batch B] [--save-every K] [--workers W] [--tag NAME]
       [--pause-at STEP]

Trains until step S or the end of the epoch, whichever comes first, saving every K
steps and at S. Each rank appends one line per step to OUT_DIR/ids-rank<R>.jsonl,
``{"tag", "step", "rank", "ids"}``, flushed before the step's save. Prints
``rank R start S epoch E cursor C`` after the restore and ``rank R end epoch E cursor C``
at the end. ``--pause-at STEP``: after step STEP every rank prints
``rank R paused at STEP pid P`` and sleeps, for a test to kill it there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from _leave import leave
from torch.utils.data import DataLoader

from safepoint import Checkpointer
from safepoint.data_order import GlobalOrderSampler


def collate(ids: list[int]) -> torch.Tensor:
    # A rank's share of an epoch's tail may be empty: it still takes part in the step.
    return torch.tensor(ids, dtype=torch.long)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--size", type=int, default=97)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--save-every", default="3")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--tag", default="run")
    p.add_argument("--pause-at", type=int, default=None)
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sampler = GlobalOrderSampler(args.size, args.batch, seed=7)  # rank, world: the group's
    loader = DataLoader(
        range(args.size), batch_sampler=sampler, num_workers=args.workers, collate_fn=collate
    )
    state = {"model": net, "optimizer": opt, "data": sampler}
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, f"ids-rank{rank}.jsonl"), "a")  # noqa: SIM115
    with Checkpointer(args.out, save_every=args.save_every, total_steps=args.steps) as ckpt:
        step = ckpt.restore(state) or 0
        print(f"rank {rank} start {step} epoch {sampler.epoch} cursor {sampler.cursor}", flush=True)
        for ids in loader:
            if step >= args.steps:
                break
            x = torch.stack([ids.float(), ids.float().sin(), ids.float().cos(), -ids.float()], 1)
            loss = model(x / args.size).pow(2).sum() / sampler.global_batch
            opt.zero_grad()
            loss.backward()
            opt.step()
            sampler.advance()
            step += 1
            record = {"tag": args.tag, "step": step, "rank": rank, "ids": ids.tolist()}
            log.write(json.dumps(record) + "\n")
            log.flush()
            ckpt.step(step, state, metrics={"loss": float(loss)})
            if step == args.pause_at:
                ckpt.flush()  # the saves so far have landed: the test knows what is left
                # one write (print writes the newline apart: two ranks' lines interleaved)
                sys.stdout.write(f"rank {rank} paused at {step} pid {os.getpid()}\n")
                sys.stdout.flush()
                time.sleep(120)  # a test kills it here; never longer than this
    log.close()
    print(f"rank {rank} end epoch {sampler.epoch} cursor {sampler.cursor}", flush=True)
    if world > 1:
        leave()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
