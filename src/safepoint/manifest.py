"""The manifest, ``safepoint.json``: written last, it is what makes a folder a checkpoint.

It lists every other file with its size and checksum, the step, metrics and the
versions that wrote it, and carries a checksum of its own content so that a damaged
manifest is told apart from a damaged tensor file.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from safepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.format import CHECKSUM, dumps_json, is_safe_name, loads_json, new_hasher

MANIFEST_NAME = "safepoint.json"
FORMAT_NAME = "safepoint"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint as the manifest records it."""

    size: int
    checksum: str


@dataclass(frozen=True)
class Manifest:
    """Parsed ``safepoint.json``."""

    step: int
    files: dict[str, FileEntry]
    created: float = field(default_factory=time.time)
    reason: str = "step"
    metrics: dict[str, float] = field(default_factory=dict)
    fingerprint: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "step": self.step,
            "created": self.created,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "reason": self.reason,
            "checksum": CHECKSUM,
            "files": {
                n: {"size": f.size, CHECKSUM: f.checksum} for n, f in sorted(self.files.items())
            },
            "metrics": _metrics(self.metrics),
            "fingerprint": self.fingerprint,
            "versions": self.versions,
            "info": self.info,
        }
        body["manifest_checksum"] = _self_checksum(body)
        return dumps_json(body)

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Manifest:
        """Parse and check a manifest. Raises ``CorruptCheckpointError`` (damaged) or
        ``IncompatibleCheckpointError`` (another format or a newer version)."""
        body = loads_json(data, where=where)
        if not isinstance(body, dict):
            raise CorruptCheckpointError(f"{where}: manifest is not a JSON object")
        if body.get("format") != FORMAT_NAME:
            raise IncompatibleCheckpointError(
                f"{where}: not a safepoint manifest (format={body.get('format')!r})"
            )
        version = body.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise IncompatibleCheckpointError(
                f"{where}: manifest format version {version!r} is newer than this safepoint "
                f"reads ({FORMAT_VERSION}); upgrade safepoint"
            )
        stored = body.pop("manifest_checksum", None)
        if stored != _self_checksum(body):
            raise CorruptCheckpointError(f"{where}: manifest content does not match its checksum")
        if body.get("checksum") != CHECKSUM:
            raise IncompatibleCheckpointError(
                f"{where}: unknown checksum {body.get('checksum')!r}; upgrade safepoint"
            )
        try:
            files = {}
            for name, entry in dict(body["files"]).items():
                if not is_safe_name(name) or name == MANIFEST_NAME:
                    raise CorruptCheckpointError(
                        f"{where}: manifest lists {name!r}, which is not a plain file name "
                        "inside the checkpoint; refusing to read it"
                    )
                size, digest = entry["size"], entry[CHECKSUM]
                if not isinstance(size, int) or size < 0 or not isinstance(digest, str):
                    raise TypeError(f"bad entry for {name!r}")
                files[name] = FileEntry(size, digest)
            step = body["step"]
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise TypeError(f"bad step {step!r}")
            return cls(
                step=step,
                files=files,
                created=float(body.get("created", 0.0)),
                reason=str(body.get("reason", "step")),
                metrics=_metrics(body.get("metrics") or {}),
                fingerprint=body.get("fingerprint"),
                versions={str(k): str(v) for k, v in dict(body.get("versions") or {}).items()},
                info=dict(body.get("info") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, CorruptCheckpointError):
                raise
            raise CorruptCheckpointError(f"{where}: malformed manifest ({e})") from e


def _metrics(raw: Any) -> dict[str, float]:
    """Finite numbers only: a NaN loss is not a metric retention can rank."""
    return {
        str(k): float(v)
        for k, v in dict(raw).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _self_checksum(body: dict[str, Any]) -> str:
    h = new_hasher()
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()
