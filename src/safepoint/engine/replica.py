"""The port through which the engine keeps a second copy of a run's checkpoints.

``remote.Mirror`` implements it; the engine (``saver``, ``resume``) knows only this."""

from __future__ import annotations

from typing import Protocol

from safepoint.validity import CheckpointInfo


class Replica(Protocol):
    """A second copy of an output directory's checkpoints, kept beside the local store.

    The engine holds one through this protocol only: it hands over each committed
    checkpoint and asks for one back on a fresh machine. ``remote.Mirror`` is the one
    in use.
    """

    def submit(self, info: CheckpointInfo) -> None:
        """Queue the committed local checkpoint ``info``; never blocks, never raises."""
        ...

    def resubmit_newest(self) -> None:
        """Queue the newest valid local checkpoint (a previous process may have died
        before replicating it)."""
        ...

    def fetch_if_empty(self) -> CheckpointInfo | None:
        """Bring the newest valid replicated checkpoint into an empty local directory and
        return it; None when the local directory has one or the replica has none.
        Raises ``RemoteUnavailableError`` when the replica cannot be read."""
        ...

    def close(self) -> bool:
        """Wait, within the replica's own timeout, for queued work; True if all finished.
        Never raises."""
        ...
