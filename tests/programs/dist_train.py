"""A plain PyTorch loop on safepoint, for one process or several (torchrun, gloo on CPU).

usage: [torchrun --standalone --nproc_per_node N] python dist_train.py OUT_DIR
       [--steps N] [--save-every S] [--keep-last K] [--remote URL] [--step-sleep SECONDS]

Each rank draws its own batches and dropout masks from its own RNGs (seeded by rank),
and DDP averages the gradients, so the final weights depend on every rank's RNG stream:
a resume that restores any rank's RNG wrongly ends with different weights. Rank 0 writes
the final weights to OUT_DIR/final.safetensors.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from _leave import leave
from safetensors.torch import save_file

from safepoint import Checkpointer
from safepoint.distributed import FullState
from safepoint.format import encode_tree


def dump(full: FullState, path: str, rank: int) -> None:
    """The whole model and optimizer state, gathered, as one safetensors file (rank 0):
    the same for any number of processes when the state is the same."""
    state = full.state_dict()  # collective
    if rank == 0:
        _, tensors = encode_tree(state)
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, path)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", default="5")
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--remote", default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (FullState)")
    p.add_argument(
        "--sharded", action="store_true", help="FSDP2, model and optimizer saved sharded"
    )
    p.add_argument("--dump-restored", default=None, help="write the restored full state here")
    p.add_argument("--dump-final", default=None, help="write the final full state here")
    p.add_argument("--width", type=int, default=32, help="hidden width (checkpoint size)")
    p.add_argument("--no-check-disk", action="store_true", help="no disk pre-flight")
    p.add_argument("--fail-at-step", type=int, default=None, help="rank 0 raises at this step")
    p.add_argument("--async-save", action="store_true")
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, args.width),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(args.width, 4),
    )
    if args.fsdp or args.sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in (net[0], net[3]):
            fully_shard(layer)
        model = fully_shard(net)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        state: dict[str, object] = (
            {"model": net, "optimizer": opt} if args.sharded else {"sharded": FullState(net, opt)}
        )
    else:
        # Save the inner module: its state dict is the same under any number of processes.
        model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        state = {"model": net, "optimizer": opt}
    torch.manual_seed(100 + rank)
    random.seed(1 + rank)
    np.random.seed(2 + rank)
    with Checkpointer(
        args.out,
        save_every=args.save_every,
        keep_last=args.keep_last,
        total_steps=args.steps,
        remote=args.remote,
        async_save=args.async_save,
        check_disk=not args.no_check_disk,
    ) as ckpt:
        start = ckpt.restore(state) or 0
        print(f"rank {rank} pid {os.getpid()} start {start}", flush=True)
        if args.dump_restored:
            dump(FullState(net, opt), args.dump_restored, rank)
        for step in range(start, args.steps):
            x = torch.randn(8, 16)
            y = torch.randn(8, 4) * (float(np.random.rand()) + random.random())
            if rank == 0 and step + 1 == args.fail_at_step:
                raise RuntimeError(f"a failure on rank 0 at step {step + 1}")
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            time.sleep(args.step_sleep)
            ckpt.step(step + 1, state, metrics={"loss": float(loss)})
            print(f"rank {rank} step {step + 1}", flush=True)
    if args.dump_final:
        dump(FullState(net, opt), args.dump_final, rank)
    sharded = args.fsdp or args.sharded
    full = FullState(net, opt).state_dict()["model"] if sharded else net.state_dict()
    if rank == 0:
        weights = {k: v.contiguous() for k, v in full.items()}
        save_file(weights, f"{args.out}/final.safetensors")
    print(f"rank {rank} done", flush=True)
    if world > 1:
        leave()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
