"""A user's SFTTrainer + SafepointCallback script with tqdm's bar on, that sends itself
SIGINT at the end of a chosen step, as a Ctrl-C at the terminal would.

usage: python tqdm_sigint_train.py OUT_DIR MODEL_DIR [--steps N] [--sigint-at STEP]

Run by tests/test_output.py: safepoint's stop lines must start on a line of their own,
not be glued to the end of the bar's line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from safepoint import SafepointCallback
from safepoint.app.tiny import builtin_dataset_path


class CtrlC(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sigint-at", type=int, default=3)
    args = p.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    data = load_dataset("json", data_files=str(builtin_dataset_path()), split="train")
    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=100,
        max_length=64,
        report_to="none",
        disable_tqdm=False,  # the bar on screen is the subject
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"),
        callbacks=[SafepointCallback(save_every=100), CtrlC(args.sigint_at)],
    )
    trainer.train()
    print(f"done {trainer.state.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
