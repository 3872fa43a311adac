"""The engine: one ``Checkpointer`` (a façade) over decide, saver, resume, preflight and
emergency. See docs/ARCHITECTURE.md for the layers and the path of a save."""

from safepoint.engine.checkpointer import Checkpointer
from safepoint.engine.resume import Resumed
from safepoint.engine.saver import PendingSave

__all__ = ["Checkpointer", "PendingSave", "Resumed"]
