"""A user's FSDP2 fine-tune: stock TRL SFTTrainer + SafepointCallback, the model sharded
at load time by transformers (``from_pretrained(..., distributed_config=
DistributedConfig(fsdp_size=WORLD_SIZE))``) under torchrun, gloo on CPU; one process
loads it whole (no torchrun). The stock Trainer refuses to checkpoint such a model; the
user passes ``save_strategy="no"`` and SafepointCallback saves it, sharded.

usage: python fsdp_sft.py OUT_DIR MODEL_DIR [--steps N] [--save-every S] [--lora]
                          [--accelerate] [--kill-at STEP] [--dump-begin FILE]
                          [--dump-end FILE]

``--accelerate``: the model is loaded whole and sharded by accelerate's FSDP2 plugin
(``SFTConfig(fsdp=..., fsdp_config={"fsdp_version": 2})``), as under ``accelerate
launch`` on GPUs. accelerate turns FSDP on only for GPU distributed types; this program
(not safepoint) turns the same switch on for its CPU ranks (``fsdp_on_cpu``), so that
the Trainer's FSDP code path runs here: sharding at ``prepare``, its own FSDP resume.

``--kill-at STEP``: the last rank SIGKILLs itself when step STEP begins (a crash).
``--dump-begin`` / ``--dump-end``: rank 0 writes the whole (gathered) weights and
optimizer state, as the training loop sees them at ``on_train_begin`` (after the
resume) or after ``train()``, to a safetensors FILE. Prints ``rank R done STEP``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import torch
import torch.distributed as dist
from _leave import leave
from datasets import load_dataset
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.distributed.configuration_utils import DistributedConfig
from trl import SFTConfig, SFTTrainer

from safepoint import SafepointCallback
from safepoint.app.tiny import builtin_dataset_path


def fsdp_on_cpu() -> None:
    """Let accelerate use FSDP on CPU ranks (gloo): where its state picks FSDP for a GPU
    distributed type given an FSDP plugin, pick it for MULTI_CPU too."""
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    accelerate.state.AcceleratorState.__init__ = init


def whole(t: torch.Tensor) -> torch.Tensor:
    full = t.full_tensor() if hasattr(t, "full_tensor") else t  # a collective: every rank
    return full.detach().to("cpu", copy=True).contiguous()


def dump(path: str, model: Any, optimizer: Any) -> None:
    """Rank 0 writes the gathered weights and optimizer state (every rank gathers)."""
    tensors = {f"model.{k}": whole(v) for k, v in model.state_dict().items()}
    opt = getattr(optimizer, "optimizer", optimizer)
    for pid, state in sorted(opt.state_dict()["state"].items()):
        for name, value in sorted(state.items()):
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = whole(value)
    if int(os.environ.get("RANK", "0")) == 0:
        # tied weights share memory; safetensors stores each tensor once
        save_file({k: v.clone() for k, v in tensors.items()}, path)


class Probe(TrainerCallback):
    """The test's eyes: kill at a step, dump the state at the start of training."""

    def __init__(self, kill_at: int | None, dump_begin: str | None) -> None:
        self.kill_at, self.dump_begin = kill_at, dump_begin

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.dump_begin:
            dump(self.dump_begin, kw["model"], kw["optimizer"])

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if state.global_step == self.kill_at and int(os.environ.get("RANK", "0")) == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", default="4")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--accelerate", action="store_true")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--dump-begin")
    p.add_argument("--dump-end")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    print(f"rank {os.environ.get('RANK', '0')} pid {os.getpid()}", flush=True)
    sharded, fsdp = {}, {}
    if args.accelerate:
        fsdp_on_cpu()
        fsdp = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}
    elif world > 1:
        sharded = {"distributed_config": DistributedConfig(fsdp_size=world)}
    model = AutoModelForCausalLM.from_pretrained(args.model, **sharded)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = load_dataset("json", data_files=str(builtin_dataset_path()), split="train")
    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        max_length=32,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",  # the Trainer refuses to checkpoint a model sharded at load
        dataloader_num_workers=0,
        seed=7,
        **fsdp,
    )
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[
            SafepointCallback(save_every=args.save_every),
            Probe(args.kill_at, args.dump_begin),
        ],
    )
    trainer.train()
    if args.dump_end:
        dump(args.dump_end, trainer.model, trainer.optimizer)
    print(f"rank {os.environ.get('RANK', '0')} done {trainer.state.global_step}", flush=True)
    if world > 1:
        leave()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
