"""Capture and restore every random number generator a training loop draws from."""

from __future__ import annotations

import base64
import random
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
