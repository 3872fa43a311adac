"""Pickle-free serialization: nested state as a JSON tree plus safetensors tensor files.

A state dict (a module's, an optimizer's: nested dicts with int keys, tuples, tensors,
scalars) is split into a JSON tree, where every tensor is replaced by a reference, and a
flat ``{name: tensor}`` dict written with the safetensors layout. Decoding is the exact
inverse. Nothing here can execute code from a file.
"""

from __future__ import annotations

import base64
import errno
import functools
import json
import math
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import xxhash

from safepoint.errors import ConfigError, CorruptCheckpointError

if TYPE_CHECKING:
    import torch

# torch and numpy are imported inside the functions that handle tensors: `safepoint ls`
# and `verify` read manifests and hash files only, and importing torch takes ~1 s.

CHECKSUM = "xxh3_128"
"""Checksum of every file. xxh3-128 hashes ~25 GB/s here (sha256 0.6 s/GB, blake2b
1.3 s/GB, crc32 0.3 s/GB: ``benchmarks/checksum.py``); it detects corruption, which is
its job. It is not a signature: whoever can rewrite a file can rewrite the manifest."""

_CHUNK = 64 << 20  # bytes per read call (and per on_chunk of a write): full disk speed

# Tags of encoded non-JSON values. A dict whose keys are not all plain strings, or that
# uses a tag as a key, is stored as a list of pairs so that no user data is misread.
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__", "__bytes__", "__dtype__")


@functools.cache
def _dtype_codes() -> dict[torch.dtype, str]:
    """safetensors dtype code of each torch dtype (built on first use: it imports torch)."""
    import torch

    codes = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
        torch.complex64: "C64",
    }
    for name, code in (
        ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e5m2", "F8_E5M2"),
        ("uint16", "U16"),
        ("uint32", "U32"),
        ("uint64", "U64"),
    ):
        if hasattr(torch, name):
            codes[getattr(torch, name)] = code
    return codes


def new_hasher() -> Any:
    """A fresh incremental hasher of the checkpoint checksum."""
    return xxhash.xxh3_128()


# --------------------------------------------------------------------------- JSON tree


def encode_tree(obj: Any, *, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into a JSON-able tree and the tensors it references.

    Tensors that share storage (tied weights) are stored once and referenced twice.
    Raises ``ConfigError`` naming the path of a value that has no pickle-free form.
    """
    import numpy as np
    import torch

    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}

    def tensor_ref(t: torch.Tensor, path: str) -> dict[str, str]:
        if t.layout != torch.strided:
            raise ConfigError(
                f"cannot save the {t.layout} tensor at {path!r}: "
                "convert it with .to_dense() before saving"
            )
        if t.dtype not in _dtype_codes():
            raise ConfigError(f"cannot save the {t.dtype} tensor at {path!r}: unsupported dtype")
        alias = (
            (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                tuple(t.stride()),
                t.dtype,
            )
            if t.device.type != "meta"
            else None
        )
        if alias is not None and alias in seen and t.numel() > 0:
            return {"__tensor__": seen[alias]}
        name = path
        n = 1
        while name in tensors:  # keys 1 and "1" in one dict: keep both
            n += 1
            name = f"{path}#{n}"
        tensors[name] = t.detach()
        if alias is not None:
            seen[alias] = name
        return {"__tensor__": name}

    def enc(x: Any, path: str) -> Any:
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, torch.Tensor):
            return tensor_ref(x, path)
        if isinstance(x, np.ndarray):
            return {
                "__ndarray__": x.dtype.str,
                "data": tensor_ref(torch.from_numpy(np.ascontiguousarray(x)), path)["__tensor__"],
            }
        if isinstance(x, np.generic):
            return enc(x.item(), path)
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        if isinstance(x, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(x)).decode("ascii")}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            plain = all(isinstance(k, str) and not k.startswith("__") for k in x)
            if plain:
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            return {
                "__dict__": [
                    [enc(k, path), enc(v, f"{path}.{k}" if path else str(k))] for k, v in x.items()
                ]
            }
        raise ConfigError(
            f"cannot save the {type(x).__name__} value at {path or '<root>'!r}: safepoint "
            "stores only tensors, arrays and JSON values (no pickle); convert it, or give "
            "its owner state_dict()/load_state_dict()"
        )

    return enc(obj, prefix), tensors


def decode_tree(tree: Any, tensors: Mapping[str, torch.Tensor], *, where: str = "") -> Any:
    """Inverse of ``encode_tree``. Raises ``CorruptCheckpointError`` on a bad tree."""
    import numpy as np
    import torch

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            name = x["__tensor__"]
            if name not in tensors:
                raise CorruptCheckpointError(f"{where}: tensor {name!r} is missing")
            return tensors[name]
        if "__tuple__" in x:
            return tuple(dec(v) for v in _expect(x["__tuple__"], list))
        if "__dict__" in x:
            pairs = _expect(x["__dict__"], list)
            return {_hashable(dec(_expect(p, list)[0])): dec(p[1]) for p in pairs}
        if "__ndarray__" in x:
            t = dec({"__tensor__": x.get("data")})
            return t.numpy().view(np.dtype(str(x["__ndarray__"]))).copy()
        if "__float__" in x:
            return float(x["__float__"])
        if "__dtype__" in x:
            dtype = getattr(torch, str(x["__dtype__"]), None)
            if not isinstance(dtype, torch.dtype):
                raise CorruptCheckpointError(f"{where}: unknown dtype {x['__dtype__']!r}")
            return dtype
        if "__bytes__" in x:
            return base64.b64decode(str(x["__bytes__"]))
        return {k: dec(v) for k, v in x.items()}

    try:
        return dec(tree)
    except (KeyError, IndexError, TypeError, ValueError, OverflowError) as e:
        if isinstance(e, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(f"{where}: malformed state tree ({e})") from e


def _expect(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, found {type(value).__name__}")
    return value


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    hash(key)
    return key


def dumps_json(obj: Any) -> bytes:
    """Stable, human-readable JSON bytes."""
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


MAX_JSON_DEPTH = 64
"""Deepest nesting accepted in any JSON document of a checkpoint. Ours nest at most ~10
levels (an optimizer's state); a hostile 900-deep document would otherwise overflow the
recursive decoders (RecursionError) long after parsing succeeded."""

MAX_JSON_INT = 2**64
"""Largest magnitude of an integer in a checkpoint's JSON (steps, sizes, RNG words)."""

_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_depth(data: bytes) -> int:
    """Deepest nesting of ``[``/``{`` in JSON text (strings skipped), scanned in C."""
    depth = deepest = 0
    for m in _JSON_TOKENS.finditer(data):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


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


def loads_json(data: bytes, *, where: str) -> Any:
    """Parse JSON, turning any failure into ``CorruptCheckpointError``.

    Bounded: nesting at most ``MAX_JSON_DEPTH``, integers below ``MAX_JSON_INT`` in
    magnitude, floats finite (no ``NaN``/``Infinity``, no ``1e400``), so that no value
    read from a checkpoint can overflow or recurse later.
    """
    if json_depth(data) > MAX_JSON_DEPTH:
        raise CorruptCheckpointError(
            f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels; refusing to read it"
        )
    try:
        return json.loads(
            data,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_no_constant,
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
            n = os.readv(fd, [view[got : got + _CHUNK]])
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


# ------------------------------------------------------------------------ safetensors


def _raw_bytes(t: torch.Tensor) -> memoryview:
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def safetensors_layout(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[str]]:
    """The safetensors header (length prefix included) and the order of tensor data.

    Same layout rules as the safetensors library: data sorted by alignment then name,
    header padded with spaces to 8 bytes, offsets contiguous from 0.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _dtype_codes()[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    return struct.pack("<Q", len(blob)) + blob, order


def write_safetensors(
    fd: int,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    on_chunk: Callable[[int], None] | None = None,
    direct: bool | None = None,
) -> tuple[int, str]:
    """Write a safetensors file to ``fd`` in one pass, hashing as it goes.

    Written by hand rather than with ``safetensors.torch.save_file`` so that the bytes
    are hashed while they are written (no second read) and no serialized copy of the
    whole file is built in memory. The bytes go to the disk with ``O_DIRECT`` where the
    file system allows it (``safepoint.directio``; ``direct=False``: page cache);
    ``fd`` is left at the end of the file, not fsync'd. Files load with the safetensors
    library (tested). Returns (size, checksum hex).
    """
    from safepoint.directio import FileStream

    head, order = safetensors_layout(tensors, metadata)
    hasher = new_hasher()
    stream = FileStream(fd, hasher, direct=direct)
    stream.write(memoryview(head))
    for name in order:
        for chunk in _chunks(_raw_bytes(tensors[name])):
            stream.write(chunk)
            if on_chunk is not None:
                on_chunk(stream.size)
    return stream.close(), hasher.hexdigest()


def _chunks(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


def write_all(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte is written (short writes happen on large buffers)."""
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


def read_safetensors(
    path: str | os.PathLike[str], *, size: int | None = None, checksum: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file (tensors and metadata): ``read_regular`` then
    ``parse_safetensors``. Raises ``CorruptCheckpointError``."""
    return parse_safetensors(
        read_regular(path, size=size, checksum=checksum), where=os.fsdecode(path)
    )


_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def parse_safetensors(
    buf: bytearray, *, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a safetensors file held in ``buf``, as views of ``buf`` (no copy).

    Parsed here rather than by the safetensors library because the library opens files
    by ``str`` path (a folder whose name is not UTF-8 could never be read) and would
    read the file a second time after it was hashed. Stricter than the library: the
    header is bounded JSON, every tensor has a known dtype, a shape whose byte size is
    its span, spans tile the data exactly with no gap or overlap, and each span is
    aligned for its dtype (our writer always aligns). Raises ``CorruptCheckpointError``.
    """
    import torch

    def bad(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: not a readable safetensors file ({problem})")

    if len(buf) < 8:
        raise bad("shorter than its 8-byte header length")
    (hlen,) = struct.unpack_from("<Q", buf, 0)
    if hlen > min(len(buf) - 8, _MAX_HEADER):
        raise bad(f"header length {hlen} is past the end of the file")
    try:
        header = loads_json(bytes(buf[8 : 8 + hlen]), where=where)
    except CorruptCheckpointError as e:
        raise bad(f"header: {e.__cause__ or e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ is not an object of strings")
    dtypes = {code: dtype for dtype, code in _dtype_codes().items()}
    start, spans = 8 + hlen, []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype = dtypes.get(entry.get("dtype"))  # type: ignore[arg-type]
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if dtype is None:
            raise bad(f"{name!r} has an unknown dtype {entry.get('dtype')!r}")
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
            raise bad(f"{name!r} has a malformed shape or data_offsets")
        begin, end = offsets
        itemsize = dtype.itemsize
        if math.prod(shape) * itemsize != end - begin or (start + begin) % itemsize:
            raise bad(f"{name!r}: shape {shape} does not match data_offsets {offsets}")
        spans.append((begin, end, name, dtype, shape))
    spans.sort(key=lambda s: (s[0], s[1]))
    position = 0
    for begin, end, name, *_ in spans:
        if begin != position:
            raise bad(f"{name!r} overlaps another tensor or leaves a gap")
        position = end
    if start + position != len(buf):
        raise bad(f"tensor data ends at byte {start + position}, the file at {len(buf)}")
    tensors = {}
    for begin, end, name, dtype, shape in spans:
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(
            buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin
        ).view(shape)
        if (
            dtype == torch.bool
            and torch.frombuffer(
                buf, dtype=torch.uint8, count=end - begin, offset=start + begin
            ).max()
            > 1
        ):
            raise bad(f"{name!r}: a bool tensor holds values other than 0 and 1")
        tensors[name] = t
    return tensors, meta


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


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
