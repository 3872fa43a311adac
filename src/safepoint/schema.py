"""Bounded checks of the JSON documents inside a checkpoint: ``state.json`` and the RNG
states it holds (the manifest's own fields are checked in ``manifest.py``).

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
from collections.abc import Collection
from typing import Any

from safepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.format import loads_json

STATE_NAME = "state.json"
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
