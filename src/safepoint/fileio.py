"""Checkpoint file io: checksums, bounded JSON, regular files read without following links."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from itertools import accumulate
from typing import Any

import xxhash

from safepoint.errors import CorruptCheckpointError

CHECKSUM = "xxh3_128"
"""Checksum of every file. xxh3-128 hashes ~25 GB/s here (sha256 0.6 s/GB, blake2b
1.3 s/GB, crc32 0.3 s/GB: ``benchmarks/checksum.py``); it detects corruption, which is
its job. It is not a signature: whoever can rewrite a file can rewrite the manifest."""

CHUNK_BYTES = 64 << 20  # bytes per read call (and per on_chunk of a write): full disk speed


def new_hasher() -> Any:
    """A fresh incremental hasher of the checkpoint checksum."""
    return xxhash.xxh3_128()


# ---------------------------------------------------------------------------- JSON


def dumps_json(obj: Any, *, indent: int | None = None) -> bytes:
    """Stable JSON bytes (sorted keys, no NaN): compact by default, because only then
    does ``json`` use its C encoder (``state.json`` with ``indent=1`` took 1.5 ms of a
    LoRA save's 2.3 ms stall); ``indent`` for documents people read (the manifest)."""
    separators = None if indent is not None else (",", ":")
    text = json.dumps(obj, indent=indent, separators=separators, sort_keys=True, allow_nan=False)
    return (text + "\n").encode()


MAX_JSON_DEPTH = 64
"""Deepest nesting accepted in any JSON document of a checkpoint. Ours nest at most ~10
levels (an optimizer's state); a hostile 900-deep document would otherwise overflow the
recursive decoders (RecursionError) long after parsing succeeded."""

MAX_JSON_INT = 2**64
"""Largest magnitude of an integer in a checkpoint's JSON (steps, sizes, RNG words)."""

_JSON_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(data: bytes) -> int:
    """Deepest nesting of ``[``/``{`` in JSON text (strings skipped), scanned in C: the
    strings are cut out, every other byte but brackets deleted, the depths summed up
    (3x faster than a token loop on a 2,000-step ``trainer_state.json``)."""
    brackets = _JSON_STRINGS.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(0, max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0))


def _bounded_int(text: str) -> int:
    # len first: int() of a 4000-digit string is slow and then refused anyway
    if len(text) > 21 or abs(value := int(text)) >= MAX_JSON_INT:
        raise ValueError(f"integer {text[:24]}... is out of range")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_json(data: bytes, *, where: str, nonfinite: bool = False) -> Any:
    """Parse JSON, turning any failure into ``CorruptCheckpointError``.

    Bounded: nesting at most ``MAX_JSON_DEPTH``, integers below ``MAX_JSON_INT`` in
    magnitude, floats finite (no ``NaN``/``Infinity``, no ``1e400``), so that no value
    read from a checkpoint can overflow or recurse later. ``nonfinite``: a document that
    Python's ``json`` wrote for another program (the Trainer's ``trainer_state.json``
    logs ``grad_norm`` inf) may hold ``NaN`` and ``Infinity``; they are read as floats.
    """
    # No deeper than its number of opening brackets: a manifest's few skip the scan.
    opening = data.count(b"[") + data.count(b"{")
    if opening > MAX_JSON_DEPTH and json_depth(data) > MAX_JSON_DEPTH:
        raise CorruptCheckpointError(
            f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels; refusing to read it"
        )
    try:
        return json.loads(
            data,
            parse_int=_bounded_int,
            parse_float=float if nonfinite else _finite_float,
            parse_constant=float if nonfinite else _no_constant,
        )
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{where}: not valid JSON ({e})") from e


# ------------------------------------------------------------------- reading files


def open_regular(
    path: str | os.PathLike[str],
    *,
    flags: int = os.O_RDONLY,
    mode: int = 0o644,
    size: int | None = None,
    max_size: int | None = None,
    error: type[Exception] = CorruptCheckpointError,
) -> tuple[int, os.stat_result]:
    """Open ``path`` as a regular file and return (fd, fstat of the open fd).

    Never follows a symlink (``O_NOFOLLOW``), never blocks on a FIFO (``O_NONBLOCK`` for
    the open, cleared after), and checks what was opened, not what a path pointed to a
    moment before: the fd must be a regular file, of ``size`` bytes if given, at most
    ``max_size`` if given. Any other outcome raises ``error`` naming the file and the
    problem; the caller owns the returned fd.
    """
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(
                f"{os.fsdecode(path)} is a symlink; safepoint never follows links here: "
                "remove it (or replace it with the real file)"
            ) from None
        if e.errno == errno.ENXIO:  # write-only open of a FIFO nobody reads
            raise error(f"{os.fsdecode(path)} is a FIFO, not a regular file: remove it") from None
        raise
    try:
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = f"is a {_kind(st.st_mode)}, not a regular file: remove it"
        elif size is not None and st.st_size != size:
            problem = f"has {st.st_size} bytes, {size} expected"
        elif max_size is not None and st.st_size > max_size:
            problem = f"has {st.st_size} bytes, more than the {max_size} a sane one has"
        if problem:
            raise error(f"{os.fsdecode(path)} {problem}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return name
    return "special file"


def read_regular(
    path: str | os.PathLike[str],
    *,
    size: int | None = None,
    max_size: int | None = None,
    checksum: str | None = None,
) -> bytearray:
    """The whole content of a regular file inside a checkpoint, read from one fd.

    ``size``/``max_size`` are checked on the open fd before reading (a FIFO, a link to
    ``/dev/zero`` or a huge file is refused, not read); with ``checksum`` the very bytes
    returned are hashed, so what is loaded is what was verified. Reading by fd also works
    for paths that are not valid UTF-8. Raises ``CorruptCheckpointError``.
    """
    where = os.fsdecode(path)
    try:
        fd, st = open_regular(path, size=size, max_size=max_size)
    except OSError as e:
        raise CorruptCheckpointError(f"{where}: cannot open ({e.strerror})") from e
    buf = bytearray(st.st_size)
    view = memoryview(buf)
    hasher = new_hasher() if checksum is not None else None
    got = 0
    try:
        while got < len(buf):
            n = os.readv(fd, [view[got : got + CHUNK_BYTES]])
            if n == 0:
                break
            if hasher is not None:
                hasher.update(view[got : got + n])
            got += n
    except OSError as e:
        raise CorruptCheckpointError(f"{where}: cannot read ({e.strerror})") from e
    finally:
        view.release()
        os.close(fd)
    if got != len(buf):
        raise CorruptCheckpointError(f"{where}: shrank while being read ({got} of {len(buf)})")
    if hasher is not None and hasher.hexdigest() != checksum:
        raise CorruptCheckpointError(
            f"{where}: checksum expected {checksum}, found {hasher.hexdigest()}"
        )
    return buf


def write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte is written (short writes happen on large buffers)."""
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


def hash_file(path: str | os.PathLike[str], *, buffer_size: int = 8 << 20) -> tuple[int, str]:
    """(size, checksum) of a regular file, read in chunks. A symlink, a FIFO or any other
    special file is refused with ``CorruptCheckpointError`` (never followed, never
    blocked on); other failures raise ``OSError``."""
    hasher = new_hasher()
    size = 0
    view = memoryview(bytearray(buffer_size))
    fd, _ = open_regular(path)
    with os.fdopen(fd, "rb", buffering=0) as f:
        while n := f.readinto(view):
            hasher.update(view[:n])
            size += n
    return size, hasher.hexdigest()


SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}")


def is_safe_name(name: object) -> bool:
    """A plain file name inside a checkpoint folder: no separators, no ``..``, no dotfile."""
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None and ".." not in name
