"""Every option of the engine, documented and validated once.

``Options`` is the single source: the ``Checkpointer`` and ``SafepointCallback`` take
its fields as keyword arguments, ``safepoint train`` generates its flags and YAML keys
from it (``app/config.py``), and ``to_json`` is the form stored in every manifest and in
the run record, read back by ``from_json`` (which also reads the keys of the
checkpoints written before this class existed). Pure: no I/O, no torch.

A new retention rule is one class in ``rules.py`` plus one field here.
"""

from __future__ import annotations

import dataclasses
import difflib
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from safepoint.errors import ConfigError
from safepoint.plan import DEFAULT_MAX_OVERHEAD
from safepoint.schedule import Trigger, parse_save_every
from safepoint.units import parse_duration, parse_size

DEFAULT_SIGNALS = "TERM,INT,USR1"
DEFAULT_MTBF = "24h"


def _doc(text: str, *, json: bool = True, flag: str | None = None) -> Any:
    # ``help`` is the one description of an option: the flag help and the docs use it.
    # ``flag``: the words for a command-line user where the Python ones do not fit (a
    # flag has no None; the CLI writes the option names in it as flags).
    return {"help": " ".join(text.split()), "json": json, "flag": flag and " ".join(flag.split())}


@dataclass(frozen=True)
class Options:
    """What, when and how the ``Checkpointer`` saves, keeps and resumes."""

    # ---- when
    save_every: str | int | None = field(
        default=None,
        metadata=_doc(
            """Steps (500), a fraction of the run (10%), a time (15m), 'epoch', 'auto'
            (from the measured save cost and mtbf), or a comma list of these, whichever
            comes first (10,15m). None: only at the end of the run and on a stop signal.""",
            flag="""Steps (500), a fraction of the run (10%), a time (15m), 'epoch', 'auto'
            (from the measured save cost and --mtbf), or a comma list of these, whichever
            comes first (10,15m).""",
        ),
    )
    total_steps: int | None = field(
        default=None,
        metadata=_doc("Steps of the whole run: always saved at the last; '10%' needs it."),
    )
    mtbf: str | float = field(
        default=DEFAULT_MTBF,
        metadata=_doc(
            "Expected time between failures, for save_every='auto'.",
            flag="Expected time between failures, for save_every auto (e.g. 6h).",
        ),
    )
    max_overhead: float = field(
        default=DEFAULT_MAX_OVERHEAD,
        metadata=_doc(
            "Largest share of the run that save_every='auto' may spend saving.",
            flag="Largest share of the run that save_every auto may spend saving.",
        ),
    )
    # ---- what to keep (rules.py)
    keep_last: int | None = field(
        default=None,
        metadata=_doc(
            "Keep the newest N checkpoints; None keeps all.",
            flag="Keep the newest N checkpoints; 0 keeps all.",
        ),
    )
    keep_best: int = field(
        default=0,
        metadata=_doc(
            """Keep the best K by metric (the best is then protected even from max_disk);
            0 ranks nothing.""",
            flag="""Keep the best K by metric (the best is then protected even from
            max_disk); 0 ranks nothing.""",
        ),
    )
    metric: str = field(
        default="eval_loss",
        metadata=_doc(
            "The metric that ranks checkpoints for keep_best.",
            flag="The metric that ranks checkpoints for keep_best.",
        ),
    )
    mode: Literal["min", "max"] = field(
        default="min", metadata=_doc("Whether lower (min) or higher (max) metric is better.")
    )
    keep_every: int | None = field(
        default=None,
        metadata=_doc("Also keep every checkpoint whose step is a multiple of N (milestones)."),
    )
    keep_after_step: int | None = field(
        default=None,
        metadata=_doc("Also keep every checkpoint after this step (the end of a run)."),
    )
    keep_full: int | None = field(
        default=2,
        metadata=_doc(
            """Keep the full resumable state (optimizer, RNG, scheduler) in the newest N
            checkpoints and the best only; older kept ones are thinned to what evaluation
            and export need (weights or adapter, configs, trainer state), and never
            resumed from. 0 or None: every kept checkpoint stays full.""",
            flag="""Keep the full resumable state (optimizer, RNG, scheduler) in the newest N
            checkpoints and the best only; older kept ones are thinned to the weights,
            configs and trainer state (export, evaluation; not resume). 0: all full.""",
        ),
    )
    max_disk: str | int | None = field(
        default=None,
        metadata=_doc(
            """Byte budget for all checkpoints (e.g. 20GB); the oldest unprotected go
            first, and training does not start if the kept set cannot fit."""
        ),
    )
    # ---- how
    async_save: bool | Literal["auto"] = field(
        default=True,
        metadata=_doc(
            """Write in the background (True: training waits only for the copy to host
            memory; in line when host memory is short) or in line (False: the save
            returns once the checkpoint is durable). "auto", the old default, means True.""",
            flag="""Write in the background (training waits only for the copy to host
            memory; in line when host memory is short), or in line (a save returns once
            the checkpoint is durable).""",
        ),
    )
    copy_free: bool = field(
        default=False,
        metadata=_doc(
            """With async_save, write the tensors an optimizer owns (its parameters and
            state, on the CPU) as they are instead of copying them first: no copy, no
            second checkpoint in RAM; the next optimizer.step() waits until they are
            written. A tensor changed in place outside optimizer.step() meanwhile fails
            that save loudly (nothing is committed); a change through .data is not seen.""",
            flag="""With async_save, write the tensors the optimizer owns as they are
            instead of copying them first: no second checkpoint in RAM; the next step
            waits until they are written.""",
        ),
    )
    on_busy: Literal["wait", "skip"] = field(
        default="wait",
        metadata=_doc(
            """With async_save, a save due while the previous one is still writing:
            wait for it, or skip this one (the end of the run is never skipped).""",
            flag="""A save due while the previous one is still writing in the background:
            wait for it, or skip this one (the end of the run is never skipped).""",
        ),
    )
    on_save_error: Literal["stop", "continue"] = field(
        default="stop",
        metadata=_doc(
            """A scheduled save that fails after freeing space: stop (raise; rerun to
            resume) or continue training until the next due save."""
        ),
    )
    check_disk: bool = field(
        default=True,
        metadata=_doc("Refuse to start when the kept checkpoints cannot fit on the disk."),
    )
    save_rng: bool = field(
        default=True, metadata=_doc("Save and restore the random generators (bit-exact resume).")
    )
    remote: str | None = field(
        default=None,
        metadata=_doc(
            """Mirror every checkpoint to this fsspec URL (s3://bucket/run); an empty
            directory then resumes from the newest remote checkpoint.""",
            json=False,  # may carry credentials; never written to disk
        ),
    )
    # ---- resume
    verify_on_resume: bool = field(
        default=True, metadata=_doc("Check every checksum before resuming from a checkpoint.")
    )
    fingerprint: str | None = field(
        default=None,
        metadata=_doc(
            """Identifies the configuration; a checkpoint with another one is never
            resumed from nor deleted.""",
            json=False,  # stored on its own in each manifest
        ),
    )
    # ---- stopping
    signals: str | tuple[str, ...] | None = field(
        default=DEFAULT_SIGNALS,
        metadata=_doc(
            """Signals that stop the run with an emergency checkpoint and exit code 3
            ('TERM,INT,USR1'; None or 'none' for none).""",
            flag="""Signals that stop the run with an emergency checkpoint and exit code 3
            (TERM,INT,USR1, or none).""",
        ),
    )
    grace: str | float | None = field(
        default=None,
        metadata=_doc(
            """Time between a stop signal and the kill (e.g. 120s): an emergency save
            that cannot finish in it is not started."""
        ),
    )
    stop_on_nan: bool = field(
        default=False,
        metadata=_doc("Stop, saving nothing of that step, when the training loss is NaN or inf."),
    )

    def __post_init__(self) -> None:
        self.triggers  # noqa: B018 -- parses save_every, raising ConfigError
        parse_duration(self.mtbf, what="mtbf")
        parse_signals(self.signals)
        if self.grace is not None:
            parse_duration(self.grace, what="grace")
        if self.max_disk is not None:
            parse_size(self.max_disk, what="max_disk")
        _check_ints(self)
        if not 0 < self.max_overhead < 1:
            raise ConfigError(
                f"max_overhead={self.max_overhead!r} must be a share in (0, 1), e.g. 0.02"
            )
        for name, allowed in (
            ("mode", ("min", "max")),
            ("on_busy", ("wait", "skip")),
            ("on_save_error", ("stop", "continue")),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} must be {' or '.join(map(repr, allowed))}")
        if not (isinstance(self.async_save, bool) or self.async_save == "auto"):
            raise ConfigError(f"async_save={self.async_save!r} must be True, False or 'auto'")
        if self.async_save == "auto":  # read as True once, here, not by every reader
            object.__setattr__(self, "async_save", True)
        if self.on_busy == "skip" and self.async_save is False:
            raise ConfigError("on_busy='skip' applies to background saves: set async_save=True")
        if self.copy_free and self.async_save is False:
            raise ConfigError("copy_free applies to background saves: set async_save=True")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"metric={self.metric!r} must be the name of a metric")

    # ------------------------------------------------------------------ derived

    @property
    def triggers(self) -> tuple[Trigger, ...]:
        return parse_save_every(self.save_every)

    @property
    def max_bytes(self) -> int | None:
        return None if self.max_disk is None else parse_size(self.max_disk, what="max_disk")

    @property
    def mtbf_s(self) -> float:
        return parse_duration(self.mtbf, what="mtbf")

    @property
    def grace_s(self) -> float | None:
        return None if self.grace is None else parse_duration(self.grace, what="grace")

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ forms

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def help(cls, name: str, *, flag: bool = False) -> str:
        """The one description of option ``name``; ``flag``: in a command-line user's
        words (no None, other options named as flags) where they differ."""
        meta = _FIELDS[name].metadata
        return (flag and meta["flag"]) or meta["help"]

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], *, where: str = "Checkpointer") -> Options:
        """``Options(**kwargs)`` with a one-line error naming an unknown option."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            close = difflib.get_close_matches(unknown[0], cls.names(), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(cls.names())}"
            raise ConfigError(f"{where} got unknown option(s) {', '.join(unknown)}; {hint}")
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        """The stored form: sizes in bytes and times in seconds, whatever was typed."""
        doc: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("json", True):
                doc[f.name] = getattr(self, f.name)
        doc["save_every"] = None if self.save_every is None else str(self.save_every)
        doc["max_disk"] = self.max_bytes
        doc["mtbf"] = self.mtbf_s
        doc["grace"] = self.grace_s
        doc["signals"] = ",".join(s.name for s in parse_signals(self.signals)) or None
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Options:
        """Inverse of ``to_json``; unknown keys are ignored, bad values raise ConfigError.

        Also reads the policy that manifests stored before ``Options`` existed
        (``max_bytes``, ``save_every_spec``, ``mtbf_s``)."""
        values = {k: v for k, v in doc.items() if k in _FIELDS and _FIELDS[k].metadata["json"]}
        for old, new in _LEGACY.items():
            if old in doc and doc[old] is not None:
                values[new] = doc[old]
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"unreadable options {dict(doc)!r} ({e})") from e


_FIELDS = {f.name: f for f in dataclasses.fields(Options)}
_LEGACY = {"max_bytes": "max_disk", "save_every_spec": "save_every", "mtbf_s": "mtbf"}


def _check_ints(options: Options) -> None:
    bounds = {
        "total_steps": 1,
        "keep_last": 1,
        "keep_best": 0,
        "keep_every": 1,
        "keep_after_step": 0,
        "keep_full": 0,
    }
    hints = {"keep_last": ": keep at least 1 checkpoint (None keeps all)"}  # message tails
    for name, low in bounds.items():
        value = getattr(options, name)
        if value is None:
            if name == "keep_best":
                raise ConfigError("keep_best=None: give 0 to rank nothing, or K >= 1")
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r} must be a whole number")
        if value < low:
            raise ConfigError(
                (hints.get(name) and f"{name}={value}{hints[name]}")
                or f"{name}={value} must be {low} or more"
            )


def parse_signals(spec: str | Iterable[str | int] | None) -> tuple[signal.Signals, ...]:
    """Signals in ``"TERM,INT,USR1"`` / ``["SIGTERM", 10]``; ``None``, ``""`` or
    ``"none"`` for none. Raises ``ConfigError`` naming an unknown or uncatchable one."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    found: list[signal.Signals] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            try:
                sig = signal.Signals(item)
            except ValueError:
                raise ConfigError(f"signals: {item} is not a signal number") from None
        else:
            name = str(item).strip().upper()
            if name in ("", "NONE"):
                continue
            try:
                sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
            except KeyError:
                raise ConfigError(
                    f"signals: unknown signal {item!r}; use names like TERM,INT,USR1 or none"
                ) from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"signals: {sig.name} cannot be caught; use TERM, INT or USR1")
        found.append(sig)
    return tuple(dict.fromkeys(found))


__all__ = ["DEFAULT_SIGNALS", "Options", "parse_signals"]
