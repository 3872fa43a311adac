"""The manifest, ``safepoint.json``: written last, it is what makes a folder a checkpoint.

It lists every other file with its size and checksum, the step, metrics and the
versions that wrote it, and carries a checksum of its own content so that a damaged
manifest is told apart from a damaged tensor file.
"""

from __future__ import annotations

import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from safepoint.errors import CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.fileio import CHECKSUM, dumps_json, is_safe_name, loads_json, new_hasher
from safepoint.schema import SchemaError, is_int, is_number, require

MANIFEST_NAME = "safepoint.json"
FORMAT_NAME = "safepoint"
FORMAT_VERSION = 2
"""The newest version this safepoint reads. A full checkpoint's manifest is still
written as version 1 (byte for byte what older releases read); a thin one's as version
2, so that an older safepoint calls it foreign ("upgrade safepoint") and never tries to
resume from it."""
THIN_VERSION = 2


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint as the manifest records it."""

    size: int
    checksum: str


@dataclass(frozen=True)
class Parent:
    """The checkpoint a checkpoint descends from: the run's previous commit, or the one
    it resumed from (its step and its manifest's own checksum). Two checkpoints of one
    line of descent are linked by these; a rollback starts another line."""

    step: int
    manifest: str

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "manifest": self.manifest}


@dataclass(frozen=True)
class Thin:
    """The mark of a thin checkpoint: what evaluation and export need was kept (the
    files its manifest lists, each with the size and checksum it had in the full one),
    the resumable-only state dropped. ``full``: the manifest checksum of the full
    checkpoint it was thinned from (a child's ``parent`` may name that one);
    ``dropped``: the names of the files left out."""

    full: str
    dropped: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"full": self.full, "dropped": list(self.dropped)}


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
    parent: Parent | None = None
    """None: the first checkpoint of a run started from scratch (or an older manifest)."""
    thin: Thin | None = None
    """Set on a thin checkpoint (never resumed from); None: full, resumable."""
    stored_digest: str | None = field(default=None, compare=False, repr=False)
    """The ``manifest_checksum`` read (and checked) by ``from_json``."""

    @property
    def is_thin(self) -> bool:
        """Thinned: weights and what evaluation needs, never resumed from."""
        return self.thin is not None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @cached_property
    def digest(self) -> str:
        """The manifest's own checksum (``manifest_checksum``): names this checkpoint's
        exact content, as a child's ``parent`` records it."""
        return self.stored_digest or _self_checksum(self._body())

    def same_files(self, other: Manifest) -> bool:
        """Whether ``other`` lists the same files with the same sizes and checksums."""
        return self.files == other.files

    def to_json(self) -> bytes:
        body = self._body()
        body["manifest_checksum"] = _self_checksum(body)
        return dumps_json(body, indent=1)

    def _body(self) -> dict[str, Any]:
        body = {
            "format": FORMAT_NAME,
            "version": 1 if self.thin is None else THIN_VERSION,
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
        if self.parent is not None:  # absent, not null: older readers' manifests unchanged
            body["parent"] = self.parent.to_json()
        if self.thin is not None:
            body["thin"] = self.thin.to_json()
        return body

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
        if not is_int(version, 1, 2**31):
            raise CorruptCheckpointError(f"{where}: manifest version {version!r} is not a version")
        if version > FORMAT_VERSION:
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
            return cls._checked(body, where, stored=stored)
        except SchemaError as e:
            raise CorruptCheckpointError(f"{where}: {e}") from None

    @classmethod
    def _checked(cls, body: dict[str, Any], where: str, *, stored: str) -> Manifest:
        # Every field a reader uses is bounded here, so that `ls`, retention and restore
        # never meet a value that overflows (a created time of 1e300, a metric of
        # 10**400 is already refused by loads_json) or has the wrong type.
        raw_files = body.get("files")
        require(isinstance(raw_files, dict), "files", type(raw_files).__name__, "an object")
        files = {}
        for name, entry in raw_files.items():
            if not is_safe_name(name) or name == MANIFEST_NAME:
                raise CorruptCheckpointError(
                    f"{where}: manifest lists {name!r}, which is not a plain file name "
                    "inside the checkpoint; refusing to read it"
                )
            require(isinstance(entry, dict), f"files.{name}", entry, "an object")
            size, digest = entry.get("size"), entry.get(CHECKSUM)
            require(is_int(size, 0, 2**63), f"files.{name}.size", size, "a byte count")
            require(
                isinstance(digest, str) and _HEX32.fullmatch(digest) is not None,
                f"files.{name}.{CHECKSUM}",
                digest,
                "32 hex digits",
            )
            files[name] = FileEntry(size, digest)
        step = body.get("step")
        require(is_int(step, 0, 10**18), "step", step, "a step number")
        created = body.get("created", 0.0)
        require(is_number(created, 0, _MAX_TIME), "created", created, "a Unix time")
        reason = body.get("reason", "step")
        require(isinstance(reason, str) and len(reason) <= 200, "reason", reason, "a short text")
        metrics = body.get("metrics") or {}
        require(isinstance(metrics, dict), "metrics", metrics, "an object")
        for k, v in metrics.items():
            require(is_number(v, -_MAX_FLOAT, _MAX_FLOAT), f"metrics.{k}", v, "a finite number")
        fingerprint = body.get("fingerprint")
        require(
            fingerprint is None or isinstance(fingerprint, str),
            "fingerprint",
            fingerprint,
            "a string",
        )
        versions = body.get("versions") or {}
        require(
            isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values()),
            "versions",
            versions,
            "an object of strings",
        )
        info = body.get("info") or {}
        require(isinstance(info, dict), "info", info, "an object")
        _check_info(info)
        parent = body.get("parent")
        require(
            parent is None
            or (
                isinstance(parent, dict)
                and is_int(parent.get("step"), 0, 10**18)
                and isinstance(parent.get("manifest"), str)
                and _HEX32.fullmatch(parent["manifest"]) is not None
            ),
            "parent",
            parent,
            "an object with a step and a manifest checksum",
        )
        thin = _thin(body.get("thin"))
        require(
            thin is None or body.get("version") == THIN_VERSION,
            "thin",
            body.get("thin"),
            f"only in a version {THIN_VERSION} manifest",
        )
        return cls(
            step=step,
            files=files,
            created=float(created),
            reason=reason,
            metrics={k: float(v) for k, v in metrics.items()},
            fingerprint=fingerprint,
            versions=dict(versions),
            info=info,
            parent=None if parent is None else Parent(parent["step"], parent["manifest"]),
            thin=thin,
            stored_digest=stored,
        )


_HEX32 = re.compile(r"[0-9a-f]{32}")
_MAX_TIME = 1e11  # seconds since 1970: the year 5138
_MAX_FLOAT = 1.7976931348623157e308

# info fields that `ls`, `report` and `plan` read as numbers
_INFO_NUMBERS = ("write_s", "stall_s", "snapshot_s", "wait_s", "bytes")
# the stored retention policy (retention.policy_to_json): `ls` and `prune` rebuild it
_POLICY_INTS = {"keep_last": 1, "keep_best": 0, "keep_every": 1, "max_bytes": 1}


def _check_info(info: dict[str, Any]) -> None:
    for k in _INFO_NUMBERS:
        if k in info:
            require(is_number(info[k], 0, _MAX_FLOAT), f"info.{k}", info[k], "a number >= 0")
    policy = info.get("policy")
    if policy is None:
        return
    require(isinstance(policy, dict), "info.policy", policy, "an object")
    for k, lo in _POLICY_INTS.items():
        v = policy.get(k)
        require(
            (v is None and k != "keep_best") or k not in policy or is_int(v, lo, 2**63),
            f"info.policy.{k}",
            v,
            f"an integer >= {lo}" + (" or null" if k != "keep_best" else ""),
        )
    if "mode" in policy:
        require(policy["mode"] in ("min", "max"), "info.policy.mode", policy["mode"], "min/max")
    if "metric" in policy:
        require(isinstance(policy["metric"], str), "info.policy.metric", policy["metric"], "text")


def _thin(raw: Any) -> Thin | None:
    if raw is None:
        return None
    require(
        isinstance(raw, dict)
        and isinstance(raw.get("full"), str)
        and _HEX32.fullmatch(raw["full"]) is not None
        and isinstance(raw.get("dropped"), list)
        and all(is_safe_name(n) for n in raw["dropped"]),
        "thin",
        raw,
        "an object with the full manifest's checksum and the dropped file names",
    )
    return Thin(raw["full"], tuple(raw["dropped"]))


def _metrics(raw: Any) -> dict[str, float]:
    """Finite numbers only: a NaN loss is not a metric retention can rank (nor is a number
    too large for a float)."""
    out = {}
    for k, v in dict(raw).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                f = float(v)
            except OverflowError:
                continue
            if math.isfinite(f):
                out[str(k)] = f
    return out


def _self_checksum(body: dict[str, Any]) -> str:
    h = new_hasher()
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint, for its manifest."""
    import safetensors
    import torch

    from safepoint import __version__

    versions = {
        "safepoint": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
    for name in ("transformers", "peft", "trl", "accelerate"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            versions[name] = str(module.__version__)
    return versions
