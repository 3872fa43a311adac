"""The exceptions safepoint raises: one root, each also the fitting built-in.

Every message names the path, the problem and what to do next. ``exit_code`` is what
the command line exits with when the error reaches it (DESIGN.md "Exit codes").
"""

from __future__ import annotations


class SafepointError(Exception):
    """Root of every error safepoint raises on purpose."""

    exit_code: int = 4


class ConfigError(SafepointError, ValueError):
    """An option, a flag or a config file value is invalid."""

    exit_code = 2


class CheckpointNotFoundError(SafepointError, FileNotFoundError):
    """A checkpoint or directory that was asked for does not exist."""

    exit_code = 2


class CorruptCheckpointError(SafepointError, ValueError):
    """A checkpoint's files disagree with its manifest, or the manifest is unreadable."""


class IncompatibleCheckpointError(SafepointError, ValueError):
    """A checkpoint was written by another configuration or format version."""

    exit_code = 2


class DiskBudgetError(SafepointError, OSError):
    """The checkpoints will not fit on the disk or in the byte budget."""

    exit_code = 2


class RunLockedError(SafepointError, BlockingIOError):
    """Another live process holds the run lock of the output directory."""

    exit_code = 2


class UnsafeFileError(SafepointError, OSError):
    """A file safepoint reads or writes in the output directory is a symlink, a FIFO or
    another special file: it is refused rather than followed."""

    exit_code = 2


class SaveFailedError(SafepointError, OSError):
    """Writing or committing a checkpoint failed; the previous checkpoints are intact."""


class RemoteUnavailableError(SafepointError, ConnectionError):
    """The remote mirror cannot be reached when it is needed (resume on a fresh machine)."""


class SafepointWarning(UserWarning):
    """Something will work but is probably not what the user wants."""
