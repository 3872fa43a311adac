"""The ``safepoint train`` job: LoRA (or full) SFT with TRL, saved and resumed by safepoint.

Order matters for "bad input loses nothing": the configuration, the model and the data
are all checked before the output directory is touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safepoint.app.config import SCHEDULE_KEYS, TrainConfig
from safepoint.app.runs import checkpoints
from safepoint.app.sft import build_trainer, check, root_reason
from safepoint.app.tiny import BUILTIN_DATASET, TINY_MODEL, builtin_dataset_path, tiny_model_path
from safepoint.engine.resume import check_resumable
from safepoint.errors import ConfigError, IncompatibleCheckpointError, SafepointError
from safepoint.lock import check_unlocked
from safepoint.validity import CheckpointInfo, newest_first

log = logging.getLogger("safepoint")

__all__ = ["Plan", "build_trainer", "plan"]  # build_trainer: sft.py's, wrapped by tests here

_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Plan:
    """What a run will do, decided before anything is written."""

    config: TrainConfig
    model_path: str
    output_dir: Path
    resume_from: str | None
    train: Any
    eval: Any | None
    new_length: bool = False
    """Resuming with another ``max_steps``/``epochs``: the learning rate of the resumed
    step is taken from the schedule for the new length (``build_trainer``)."""


# ---------------------------------------------------------------------- inputs


def resolve_model(name: str) -> str:
    """A folder ``from_pretrained`` can load, or ``ConfigError``."""
    if name == TINY_MODEL:
        return str(tiny_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {name}: {path} has no config.json; give a model folder")
        try:
            json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"--model {name}: cannot read {path / 'config.json'} ({root_reason(e)}); "
                "give a model folder saved by save_pretrained"
            ) from None
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]:
        raise ConfigError(f"--model {name}: no such folder; give a model folder, or 'tiny'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception as e:  # the hub client raises many types; all mean "cannot get it"
        raise ConfigError(
            f"--model {name}: not a local folder and not obtainable from the Hugging Face hub "
            f"({type(e).__name__}); give a model folder, or 'tiny' for the built-in model"
        ) from None


def _data_path(path_text: str, what: str) -> Path:
    """The file behind ``--dataset``/``--eval-dataset``, checked cheaply before any loading:
    exists, is a file of a known type, readable, not empty, and (JSON) parseable, so that
    a bad line is reported with its 1-based number instead of the parser's row index."""
    if path_text == BUILTIN_DATASET:
        return builtin_dataset_path()
    path = Path(path_text).expanduser()
    if path.is_dir():
        raise ConfigError(f"--{what} {path_text}: is a directory; give a data file")
    if not path.is_file():
        raise ConfigError(f"--{what} {path_text}: no such file")
    if path.suffix.lower() not in _LOADERS:
        raise ConfigError(
            f"--{what} {path_text}: unknown file type {path.suffix!r}; use "
            f"{', '.join(sorted(_LOADERS))}"
        )
    try:
        if path.suffix.lower() == ".parquet":
            empty = path.stat().st_size == 0
        elif path.suffix.lower() in (".jsonl", ".json"):
            empty = _check_json(path, path_text, what)
        else:
            with open(path, "rb") as f:
                empty = not any(line.strip() for line in f)
    except OSError as e:
        raise ConfigError(
            f"--{what} {path_text}: cannot read it ({e.strerror or e}); check its permissions"
        ) from None
    if empty:
        raise ConfigError(f"--{what} {path_text}: the data set is empty; give it some examples")
    return path


def _check_json(path: Path, path_text: str, what: str) -> bool:
    """True if the file holds no examples; ``ConfigError`` naming the first bad line."""
    with open(path, "rb") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        return True
    try:  # datasets reads a .json as one document (a list of objects) or as JSON lines
        first = json.loads(lines[0][1])
    except ValueError:
        first = None
    if path.suffix.lower() == ".json" and not isinstance(first, dict):
        try:
            doc = json.loads(b"".join(line for _, line in lines))
        except ValueError as e:
            where = f"line {e.lineno}: " if isinstance(e, json.JSONDecodeError) else ""
            raise ConfigError(
                f"--{what} {path_text}: not valid JSON ({where}{_json_reason(e)}); fix the file"
            ) from None
        if isinstance(doc, list) and not all(isinstance(x, dict) for x in doc):
            raise ConfigError(
                f"--{what} {path_text}: a JSON list of examples holds only objects "
                '({"text": ...}); fix the file'
            )
        return doc in ([], {})
    for n, line in lines:
        try:
            example = json.loads(line)
        except ValueError as e:
            raise ConfigError(
                f"--{what} {path_text}: line {n} is not valid JSON ({_json_reason(e)}); "
                "fix or remove that line"
            ) from None
        if not isinstance(example, dict):
            raise ConfigError(
                f"--{what} {path_text}: line {n} is not a JSON object "
                '(one {"text": ...} per line); fix or remove that line'
            )
    return False


def _json_reason(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at column {e.colno}"
    return str(e).splitlines()[0]  # UnicodeDecodeError and the like


def _load_file(path_text: str, what: str) -> Any:
    from datasets import disable_progress_bars, load_dataset

    path = _data_path(path_text, what)
    loader = _LOADERS[path.suffix.lower()]
    # datasets logs the parser's error itself before raising it: silence that copy.
    datasets_log = logging.getLogger("datasets")
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)
    disable_progress_bars()
    try:
        data = load_dataset(loader, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in many types
        raise ConfigError(
            f"--{what} {path_text}: cannot read it as {loader} ({root_reason(e)}); fix the file"
        ) from None
    finally:
        datasets_log.setLevel(level)
    if len(data) == 0:
        raise ConfigError(f"--{what} {path_text}: the data set is empty; give it some examples")
    return data


def _check_columns(data: Any, cfg: TrainConfig, where: str) -> None:
    columns = set(data.column_names)
    if cfg.text_field:
        if cfg.text_field not in columns:
            raise ConfigError(
                f"{where}: no column {cfg.text_field!r} for --text-field; it has "
                f"{', '.join(sorted(columns))}"
            )
        return
    if "text" in columns or "messages" in columns or {"prompt", "completion"} <= columns:
        return
    raise ConfigError(
        f"{where}: no text to train on; expected a 'text' column, 'prompt' and "
        f"'completion', or 'messages' (it has {', '.join(sorted(columns))}); "
        "name the column with --text-field"
    )


def load_data(cfg: TrainConfig) -> tuple[Any, Any | None]:
    """The train and eval splits, checked for content."""
    data = _load_file(cfg.dataset, "dataset")
    _check_columns(data, cfg, f"--dataset {cfg.dataset}")
    if cfg.eval_dataset:
        eval_data = _load_file(cfg.eval_dataset, "eval-dataset")
        _check_columns(eval_data, cfg, f"--eval-dataset {cfg.eval_dataset}")
        return data, eval_data
    if cfg.eval_split > 0:
        n_eval = int(len(data) * cfg.eval_split)
        if n_eval < 1 or n_eval >= len(data):
            raise ConfigError(
                f"--eval-split {cfg.eval_split} of {len(data)} examples leaves no "
                "evaluation or no training data; use --eval-split 0 or more data"
            )
        split = data.train_test_split(test_size=n_eval, seed=cfg.seed, shuffle=True)
        return split["train"], split["test"]
    return data, None


# ---------------------------------------------------------------- output dir


def check_output_dir(out: Path) -> None:
    """``ConfigError`` unless ``out`` is, or can be made, a writable directory with free
    space that no live run holds. Creates nothing: the Trainer and the first save do."""
    flag = f"--output-dir {out}"
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == out and not out.is_dir():
        raise ConfigError(f"{flag}: is a file, not a directory; give a directory path")
    if not existing.is_dir():
        raise ConfigError(f"{flag}: {existing} is a file, so no directory can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            problem = f"{existing} is on a read-only file system"
        else:
            problem = f"{existing} is not writable (permission denied)"
        raise ConfigError(f"{flag}: {problem}; choose a writable directory")
    free = shutil.disk_usage(existing).free
    if free < _MIN_FREE:
        raise ConfigError(
            f"{flag}: the disk holding {existing} is full ({free} bytes free); "
            "free space or choose another disk"
        )
    if out.is_dir():
        check_unlocked(out)


# Not even a manifest and the run record fit below this; the real pre-flight, which
# knows the checkpoint size, runs once the model is loaded.
_MIN_FREE = 64 * 1024


def _checkpoints(directory: Path) -> list[CheckpointInfo]:
    return checkpoints(directory) if directory.is_dir() else []


def choose_output(cfg: TrainConfig) -> tuple[Path, str | None, bool]:
    """The output directory, the checkpoint to resume from (None: newest valid, or
    fresh when there is none), and whether the run's length changed since that
    checkpoint (``check_schedule``). Raises before anything is written."""
    out = Path(cfg.output_dir)
    if cfg.resume == "never":
        if _checkpoints(out):
            n = 2
            while _checkpoints(Path(f"{out}-{n}")) or Path(f"{out}-{n}").is_file():
                n += 1
            new = Path(f"{out}-{n}")
            check_output_dir(new)
            log.warning("--resume never: starting fresh in %s; %s is left untouched", new, out)
            return new, None, False
        return out, None, False
    if cfg.resume != "auto":
        # The engine refuses these too, but only once the model is loaded and the output
        # directory made; here nothing has been written yet. The same check and words; a
        # value of --resume that names no resumable checkpoint is a usage error (exit 2).
        path = Path(cfg.resume)
        try:
            check_resumable(path, out, deep=False)
        except SafepointError as e:
            said = str(e)  # the engine's line starts with the path, as given here
            for prefix in (f"{cfg.resume}: ", f"{path}: "):
                said = said.removeprefix(prefix)
            raise ConfigError(f"--resume {cfg.resume}: {said}") from None
        _check_identity(path, cfg, out)
        return out, str(path), check_schedule(path, cfg)
    for info in newest_first(out, deep=False):
        _check_identity(info.path, cfg, out)
        return out, None, check_schedule(info.path, cfg)
    return out, None, False


_LENGTH = ("max_steps", "epochs")


def check_schedule(checkpoint: Path, cfg: TrainConfig) -> bool:
    """Compare the training settings given now with those ``checkpoint`` was saved with.

    The learning rate, scheduler, warmup and gradient accumulation continue as saved (the
    optimizer and schedule state are restored), so a different value is refused with a
    ``ConfigError``. A different length (``max_steps``, ``epochs``) applies: said in one
    line; returns True, and the schedule is recomputed for the new length. Checkpoints
    saved before settings were recorded are not compared. (The batch size is part of
    ``identity()``: another one is another configuration.)
    """
    from safepoint.validity import inspect

    info = inspect(checkpoint)
    theirs = info.manifest.info.get("schedule") if info.manifest else None
    if not isinstance(theirs, dict):
        return False
    ours = cfg.schedule()
    for key in SCHEDULE_KEYS:
        if key in _LENGTH or key not in theirs or key not in ours or theirs[key] == ours[key]:
            continue
        flag = "--" + key.replace("_", "-")
        raise ConfigError(
            f"{flag} {ours[key]}: {checkpoint} was trained with {theirs[key]}, and a resume "
            f"continues its optimizer and learning-rate schedule as saved; rerun with "
            f"{flag} {theirs[key]}, or --resume never to start fresh beside it"
        )
    before, now = _length(theirs), _length(ours)
    if before is None or before == now:
        return False
    log.warning(
        "%s applies: %s was saved by a run of %s; the learning-rate schedule is "
        "recomputed for the new length from step %d on",
        now,
        checkpoint,
        before,
        info.step,
    )
    return True


def _length(settings: dict[str, Any]) -> str | None:
    """A run's length as its flag says it (``--max-steps 93`` or ``--epochs 3.0``)."""
    if settings.get("max_steps") is not None:
        return f"--max-steps {settings['max_steps']}"
    if "epochs" in settings:
        return f"--epochs {settings['epochs']}"
    return None


def _check_identity(checkpoint: Path, cfg: TrainConfig, out: Path) -> None:
    from safepoint.validity import inspect

    info = inspect(checkpoint)
    theirs = (info.manifest.info.get("config") if info.manifest else None) or {}
    fingerprint = info.manifest.fingerprint if info.manifest else None
    if not fingerprint or fingerprint == cfg.fingerprint():
        return
    ours = cfg.identity()
    differ = [
        f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now"
        for k in sorted(set(theirs) | set(ours))
        if theirs.get(k) != ours.get(k)
    ]
    raise IncompatibleCheckpointError(
        f"{checkpoint} belongs to another configuration ({'; '.join(differ) or 'fingerprint'}); "
        f"rerun with the same settings, choose another --output-dir, or --resume never "
        f"to start fresh beside {out}"
    )


def plan(cfg: TrainConfig) -> Plan:
    """Check everything and decide where the run goes. Writes nothing but the model cache."""
    # The cheap checks first: a bad path fails in a second, before any model is loaded.
    check_output_dir(Path(cfg.output_dir))
    for text, what in ((cfg.dataset, "dataset"), (cfg.eval_dataset, "eval-dataset")):
        if text:
            _data_path(text, what)
    if cfg.remote:
        from safepoint.remote_dir import RemoteDir

        RemoteDir(cfg.remote)  # a bad URL or a missing fsspec backend: ConfigError now
    out, resume, new_length = choose_output(cfg)
    train, eval_data = load_data(cfg)  # before importing transformers: seconds sooner
    _quiet_libraries()
    check(cfg)  # the trainer block, scheduler, precision, loggers: before the model
    model_path = resolve_model(cfg.model)
    return Plan(cfg, model_path, out, resume, train, eval_data, new_length)


def _quiet_libraries() -> None:
    # The libraries' own progress bars and deprecation notices would bury safepoint's
    # output; their errors still surface as exceptions.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for module in ("transformers", "peft", "trl", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
