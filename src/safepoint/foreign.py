"""Checkpoint folders written by other tools (the stock Trainer): what they hold.

safepoint never resumes from such a folder by itself. Named explicitly, it is described:
which parts safepoint could read without running code from it (safetensors, JSON) and
which it never loads (pickles: ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``...).
Only names and sizes are looked at here; no file is opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# File suffixes that are (or may be) pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_READABLE = {
    "adapter_model.safetensors": "LoRA weights",
    "model.safetensors": "model weights",
    "trainer_state.json": "the step and log history",
    "adapter_config.json": "the LoRA config",
    "config.json": "the model config",
}


def describe_foreign(path: str | os.PathLike[str]) -> str:
    """One sentence on what a foreign checkpoint folder could and could not give back."""
    path = Path(path)
    try:
        names = sorted(
            e.name for e in os.scandir(path) if stat.S_ISREG(e.stat(follow_symlinks=False).st_mode)
        )
    except OSError as e:
        return f"its files cannot be listed ({e.strerror})"
    readable = [f"{_READABLE[n]} ({n})" for n in names if n in _READABLE]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    parts = []
    if readable:
        parts.append(f"it holds {', '.join(readable)}, readable without running code")
    if pickles:
        parts.append(
            f"its {', '.join(pickles)} {'is a pickle' if len(pickles) == 1 else 'are pickles'}"
            ", which safepoint never loads (a pickle can run code), so optimizer, scheduler "
            "and RNG state cannot be restored and a resumed run would not match an "
            "uninterrupted one"
        )
    if not parts:
        parts.append("it holds nothing safepoint can read")
    advice = (
        "to continue from its weights, load them into your model (e.g. "
        "PeftModel.from_pretrained) and start a new run in another output directory"
    )
    return "; ".join(parts) + "; " + advice
