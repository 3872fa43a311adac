"""``export``: a clean model folder from a checkpoint (adapter alone, or merged)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator
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
    # Not tempfile.mkdtemp: its private 0700 would survive the rename and lock out the
    # account that serves the model. mkdir's 0o777 goes through the umask, as for any folder.
    tmp = out.parent / f".{out.name}-{secrets.token_hex(4)}"
    os.mkdir(tmp, 0o777)
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
                shutil.copyfile(src / name, tmp / name)
        _copy_tokenizer(Path(base) if base else None, tmp)
        _default_modes(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _default_modes(folder: Path) -> None:
    """Give everything in ``folder`` the mode the umask gives a new file or folder.

    The libraries may write through private temporary files (transformers leaves
    ``model.safetensors`` at 0600); ``folder`` was made with ``mkdir(0o777)``, so its
    mode already is ``0o777 & ~umask`` and no process-wide umask call is needed.
    """
    dir_mode = folder.stat().st_mode & 0o777
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), dir_mode & 0o666)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence transformers', peft's and the hub's progress bars, notices and warnings
    (their errors still raise); restore them afterwards."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    bars, hub_bars = hf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub.enable_progress_bars()


def _merge(src: Path, base: str | None, dest: Path) -> None:
    if not base:
        raise ConfigError(f"{src}: adapter_config.json names no base model; cannot --merge")
    with _quiet_libraries():
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

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
            shutil.copyfile(base / name, dest / name)
