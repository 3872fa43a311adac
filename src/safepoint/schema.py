"""Bounded checks of the JSON documents inside a checkpoint: ``state.json``, the RNG
states it holds, and the Trainer's ``trainer_state.json`` (the manifest's own fields are
checked in ``manifest.py``).

Every value read from a checkpoint may come from an untrusted machine. ``loads_json``
already bounds nesting and numbers; these checks bound every field a reader then uses,
so that an invalid document is reported (``CorruptCheckpointError``: the checkpoint is
``corrupt`` in ``ls``/``verify`` and resume falls back to an older one) instead of
raising ``OverflowError`` or ``TypeError`` deep inside torch or numpy. No torch here:
``safepoint ls`` runs these checks without importing it.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Collection
from typing import Any

from safepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.fileio import loads_json

STATE_NAME = "state.json"
SHARDS_NAME = "shards.json"
"""The index of a sharded checkpoint's pieces (``sharding.py``)."""
TRAINER_STATE_NAME = "trainer_state.json"
MAX_TRAINER_STATE_BYTES = 256 << 20  # trainer_state.json of a very long run is a few MB
_BIG = 2**63
STATE_VERSION = 1
ENTRY_KINDS = ("stateful", "value")

# CPython's Mersenne Twister: 624 words and a position (random.getstate() version 3).
_MT_WORDS = 624
# torch.get_rng_state() of the CPU generator: 5056 bytes (MT words, position, seeds).
_TORCH_RNG_BYTES = 5056
_MAX_CUDA_DEVICES = 1024


class SchemaError(ValueError):
    """One field is invalid; the message says which (turned into a corrupt report)."""


def is_int(value: object, lo: int, hi: int) -> bool:
    """An int (not a bool) with ``lo <= value < hi``."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value < hi


def is_number(value: object, lo: float, hi: float) -> bool:
    """An int or float (not a bool) with ``lo <= value <= hi`` (so never NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi


def require(ok: bool, field: str, value: object, want: str) -> None:
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise SchemaError(f"{field} is {shown}; expected {want}")


def parse_state(data: bytes, *, files: Collection[str] | None, where: str) -> dict[str, Any]:
    """Parse and check the bytes of a ``state.json``. Raises ``CorruptCheckpointError``,
    or ``IncompatibleCheckpointError`` for a state format newer than this one reads."""
    doc = check_state_doc(loads_json(data, where=where), files=files, where=where)
    if doc["version"] > STATE_VERSION:
        raise IncompatibleCheckpointError(
            f"{where}: state format {doc['version']!r} is newer than this safepoint reads; "
            "upgrade safepoint"
        )
    return doc


def check_state_doc(doc: Any, *, files: Collection[str] | None, where: str) -> dict[str, Any]:
    """Check a parsed ``state.json``; return it. ``files`` are the names the manifest
    lists: an entry may only point at one of them (None: not checked here).

    Raises ``CorruptCheckpointError`` naming the first invalid field. A version newer
    than this safepoint reads passes: the caller reports it as incompatible.
    """
    try:
        require(isinstance(doc, dict), "the document", type(doc).__name__, "an object")
        require(is_int(doc.get("version"), 1, 2**31), "version", doc.get("version"), "int >= 1")
        if "step" in doc:
            require(is_int(doc["step"], 0, 10**18), "step", doc["step"], "a step number")
        entries = doc.get("entries")
        require(isinstance(entries, dict), "entries", entries, "an object")
        for key, entry in entries.items():
            field = f"entries.{key}"
            require(isinstance(entry, dict), field, entry, "an object")
            kind = entry.get("kind")
            require(kind in ENTRY_KINDS, f"{field}.kind", kind, " or ".join(ENTRY_KINDS))
            name = entry.get("file")
            sharded = entry.get("sharded", False)
            require(isinstance(sharded, bool), f"{field}.sharded", sharded, "true or false")
            if sharded:
                require(name is None, f"{field}.file", name, "null for a sharded entry")
                require(
                    files is None or SHARDS_NAME in files,
                    f"{field}.sharded",
                    sharded,
                    f"an entry with its pieces in a {SHARDS_NAME} the manifest lists",
                )
            if name is not None:
                require(
                    isinstance(name, str) and (files is None or name in files),
                    f"{field}.file",
                    name,
                    "a file listed in the manifest",
                )
                require(name.endswith(".safetensors"), f"{field}.file", name, "*.safetensors")
        if doc.get("rng") is not None:
            check_rng(doc["rng"])
        progress = doc.get("progress")
        require(progress is None or isinstance(progress, dict), "progress", progress, "object")
    except SchemaError as e:
        raise CorruptCheckpointError(f"{where}: {e}") from None
    return doc


def check_rng(state: Any, field: str = "rng") -> None:
    """Check an RNG state as ``capture_rng`` writes it; raises ``SchemaError``.

    Every word is range-checked here because Python, numpy and torch each fail in their
    own way on a bad one (``OverflowError`` for a key of -1 or 2**70, a silent wrap, or
    an abort in C), and a failure after some generators were already set would leave
    the process half restored.
    """
    require(isinstance(state, dict), field, type(state).__name__, "an object")
    py = state.get("python")
    require(isinstance(py, dict), f"{field}.python", py, "an object")
    words = py.get("state")
    require(py.get("version") == 3, f"{field}.python.version", py.get("version"), "3")
    require(
        isinstance(words, list)
        and len(words) == _MT_WORDS + 1
        and all(is_int(w, 0, 2**32) for w in words[:-1])
        and is_int(words[-1], 0, _MT_WORDS + 1),
        f"{field}.python.state",
        "(624 words and a position)" if isinstance(words, list) else words,
        "624 words below 2**32 and a position in 0..624",
    )
    gauss = py.get("gauss")
    require(
        gauss is None or is_number(gauss, -1e308, 1e308),
        f"{field}.python.gauss",
        gauss,
        "None or a number",
    )
    n = state.get("numpy")
    require(isinstance(n, dict), f"{field}.numpy", n, "an object")
    require(n.get("kind") == "MT19937", f"{field}.numpy.kind", n.get("kind"), "'MT19937'")
    keys = n.get("keys")
    require(
        isinstance(keys, list)
        and len(keys) == _MT_WORDS
        and all(is_int(k, 0, 2**32) for k in keys),
        f"{field}.numpy.keys",
        "(a list)" if isinstance(keys, list) else keys,
        "624 words in 0..2**32-1",
    )
    require(is_int(n.get("pos"), 0, _MT_WORDS + 1), f"{field}.numpy.pos", n.get("pos"), "0..624")
    require(n.get("has_gauss") in (0, 1), f"{field}.numpy.has_gauss", n.get("has_gauss"), "0 or 1")
    require(
        is_number(n.get("gauss"), -1e308, 1e308), f"{field}.numpy.gauss", n.get("gauss"), "a number"
    )
    _check_b64(state.get("torch"), f"{field}.torch", _TORCH_RNG_BYTES)
    cuda = state.get("cuda")
    if cuda is not None:
        require(
            isinstance(cuda, list) and len(cuda) <= _MAX_CUDA_DEVICES,
            f"{field}.cuda",
            type(cuda).__name__,
            "a list (one state per device)",
        )
        for i, s in enumerate(cuda):
            _check_b64(s, f"{field}.cuda.{i}", None)


def _check_b64(value: object, field: str, size: int | None) -> None:
    require(
        isinstance(value, str) and len(value) < 1 << 20,
        field,
        type(value).__name__,
        "a base64 string",
    )
    try:
        raw = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise SchemaError(f"{field} is not valid base64") from None
    if size is not None:
        require(len(raw) == size, field, f"{len(raw)} bytes", f"{size} bytes")
    else:
        require(0 < len(raw) <= 4096, field, f"{len(raw)} bytes", "a CUDA generator state")


def parse_trainer_state(data: bytes, *, step: int, where: str) -> dict[str, Any]:
    """Parse and check the bytes of a ``trainer_state.json`` (see ``check_trainer_state_doc``).

    ``NaN`` and ``Infinity`` are read: the Trainer writes them (a ``grad_norm`` of inf in
    an fp16 run's log) and reads them back itself."""
    doc = loads_json(data, where=where, nonfinite=True)
    return check_trainer_state_doc(doc, step=step, where=where)


def check_trainer_state_doc(doc: Any, *, step: int, where: str) -> dict[str, Any]:
    """Check every field of a Trainer's ``trainer_state.json`` that a reader uses, with
    bounds; ``step`` is the manifest's. Raises ``CorruptCheckpointError``.

    Structural only (no transformers here, so ``ls`` and ``verify`` run it): the Trainer
    integration also checks the field names against the live ``TrainerState``."""
    try:
        require(isinstance(doc, dict), "the document", type(doc).__name__, "an object")
        require(doc.get("global_step") == step, "global_step", doc.get("global_step"), f"{step}")
        for name in ("max_steps", "num_input_tokens_seen"):
            require(is_int(doc.get(name, 0), 0, _BIG), name, doc.get(name), "an int >= 0")
        for name in ("epoch", "total_flos", "logging_steps", "eval_steps", "save_steps"):
            require(is_number(doc.get(name, 0), 0, 1e300), name, doc.get(name), "a number >= 0")
        require(is_number(doc.get("num_train_epochs", 0), 0, 1e12), "num_train_epochs",
                doc.get("num_train_epochs"), "a number >= 0")  # fmt: skip
        for name, ok in (
            ("train_batch_size", lambda v: is_int(v, 1, _BIG)),
            ("best_global_step", lambda v: is_int(v, 0, _BIG)),
            ("best_metric", lambda v: is_number(v, -1e300, 1e300) or _nonfinite(v)),
            ("trial_name", lambda v: isinstance(v, str)),
            ("trial_params", _flat_object),
            ("best_model_checkpoint", lambda v: isinstance(v, str)),
        ):
            value = doc.get(name)
            require(value is None or ok(value), name, value, "null or a valid value")
        for name in ("is_local_process_zero", "is_world_process_zero", "is_hyper_param_search"):
            require(isinstance(doc.get(name, False), bool), name, doc.get(name), "a bool")
        history = doc.get("log_history", [])
        require(isinstance(history, list), "log_history", history, "a list")
        for i, entry in enumerate(history):
            require(_flat_object(entry), f"log_history[{i}]", entry, "an object of numbers")
        _check_callbacks(doc.get("stateful_callbacks"))
    except SchemaError as e:
        raise CorruptCheckpointError(f"{where}: {e}") from None
    return doc


def _nonfinite(value: object) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _flat_object(value: Any) -> bool:
    """An object of JSON scalars (log entries, trial params)."""
    return isinstance(value, dict) and all(
        isinstance(v, (int, float, str, bool)) or v is None for v in value.values()
    )


def _check_callbacks(value: Any) -> None:
    # The Trainer may rebuild callbacks from these (restore_callback_states_from_checkpoint):
    # ``type(cb)(**args)`` and ``setattr`` of each attribute. Only flat scalars pass.
    require(value is None or isinstance(value, dict), "stateful_callbacks", value, "an object")
    for name, data in (value or {}).items():
        for i, one in enumerate(data if isinstance(data, list) else [data]):
            field = f"stateful_callbacks.{name}[{i}]"
            require(isinstance(one, dict) and set(one) <= {"args", "attributes"}, field, one,
                    "an object of args and attributes")  # fmt: skip
            for part in ("args", "attributes"):
                got = one.get(part, {})
                require(_flat_object(got), f"{field}.{part}", got, "an object of scalars")
