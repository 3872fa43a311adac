"""``export``: a clean model folder from a checkpoint (adapter alone, or merged)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safepoint.app.runs import best_checkpoint, by_metric, run_directory
from safepoint.app.tiny import TINY_MODEL
from safepoint.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from safepoint.fileio import loads_json, read_regular
from safepoint.schema import SHARDS_NAME
from safepoint.units import format_size
from safepoint.validity import CheckpointInfo, inspect, scan

_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_MODEL_FILES = ("model.safetensors", "config.json")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
_MAX_TOKENIZER_BYTES = 256 << 20


def pick(directory: Path, which: str, *, metric: str = "eval_loss") -> CheckpointInfo:
    """The checkpoint ``which`` (best, latest or a step) of ``directory``, verified."""
    valid = [i for i in scan(run_directory(directory, "give the run's output dir")) if i.valid]
    if not valid:
        raise CheckpointNotFoundError(f"{directory}: no valid checkpoint to export")
    if which == "latest":
        info = valid[-1]
    elif which == "best":
        best = best_checkpoint(valid, by_metric(metric))
        if best is None:
            raise ConfigError(
                f"{directory}: no checkpoint has the metric {metric!r}; use --checkpoint latest "
                "or a step"
            )
        info = best
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
        others = [i.name for i in valid if i.step != info.step]
        then = (
            f"export another with --checkpoint <step>: {', '.join(others)}"
            if others
            else "no other checkpoint to export"
        )
        raise CorruptCheckpointError(f"{info.path}: {'; '.join(deep.problems)}; {then}")
    return deep


@dataclass(frozen=True)
class Base:
    """The base model an adapter export uses, and who named it."""

    path: str
    """A local folder, or a hub name the run's config gave."""
    source: str
    """Where it comes from, for the user: ``--base`` or the run's config."""


def is_adapter(info: CheckpointInfo) -> bool:
    """Whether the manifest of ``info`` lists a LoRA adapter (only listed files count):
    its weights, or the pieces of a sharded save of them."""
    files = info.manifest.files if info.manifest else {}
    weights, config = _ADAPTER_FILES
    return config in files and (weights in files or SHARDS_NAME in files)


def listed_files(info: CheckpointInfo) -> tuple[str, ...]:
    """The files an export of ``info`` copies; ``ConfigError`` if the manifest lacks them
    (e.g. a plain-loop checkpoint: its weights are no Hugging Face model folder)."""
    names = _ADAPTER_FILES if is_adapter(info) else _MODEL_FILES
    files = info.manifest.files if info.manifest else {}
    if names[0] not in files and SHARDS_NAME in files:
        names = names[1:]  # a sharded model's: assembled from its pieces (``_assembled``)
    if missing := [n for n in names if n not in files]:
        raise ConfigError(
            f"{info.path}: no {', '.join(missing)} in its manifest; export takes the "
            "checkpoints of `safepoint train` or of the Trainer callback (a Hugging Face "
            "model folder), not those of a plain training loop"
        )
    return names


def base_model(info: CheckpointInfo, given: str | None) -> Base | None:
    """The base model of an export: ``given`` (``--base``), else the model the run's own
    config names (``safepoint train`` stores it in each manifest), else None. An adapter
    is merged onto it; its tokenizer goes along with either kind of export.

    Never the ``base_model_name_or_path`` of the checkpoint's ``adapter_config.json``:
    a checkpoint must not choose a folder for export to read or load.
    """
    if given is not None:
        path = Path(given).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"--base {given}: no config.json there; give the base model folder")
        return Base(str(path), "--base")
    config = info.manifest.info.get("config") if info.manifest else None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, str) or not model:
        return None
    if model == TINY_MODEL:
        from safepoint.app.tiny import tiny_model_path

        return Base(str(tiny_model_path()), "the run's config: the built-in tiny model")
    return Base(model, "the run's config")


def export(info: CheckpointInfo, out: Path, *, merge: bool, base: Base | None = None) -> Path:
    """Write a loadable model folder to ``out`` (must not exist or be empty).

    Copies only the files the manifest lists, each read from an ``O_NOFOLLOW`` fd and
    checked against its size and checksum. LoRA checkpoints give the adapter
    (``PeftModel.from_pretrained``) or, with ``merge``, ``base`` with the adapter merged in
    (``AutoModelForCausalLM.from_pretrained``; weights from safetensors only). The base
    model's tokenizer is copied along (an adapter's and a full fine-tune's alike) when
    ``base`` is a local folder or a model in the local Hugging Face cache. Raises
    ``ConfigError`` (no base to merge onto) or ``CorruptCheckpointError``.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder")
    names = listed_files(info)
    adapter = is_adapter(info)
    if adapter and merge and base is None:
        raise ConfigError(_no_base(info, "merge"))
    content = {name: _read_listed(info, name) for name in names}
    weights = (_ADAPTER_FILES if adapter else _MODEL_FILES)[0]
    if weights not in content:
        content[weights] = _assembled(info)
    if adapter:
        content["adapter_config.json"] = _adapter_config(info, content, base)
    else:
        _json_object(content["config.json"], info.path / "config.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its private 0700 would survive the rename and lock out the
    # account that serves the model. mkdir's 0o777 goes through the umask, as for any folder.
    tmp = out.parent / f".{out.name}-{secrets.token_hex(4)}"
    os.mkdir(tmp, 0o777)
    try:
        if adapter and merge:
            assert base is not None
            _merge(info.path, content, base, tmp)
        else:
            for name, data in content.items():
                (tmp / name).write_bytes(data)
        if base is not None and (folder := _local_folder(base.path)) is not None:
            _copy_tokenizer(folder, tmp)
        _default_modes(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass(frozen=True)
class Exported:
    """What ``export_run`` wrote."""

    source: CheckpointInfo
    path: Path
    adapter: bool
    """The checkpoint holds a LoRA adapter."""
    merged: bool
    base: Base | None
    tokenizer: bool
    """A tokenizer was written beside the model (from the base model's folder)."""


def export_run(
    directory: Path, which: str, out: str, *, merge: bool, metric: str, base: str | None
) -> Exported:
    """``safepoint export``: the checkpoint ``which`` of ``directory`` as a model folder
    at ``out``. Checks the user's ``out`` first (nothing read yet), then what the
    checkpoint holds; a full or read-only disk is a ``ConfigError`` (``out`` as given:
    the messages name it)."""
    info = pick(directory, which, metric=metric)
    assert info.manifest is not None
    _check_writable(Path(out))
    _check_space(Path(out), info.manifest.total_bytes)
    listed_files(info)  # refuses a checkpoint that is not a model folder
    adapter = is_adapter(info)
    trusted = base_model(info, base)
    try:
        path = export(info, Path(out), merge=merge, base=trusted)
    except OSError as e:
        # A full or read-only disk fails on writing, but the error names the source file.
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise ConfigError(
            f"--out {out}: cannot write the model there ({e.strerror}); nothing was "
            "exported; free space or choose another folder"
        ) from None
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    return Exported(info, path, adapter, merge and adapter, trusted, has_tokenizer)


def _existing(out: Path) -> Path:
    while not out.exists() and out != out.parent:
        out = out.parent
    return out


def _check_space(out: Path, needed: int) -> None:
    # A merged model is about the base model's size, more than this: the write itself
    # still fails cleanly, but after a temporary folder came and went.
    free = shutil.disk_usage(_existing(out)).free
    if free < needed:
        raise ConfigError(
            f"--out {out}: {format_size(needed)} to write but {format_size(free)} free on "
            "that disk; free space or choose another folder"
        )


def _check_writable(out: Path) -> None:
    existing = _existing(out)
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file; give a new folder")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out {out}: {existing} is not writable (read-only file system or no "
            "permission); choose another folder"
        )


def _no_base(info: CheckpointInfo, what: str) -> str:
    named = _named_base(info)
    hint = f"; the adapter names {named}: pass --base {named} if that is it" if named else ""
    return (
        f"{info.path}: the run's config names no base model to {what} onto{hint}; "
        "give the base model folder with --base PATH"
    )


def _named_base(info: CheckpointInfo) -> str | None:
    """What the adapter config claims as base, for hints only (never read or loaded)."""
    try:
        doc = _json_object(_read_listed(info, "adapter_config.json"), info.path)
    except (CorruptCheckpointError, ConfigError):
        return None
    named = doc.get("base_model_name_or_path")
    return named if isinstance(named, str) and len(named) < 4096 else None


def _assembled(info: CheckpointInfo) -> bytes:
    """The weights file of a sharded model's checkpoint (``SafepointCallback`` under
    FSDP): the whole tensors of its state entry ``model``, from every rank's pieces."""
    from safetensors.torch import save

    from safepoint.restore import whole_entry

    assert info.manifest is not None
    tensors = whole_entry(info.path, info.manifest, "model")
    return save(tensors, metadata={"format": "pt"})


def _read_listed(info: CheckpointInfo, name: str) -> bytes:
    assert info.manifest is not None
    entry = info.manifest.files[name]
    return bytes(read_regular(info.path / name, size=entry.size, checksum=entry.checksum))


def _json_object(data: bytes, where: Path) -> dict[str, Any]:
    doc = loads_json(data, where=str(where))
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: not a JSON object; the checkpoint is damaged")
    return doc


def _adapter_config(info: CheckpointInfo, content: dict[str, bytes], base: Base | None) -> bytes:
    """The checkpoint's adapter config, checked, with the base the export trusts (or the
    one it named, kept as text and never used, when no base is known)."""
    where = info.path / "adapter_config.json"
    doc = _json_object(content["adapter_config.json"], where)
    if doc.get("peft_type", "LORA") != "LORA":
        raise CorruptCheckpointError(
            f"{where}: peft_type {doc.get('peft_type')!r}; export takes LoRA adapters"
        )
    if base is not None:
        doc["base_model_name_or_path"] = base.path
    return json.dumps(doc, indent=2, sort_keys=True).encode()


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


def _merge(src: Path, content: dict[str, bytes], base: Base, dest: Path) -> None:
    with _quiet_libraries():
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        try:
            # safetensors only: a base folder's pickled weights are never unpickled
            model = AutoModelForCausalLM.from_pretrained(base.path, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot load the base model {base.path} from {base.source} "
                f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "give a base model folder with safetensors weights (--base PATH)"
            ) from None
        # PEFT reads the checked bytes from a private folder, not the checkpoint itself.
        adapter = dest / ".adapter"
        os.mkdir(adapter, 0o700)
        for name, data in content.items():
            (adapter / name).write_bytes(data)
        try:
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        except Exception as e:  # PEFT's config and shape checks raise many types
            raise CorruptCheckpointError(
                f"{src}: its adapter does not load onto {base.path} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); export another checkpoint "
                "or give the right --base"
            ) from None
        finally:
            shutil.rmtree(adapter, ignore_errors=True)
        merged.save_pretrained(dest)


def _local_folder(model: str) -> Path | None:
    """The folder of the model ``model`` names: itself, or its snapshot in the local
    Hugging Face cache (never downloaded); None if neither."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        return Path(snapshot_download(model, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError, OSError, ImportError):
        return None  # a name nothing local answers to: the caller says so


def _copy_tokenizer(base: Path, dest: Path) -> None:
    # Regular files only, never through a link: the base folder is the user's, but a
    # link in it still must not make export read something else.
    for name in _TOKENIZER_FILES:
        if (dest / name).exists():
            continue
        try:
            data = read_regular(base / name, max_size=_MAX_TOKENIZER_BYTES)
        except CorruptCheckpointError:
            continue  # absent, a link or special file, or absurdly large: not copied
        (dest / name).write_bytes(data)
