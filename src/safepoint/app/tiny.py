"""The built-in tiny model and data set, so ``safepoint train`` runs with no download.

The model is a 2-layer GPT-2-style causal LM built from a config with a fixed seed; its
tokenizer is a real byte-level BPE trained locally (``tokenizers``) on the shipped data
set. Both are written with ``save_pretrained`` into a cache folder and then loaded back
with ``from_pretrained`` like any other model, so the built-in model takes the same
code path as ``--model gpt2`` or ``--model ./my-model``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

TINY_MODEL = "tiny"
"""The name ``--model`` takes for the built-in model."""
TINY_VERSION = "tiny-gpt2-v2"
BUILTIN_DATASET = "builtin"
"""The name ``--dataset`` takes for the shipped instruction data set."""
_EOS = "<|endoftext|>"
_PAD = "<|pad|>"
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def cache_home() -> Path:
    """``$SAFEPOINT_HOME`` or ``~/.cache/safepoint``: where the built-in model is cached."""
    env = os.environ.get("SAFEPOINT_HOME")
    return Path(env) if env else Path.home() / ".cache" / "safepoint"


def builtin_dataset_path() -> Path:
    """The shipped jsonl of prompt/completion pairs (``src/safepoint/data``)."""
    return Path(str(resources.files("safepoint") / "data" / "instructions.jsonl"))


def tiny_model_path() -> Path:
    """The folder of the built-in model, built on first use (atomically: a crash while
    building never leaves a half-written model for the next run to load)."""
    target = cache_home() / "models" / TINY_VERSION
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Seconds to a minute of silence otherwise (tokenizer, 50 steps of pre-training).
    print(
        f"safepoint: building the built-in tiny model in {target} (once; up to a minute)",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}-", dir=target.parent))
    try:
        _build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent builder: real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tiny() -> tuple[Any, Any, Any]:
    """The built-in model, its tokenizer and the built-in data set, for examples and tests.

    ``model, tokenizer, data = load_tiny()`` gives a ``transformers`` causal LM, its fast
    tokenizer and a ``datasets.Dataset`` of 273 ``prompt``/``completion`` rows, ready for
    ``SFTTrainer``. The model is built into ``cache_home()`` on first use (seconds).
    """
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_path()
    data = load_dataset("json", data_files=str(builtin_dataset_path()), split="train")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), data


def _texts() -> list[str]:
    rows = [json.loads(line) for line in builtin_dataset_path().read_text().splitlines() if line]
    return [r["prompt"] + r["completion"] for r in rows]


def _build(folder: Path) -> None:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _texts(), vocab_size=1024, min_frequency=1, special_tokens=[_EOS, _PAD], show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=_EOS,
        eos_token=_EOS,
        pad_token=_PAD,
        model_max_length=128,
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    _pretrain(model, tokenizer)
    model.save_pretrained(folder)


def _pretrain(model: Any, tokenizer: Any, steps: int = 50) -> None:
    """A few seconds of plain language modelling on the shipped text, so that the
    built-in model knows its tokens and a LoRA fine-tune has something to build on
    (LoRA on a random network barely moves the loss). Seeded: always the same model."""
    import torch

    texts = [t + _EOS for t in _texts()]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (16,), generator=generator)
        loss = model(
            input_ids=batch["input_ids"][idx],
            attention_mask=batch["attention_mask"][idx],
            labels=labels[idx],
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
