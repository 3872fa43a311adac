"""``export``: a clean model folder from a checkpoint (adapter alone, or merged)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safepoint.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from safepoint.retention import Candidate, RetentionPolicy, best_steps
from safepoint.store import CheckpointInfo, inspect, scan

_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_MODEL_FILES = ("model.safetensors", "config.json")


def pick(directory: Path, which: str, *, metric: str = "eval_loss") -> CheckpointInfo:
    """The checkpoint ``which`` (best, latest or a step) of ``directory``, verified."""
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{directory}: no such directory; give the run's output dir")
    valid = [i for i in scan(directory) if i.valid]
    if not valid:
        raise CheckpointNotFoundError(f"{directory}: no valid checkpoint to export")
    if which == "latest":
        info = valid[-1]
    elif which == "best":
        policy = RetentionPolicy(keep_best=1, metric=metric)
        best = best_steps([Candidate(i.step, i.size, i.metrics) for i in valid], policy)
        if not best:
            raise ConfigError(
                f"{directory}: no checkpoint has the metric {metric!r}; use --checkpoint latest "
                "or a step"
            )
        info = next(i for i in valid if i.step == best[0])
    elif which.isdigit():
        match = [i for i in valid if i.step == int(which)]
        if not match:
            raise CheckpointNotFoundError(
                f"{directory}: no valid checkpoint-{which}; valid: "
                f"{', '.join(i.name for i in valid)}"
            )
        info = match[0]
    else:
        raise ConfigError(f"--checkpoint {which!r}: give best, latest or a step number")
    deep = inspect(info.path, deep=True)
    if not deep.valid:
        raise CorruptCheckpointError(f"{info.path}: {'; '.join(deep.problems)}")
    return deep


def export(info: CheckpointInfo, out: Path, *, merge: bool) -> Path:
    """Write a loadable model folder to ``out`` (must not exist or be empty).

    LoRA checkpoints give the adapter (``PeftModel.from_pretrained``) or, with ``merge``,
    the base model with the adapter merged in (``AutoModelForCausalLM.from_pretrained``).
    The base model's tokenizer is copied along when it is a local folder.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder")
    src = info.path
    is_adapter = (src / "adapter_config.json").is_file()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        base = None
        if is_adapter:
            base = json.loads((src / "adapter_config.json").read_text()).get(
                "base_model_name_or_path"
            )
        if is_adapter and merge:
            _merge(src, base, tmp)
        else:
            for name in _ADAPTER_FILES if is_adapter else _MODEL_FILES:
                shutil.copy2(src / name, tmp / name)
        _copy_tokenizer(Path(base) if base else None, tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _merge(src: Path, base: str | None, dest: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not base:
        raise ConfigError(f"{src}: adapter_config.json names no base model; cannot --merge")
    try:
        model = AutoModelForCausalLM.from_pretrained(base)
    except OSError as e:
        raise ConfigError(f"{src}: cannot load the base model {base} ({e})") from None
    merged = PeftModel.from_pretrained(model, str(src)).merge_and_unload()
    merged.save_pretrained(dest)


def _copy_tokenizer(base: Path | None, dest: Path) -> None:
    if base is None or not base.is_dir():
        return
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "vocab.json",
        "merges.txt",
    ):
        if (base / name).is_file() and not (dest / name).exists():
            shutil.copy2(base / name, dest / name)
