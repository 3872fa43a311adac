"""safepoint: crash-proof checkpointing for fine-tuning runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from safepoint.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    DiskBudgetError,
    IncompatibleCheckpointError,
    RunLockedError,
    SafepointError,
    SaveFailedError,
)
from safepoint.options import Options
from safepoint.retention import RetentionPolicy
from safepoint.validity import CheckpointInfo, latest_checkpoint, verify

if TYPE_CHECKING:
    from safepoint.engine import Checkpointer
    from safepoint.integrations.hf import SafepointCallback


def __getattr__(name: str) -> Any:
    # Loaded on first use: the engine imports torch (~1 s) and the Hugging Face
    # integration transformers (~3 s), which `safepoint ls` and `verify` never need.
    if name == "Checkpointer":
        from safepoint.engine import Checkpointer

        return Checkpointer
    if name == "SafepointCallback":
        from safepoint.integrations.hf import SafepointCallback

        return SafepointCallback
    raise AttributeError(f"module 'safepoint' has no attribute {name!r}")


__all__ = [
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "Checkpointer",
    "ConfigError",
    "CorruptCheckpointError",
    "DiskBudgetError",
    "IncompatibleCheckpointError",
    "Options",
    "RetentionPolicy",
    "RunLockedError",
    "SafepointCallback",
    "SafepointError",
    "SaveFailedError",
    "__version__",
    "latest_checkpoint",
    "verify",
]
