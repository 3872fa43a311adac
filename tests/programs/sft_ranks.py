"""A user's own multi-process script: stock TRL SFTTrainer + SafepointCallback, launched
by torchrun or ``accelerate launch`` on CPU (gloo), several hundred steps.

usage: python sft_ranks.py OUT_DIR MODEL_DIR [--steps N] [--save-every S] [--keep-last K]
                           [--async-save] [--mtbf T] [--max-overhead F] [--batch B]
                           [--ddp-timeout S]

Each rank records the steps at which its callback committed a checkpoint (the public
``committed`` hook) in ``OUT_DIR/../commits-rank<RANK>.json``, rewritten after every
commit and once more at the end with ``"finished": true``. Run by
tests/test_trainer_ranks.py, which checks that every rank exits 0 and that all ranks
committed the same steps. Exits 0 when training ends. SIGUSR2 prints every thread's
stack (to show where a rank hangs).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from _leave import leave
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from safepoint import SafepointCallback
from safepoint.app.tiny import builtin_dataset_path


class RecordingCallback(SafepointCallback):
    """SafepointCallback that writes, per rank, the steps it committed."""

    def __init__(self, record: Path, **options: Any) -> None:
        super().__init__(**options)
        self.record = record
        self.steps: list[int] = []

    def committed(self, info: Any, seconds: float) -> None:
        self.steps.append(info.step)
        self.write(finished=False)

    def write(self, *, finished: bool, global_step: int | None = None) -> None:
        doc = {
            "rank": int(os.environ.get("RANK", "0")),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "pid": os.getpid(),
            "steps": self.steps,
            "finished": finished,
            "global_step": global_step,
        }
        tmp = self.record.with_name(self.record.name + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.record)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--save-every", default="1s")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--mtbf", default="24h", help="for save_every auto")
    p.add_argument("--max-overhead", type=float, default=0.02, help="for save_every auto")
    p.add_argument("--batch", type=int, default=2)
    # A user's own setting: ranks stuck in mismatched collectives fail in a minute rather
    # than in the Trainer's default half hour.
    p.add_argument("--ddp-timeout", type=int, default=60)
    args = p.parse_args(argv)
    # Not a user's line: lets the test see where a rank hangs (SIGUSR2 dumps the stacks).
    faulthandler.register(signal.SIGUSR2, all_threads=True)

    out = Path(args.out)
    record = out.parent / f"commits-rank{os.environ.get('RANK', '0')}.json"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    data = load_dataset("json", data_files=str(builtin_dataset_path()), split="train")
    config = SFTConfig(
        output_dir=str(out),
        max_steps=args.steps,
        num_train_epochs=100,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-3,
        logging_steps=10,
        max_length=32,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        lr_scheduler_type="linear",
        warmup_steps=2,
        seed=7,
        ddp_timeout=args.ddp_timeout,
    )
    callback = RecordingCallback(
        record,
        save_every=args.save_every,
        keep_last=args.keep_last,
        async_save=args.async_save,
        mtbf=args.mtbf,
        max_overhead=args.max_overhead,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
        callbacks=[callback],
    )
    trainer.train()
    callback.write(finished=True, global_step=trainer.state.global_step)
    print(f"rank {os.environ.get('RANK', '0')} done {trainer.state.global_step}", flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
