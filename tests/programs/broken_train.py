"""A deliberately broken training script for ``safepoint chaos`` tests.

usage: python broken_train.py OUT_DIR [--steps N] [--step-sleep SECONDS]

Like nanoGPT's ``ckpt.pt``, it overwrites one checkpoint file in place after every step,
with no temporary file, no fsync and no rename, on a slow disk (a pause between chunks).
A kill during the write leaves a truncated file, and the next run fails to resume from
it (or resumes from weights that do not match the step). chaos must catch that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save, save_file


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ckpt, meta = out / "ckpt.safetensors", out / "step.json"
    start = 0
    if ckpt.exists():  # no validation: whatever is there is trusted
        model.load_state_dict(load_file(str(ckpt)))
        start = json.loads(meta.read_text())["step"]
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 128, generator=g)
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(args.step_sleep)
        data = save({k: v.contiguous() for k, v in model.state_dict().items()})
        with open(ckpt, "wb") as f:  # in place: truncated now, complete only at the end
            for i in range(0, len(data), 1024):
                f.write(data[i : i + 1024])
                f.flush()
                time.sleep(0.002)
        meta.write_text(json.dumps({"step": step + 1}))
    save_file(model.state_dict(), str(out / "final.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
