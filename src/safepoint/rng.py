"""Capture and restore every random number generator a training loop draws from."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from safepoint.errors import CorruptCheckpointError
from safepoint.schema import SchemaError, check_rng


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    """The states of python ``random``, numpy's global RNG, torch CPU and CUDA, as JSON."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": np_kind,
            "keys": np_keys.tolist(),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


# The generators' states as they are: (python, numpy, torch CPU, CUDA or None). Copies,
# so they may be encoded later, on another thread, while training draws on.
FrozenRng = tuple[Any, Any, torch.Tensor, Any]


def freeze_rng() -> FrozenRng:
    """Every generator's state now, unencoded (about 70 us; ``rng_json`` encodes it)."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def rng_json(frozen: FrozenRng) -> str:
    """``capture_rng()`` of a ``freeze_rng()`` as ``dumps_json`` writes it (compact,
    sorted keys), faster.

    The python and numpy states are 1,250 integers whose JSON was a third of a LoRA
    save's stall; training seldom draws from those generators, so their text is kept
    and reused while the state is unchanged (a compare costs a few microseconds)."""
    python, numpy, cpu, cuda = frozen
    version, internal, gauss = python
    parts = {
        "python": _cached(
            "python",
            python,
            lambda: {"version": version, "state": list(internal), "gauss": gauss},
        ),
        "numpy": _cached(
            "numpy",
            numpy,
            lambda: {
                "kind": numpy[0],
                "keys": numpy[1].tolist(),
                "pos": int(numpy[2]),
                "has_gauss": int(numpy[3]),
                "gauss": float(numpy[4]),
            },
        ),
        "torch": _compact(_b64(cpu)),
    }
    if cuda is not None:
        parts["cuda"] = _compact([_b64(s) for s in cuda])
    return "{" + ",".join(f'"{k}":{parts[k]}' for k in sorted(parts)) + "}"


def capture_rng_json() -> str:
    """``rng_json(freeze_rng())``: the JSON text of ``capture_rng()``."""
    return rng_json(freeze_rng())


_texts: dict[str, tuple[Any, str]] = {}


def _cached(name: str, state: Any, doc: Callable[[], Any]) -> str:
    last = _texts.get(name)
    if last is not None and _same(last[0], state):
        return last[1]
    text = _compact(doc())
    _texts[name] = (state, text)
    return text


def _same(a: Any, b: Any) -> bool:
    """Equal generator states: python's tuple of ints, or numpy's with its key array."""
    if isinstance(a, tuple) and len(a) == 5 and isinstance(a[1], np.ndarray):
        return (
            isinstance(b, tuple)
            and len(b) == 5
            and a[0] == b[0]
            and a[2:] == b[2:]
            and np.array_equal(a[1], b[1])
        )
    return bool(a == b)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``. CUDA states are restored when the device count matches.

    The whole state is checked first (``schema.check_rng``: word counts and ranges), so a
    bad one raises ``CorruptCheckpointError`` with every generator untouched."""
    try:
        check_rng(state)
    except SchemaError as e:
        raise CorruptCheckpointError(f"RNG state is malformed: {e}") from None
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        n = state["numpy"]
        np.random.set_state(
            (
                n["kind"],
                np.asarray(n["keys"], dtype=np.uint32),
                n["pos"],
                n["has_gauss"],
                n["gauss"],
            )
        )
        torch.set_rng_state(_unb64(state["torch"]))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise CorruptCheckpointError(f"RNG state is malformed ({e})") from e
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
