"""The resolved configuration of ``safepoint train``: defaults < YAML file < flags.

Every field is both a YAML key and a flag (``lora_r`` is ``--lora-r``). ``validate``
rejects bad values before anything is written; ``fingerprint`` identifies what makes
two runs incompatible (model, data, LoRA shape...), so a rerun cannot resume from
another configuration's checkpoints by mistake.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from safepoint.errors import ConfigError
from safepoint.options import Options


def _help(text: str) -> dict[str, str]:
    # ``help`` is the one description of a job key: ``--help`` and docs/config.md use it.
    return {"help": " ".join(text.split())}


@dataclass
class _Job:
    """The job half of ``TrainConfig``: model, data, LoRA, the loop."""

    model: str = field(
        default="tiny", metadata=_help("'tiny' (built in), a model folder, or a cached hub name.")
    )
    dataset: str = field(
        default="builtin", metadata=_help("'builtin' or a .jsonl/.json/.csv/.parquet/.txt file.")
    )
    text_field: str | None = field(
        default=None,
        metadata=_help("Column with plain text (unset: text, prompt/completion or messages)."),
    )
    output_dir: str = field(
        default="runs/default", metadata=_help("Where checkpoints go; a rerun resumes there.")
    )
    epochs: float = field(
        default=3.0, metadata=_help("Passes over the data (a step limit overrides it).")
    )
    max_steps: int | None = field(
        default=None, metadata=_help("Stop after this many optimizer steps.")
    )
    batch_size: int = field(default=8, metadata=_help("Examples per device and step."))
    eval_batch_size: int | None = field(
        default=None, metadata=_help("Examples per device in evaluation (unset: the batch size).")
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata=_help("Batches whose gradients add up to one optimizer step.")
    )
    learning_rate: float = field(default=1e-2, metadata=_help("Peak learning rate."))
    lr_scheduler_type: str = field(
        default="linear",
        metadata=_help(
            "Learning-rate schedule: linear, cosine, constant_with_warmup, or another of HF's."
        ),
    )
    warmup_steps: int = field(
        default=2, metadata=_help("Steps of linear warmup to the peak learning rate.")
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata=_help("Warmup as a share of the run (e.g. 0.05), instead of a number of steps."),
    )
    precision: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32",
        metadata=_help("Mixed precision: bf16 (recent GPUs, and CPUs), fp16 (CUDA GPUs) or fp32."),
    )
    max_length: int = field(
        default=64, metadata=_help("Longest example in tokens; longer ones are truncated.")
    )
    lora_r: int = field(default=8, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=16, metadata=_help("LoRA alpha."))
    lora_dropout: float = field(default=0.05, metadata=_help("LoRA dropout."))
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata=_help("Module names LoRA adapts, comma-separated (unset: PEFT's choice)."),
    )
    full: bool = field(
        default=False, metadata=_help("Fine-tune every weight instead of a LoRA adapter.")
    )
    fsdp: bool = field(
        default=False,
        metadata=_help(
            "Under torchrun: shard the model over the processes (FSDP2); each saves its pieces."
        ),
    )
    seed: int = field(default=42, metadata=_help("Random seed, 0 to 4294967295."))
    eval_split: float = field(
        default=0.1, metadata=_help("Share of the data held out for evaluation (0: none).")
    )
    eval_dataset: str | None = field(
        default=None, metadata=_help("A separate evaluation file (then no split is held out).")
    )
    eval_every: int | None = field(
        default=None, metadata=_help("Evaluate every N steps (unset: at each step save).")
    )
    early_stopping: int | None = field(
        default=None, metadata=_help("Stop after N evaluations without a better metric.")
    )
    report_to: str = field(
        default="none",
        metadata=_help(
            "Where the Trainer logs metrics too: none, tensorboard, wandb (comma list)."
        ),
    )
    trainer: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help(
            """Any other SFTConfig/TrainingArguments field, as is (YAML: a trainer: block;
            flag: KEY=VALUE, repeatable)."""
        ),
    )
    resume: str = field(
        default="auto",
        metadata=_help(
            "auto (the newest valid checkpoint), never (fresh, in a new directory) or a path."
        ),
    )

    # ------------------------------------------------------------------ build

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(TrainConfig)]

    @classmethod
    def resolve(cls, file: str | None, flags: dict[str, Any]) -> Any:
        """Defaults, then the YAML ``file``, then the ``flags`` that were given (not None)."""
        values: dict[str, Any] = {}
        if file is not None:
            values.update(_read_yaml(Path(file)))
        given = {k: v for k, v in flags.items() if v is not None}
        if isinstance(values.get("trainer"), dict) and "trainer" in given:
            given["trainer"] = {**values["trainer"], **given["trainer"]}  # key by key
        values.update(given)
        types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: _coerce(k, v, types[k]) for k, v in values.items()})
        cfg.validate()
        if cfg.keep_last == 0:
            cfg.keep_last = None  # 0 is how a flag says "keep all"
        return cfg

    @classmethod
    def help(cls, name: str) -> str:
        """The one description of key ``name`` (a job key's, or ``Options.help``)."""
        return TrainConfig.__dataclass_fields__[name].metadata["help"]

    def validate(self) -> None:
        """Raise ``ConfigError`` on any bad value; writes nothing. (``report_to``, the
        scheduler and the ``trainer`` block are checked by ``sft.check`` in ``job.plan``.)"""
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"seed must be in 0..{SEED_LIMIT - 1}, numpy's limit; e.g. 42")
        for key in self.keys():  # torch and numpy hold counts and sizes in 64 bits
            value = getattr(self, key)
            if type(value) is int and not -_INT64 <= value < _INT64:
                raise ConfigError(f"{key} {value} is out of range; give a number below 2**63")
        if self.keep_last is not None and self.keep_last < 0:
            raise ConfigError(
                f"keep_last={self.keep_last}: give N >= 1 to keep the newest N checkpoints, "
                "or 0 to keep all"
            )
        self.options()  # every checkpointing option, checked where it is defined
        checks = [
            (self.epochs > 0, "epochs must be more than 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (
                self.eval_batch_size is None or self.eval_batch_size >= 1,
                "eval_batch_size must be at least 1",
            ),
            (
                self.gradient_accumulation_steps >= 1,
                "gradient_accumulation_steps must be at least 1",
            ),
            (self.warmup_steps >= 0, "warmup_steps must be 0 or more"),
            (
                self.warmup_ratio is None or 0 <= self.warmup_ratio < 1,
                "warmup_ratio must be a share in [0, 1), e.g. 0.05",
            ),
            (
                self.precision in ("fp32", "bf16", "fp16"),
                f"precision {self.precision!r} must be fp32, bf16 or fp16",
            ),
            (self.learning_rate > 0, "learning_rate must be more than 0"),
            (self.max_length >= 8, "max_length must be at least 8 tokens"),
            (self.lora_r >= 1, "lora_r must be at least 1"),
            (self.lora_alpha >= 1, "lora_alpha must be at least 1"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (0 <= self.eval_split < 1, "eval_split must be in [0, 1), e.g. 0.1"),
            (self.eval_every is None or self.eval_every >= 1, "eval_every must be at least 1"),
            (
                self.early_stopping is None or self.early_stopping >= 1,
                "early_stopping must be a patience of at least 1 evaluation",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message} (see `safepoint train --help`)")
        if self.early_stopping and not (self.eval_split or self.eval_dataset):
            raise ConfigError(
                "early_stopping needs evaluations: set --eval-split or --eval-dataset"
            )

    # ------------------------------------------------------------------ views

    def options(self) -> Options:
        """The checkpointing options of this run (the fields it shares with ``Options``)."""
        shared = set(self.keys()) & set(Options.names())
        values = {k: getattr(self, k) for k in shared}
        values["keep_last"] = values["keep_last"] or None  # 0 is how a flag says "keep all"
        return Options(**values, fingerprint=self.fingerprint())

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.keys()}

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it."""
        keys = [
            "model",
            "dataset",
            "text_field",
            "full",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            "max_length",
            "batch_size",
            "seed",
            "eval_split",
            "eval_dataset",
        ]
        ident = {k: getattr(self, k) for k in keys}
        if self.full:
            for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"):
                ident.pop(k)
        for k in ("dataset", "eval_dataset"):
            value = ident[k]
            if value and Path(value).is_file():
                ident[f"{k}_sha256"] = _file_digest(Path(value))
        return ident

    def schedule(self) -> dict[str, Any]:
        """The training settings a checkpoint records besides ``identity()``, which a
        resume compares (``job.check_schedule``): the learning rate and the length."""
        keys = [k for k in SCHEDULE_KEYS if hasattr(self, k)]
        return {k: getattr(self, k) for k in keys}

    def fingerprint(self) -> str:
        """A short hash of ``identity()``, stored in every checkpoint's manifest."""
        body = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(body).hexdigest()[:16]


# The checkpointing half of the config is ``Options`` itself: every engine option is a
# YAML key and a flag of `safepoint train`, with the job's own defaults, so an option
# added to ``Options`` reaches the command line with no edit here.
JOB_DEFAULTS: dict[str, Any] = {"save_every": "10", "keep_last": 3, "keep_best": 1}
"""Where `safepoint train` differs from the library's defaults (keep_last 0: all)."""
_NOT_KEYS = {"total_steps", "fingerprint"}  # from max_steps, and from the config itself


def _checkpoint_fields() -> list[tuple[str, Any, Any]]:
    return [
        (
            f.name,
            f.type,
            dataclasses.field(default=JOB_DEFAULTS.get(f.name, f.default), metadata=f.metadata),
        )
        for f in dataclasses.fields(Options)
        if f.name not in _NOT_KEYS
    ]


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    _checkpoint_fields(),
    bases=(_Job,),
    namespace={"__doc__": "Everything ``safepoint train`` needs; the defaults run the example."},
)
TrainConfig.__module__ = __name__


def checkpoint_keys() -> list[str]:
    """The config keys that are engine ``Options`` (the rest configure the job)."""
    return [f.name for f in dataclasses.fields(Options) if f.name not in _NOT_KEYS]


SCHEDULE_KEYS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "gradient_accumulation_steps",
    "max_steps",
    "epochs",
)
"""Settings a resume cannot change silently: ``job.check_schedule`` says which value
applies, or refuses (the learning rate, schedule and accumulation continue as saved;
the length given now applies). Those the config does not have are skipped."""
_INT64 = 2**63
SEED_LIMIT = 2**32
"""Seeds are below 2**32: numpy's ``np.random.seed`` (called by transformers' ``set_seed``)
takes 0 <= seed < 2**32 and raises ``ValueError`` otherwise; torch takes 64 bits."""


def _coerce(key: str, value: Any, kind: str) -> Any:
    """A YAML or flag value as the field's type, or ``ConfigError`` naming the key."""
    if value is None and "None" in kind:
        return None
    base = kind.split(" |")[0]
    try:
        if base == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
                return value.lower() in ("true", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "list[str]":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list):
                raise ValueError
            return [str(v).strip() for v in items if str(v).strip()]
        if base == "dict[str, Any]":
            if not isinstance(value, dict):
                raise ValueError
            return {str(k).replace("-", "_"): v for k, v in value.items()}
        if base == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {base}") from None
    return value


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({where}{problem}); fix the file") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a config file is a mapping of keys to values")
    valid = TrainConfig.keys()
    out = {}
    for key, value in doc.items():
        name = str(key).replace("-", "_")
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"{path}: unknown key {key!r}; {hint}")
        out[name] = value
    return out


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML, loadable again with ``--config``."""
    import yaml

    return yaml.safe_dump(cfg.as_dict(), sort_keys=False)
