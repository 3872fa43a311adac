"""A user's own script: stock TRL SFTTrainer + LoraConfig + SafepointCallback.

usage: python hf_user_train.py OUT_DIR MODEL_DIR [--steps N] [--save-every S] [--full]
                              [--async-save] [--batch B] [--grad-accum G]

Run by tests/test_hf_callback.py as a real process, killed and rerun. At the end it
writes the trained weights to OUT_DIR/final.safetensors.
"""

from __future__ import annotations

import argparse
import sys

from datasets import load_dataset
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from safepoint import SafepointCallback
from safepoint.app.tiny import builtin_dataset_path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--save-every", default="3")
    p.add_argument("--full", action="store_true")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient_accumulation_steps")
    p.add_argument("--resume", default=None)
    p.add_argument("--limit", type=int, default=None, help="use the first N examples only")
    args = p.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    data = load_dataset("json", data_files=str(builtin_dataset_path()), split="train")
    if args.limit:
        data = data.select(range(args.limit))
    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=1e-3,
        logging_steps=2,
        max_length=64,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        lr_scheduler_type="linear",
        warmup_steps=2,
        num_train_epochs=100,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=None if args.full else LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1),
        callbacks=[
            SafepointCallback(save_every=args.save_every, keep_last=2, async_save=args.async_save)
        ],
    )
    resume = {"true": True, "false": False}.get(str(args.resume).lower(), args.resume)
    trainer.train(resume_from_checkpoint=resume)
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    save_file(weights, f"{args.out}/final.safetensors")
    print(f"done {trainer.state.global_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
