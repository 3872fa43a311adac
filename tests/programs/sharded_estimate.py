"""The disk pre-flight's estimate of a sharded checkpoint next to the real one.

usage: torchrun --nproc_per_node N sharded_estimate.py OUT_DIR

An FSDP2 model and AdamW (before and after its first step, when the optimizer state
exists) estimated by ``estimate_checkpoint_bytes`` on every rank, then saved; rank 0
prints ``estimate BEFORE AFTER real REAL``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from _leave import leave
from torch.distributed.fsdp import fully_shard

from safepoint import Checkpointer
from safepoint.disk import estimate_checkpoint_bytes


def main(out: str) -> int:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 100))
    for layer in (net[0], net[2]):
        fully_shard(layer)
    fully_shard(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    state = {"model": net, "optimizer": opt}
    before = estimate_checkpoint_bytes(state)
    net(torch.randn(2, 256)).sum().backward()
    opt.step()
    after = estimate_checkpoint_bytes(state)
    with Checkpointer(out) as ckpt:
        info = ckpt.save(1, state).wait()
    if dist.get_rank() == 0:
        print(f"estimate {before} {after} real {info.size}", flush=True)
    leave()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
