"""Pickle-free serialization: nested state as a JSON tree plus safetensors tensor files.

A state dict (a module's, an optimizer's: nested dicts with int keys, tuples, tensors,
scalars) is split into a JSON tree, where every tensor is replaced by a reference, and a
flat ``{name: tensor}`` dict written with the safetensors layout. Decoding is the exact
inverse. Nothing here can execute code from a file.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from safepoint.errors import ConfigError, CorruptCheckpointError
from safepoint.fileio import (
    CHUNK_BYTES,
    loads_json,
    new_hasher,
    read_regular,
)

if TYPE_CHECKING:
    import torch

# torch and numpy are imported inside the functions that handle tensors: `safepoint ls`
# and `verify` read manifests and hash files only, and importing torch takes ~1 s.

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


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of ``dtype`` (``F32``); ``ConfigError`` if it has none."""
    code = _dtype_codes().get(dtype)
    if code is None:
        raise ConfigError(f"cannot save a {dtype} tensor: unsupported dtype")
    return code


def dtype_of(code: str, *, where: str) -> torch.dtype:
    """The dtype of safetensors code ``code``; ``CorruptCheckpointError`` if unknown."""
    for dtype, known in _dtype_codes().items():
        if known == code:
            return dtype
    raise CorruptCheckpointError(f"{where}: unknown dtype {code!r}")


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
        # A DTensor (sharded over ranks) has no storage of its own: its local piece does.
        base = t.to_local() if hasattr(t, "device_mesh") and hasattr(t, "to_local") else t
        alias = (
            (
                base.untyped_storage().data_ptr(),
                base.storage_offset(),
                tuple(t.shape),
                tuple(base.stride()),
                t.dtype,
            )
            if base.device.type != "meta"
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
            out: dict[Any, Any] = {}
            for pair in _expect(x["__dict__"], list):
                key = _hashable(dec(_expect(pair, list)[0]))
                if key in out:  # a dict never holds a key twice (True and 1 are one key)
                    raise CorruptCheckpointError(f"{where}: the key {key!r} appears twice")
                out[key] = dec(pair[1])
            return out
        if "__ndarray__" in x:
            t = dec({"__tensor__": x.get("data")})
            dtype = np.dtype(str(x["__ndarray__"]))
            if dtype.kind not in "biufc":  # numbers only: never objects, never structs
                raise ValueError(f"array dtype {x['__ndarray__']!r}")
            return t.numpy().view(dtype).copy()
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
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, RuntimeError) as e:
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
    image: Any = None,
) -> tuple[int, str]:
    """Write a safetensors file to ``fd`` in one pass, hashing as it goes.

    Written by hand rather than with ``safetensors.torch.save_file`` so that the bytes
    are hashed while they are written (no second read) and no serialized copy of the
    whole file is built in memory. The bytes of a large file go to the disk with
    ``O_DIRECT`` where the file system allows it (``safepoint.directio.wants_direct``;
    ``direct=True``/``False``: always / page cache);
    ``fd`` is left at the end of the file, not fsync'd. Files load with the safetensors
    library (tested). ``image``: a ``staging.FileImage`` that ``tensors`` are views of,
    written as it lies (no copy). Returns (size, checksum hex).
    """
    from safepoint.directio import FileStream, wants_direct, write_image

    hasher = new_hasher()
    if image is not None:
        size = write_image(fd, image.data(), image.size, hasher, on_chunk=on_chunk, direct=direct)
        return size, hasher.hexdigest()
    head, order = safetensors_layout(tensors, metadata)
    total = len(head) + sum(t.numel() * t.element_size() for t in tensors.values())
    stream = FileStream(fd, hasher, direct=wants_direct(total, direct))
    stream.write(memoryview(head))
    for name in order:
        for chunk in _chunks(_raw_bytes(tensors[name])):
            stream.write(chunk)
            if on_chunk is not None:
                on_chunk(stream.size)
    return stream.close(), hasher.hexdigest()


def _chunks(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(view), CHUNK_BYTES):
        yield view[start : start + CHUNK_BYTES]


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
        # A zero-size tensor passes the byte check whatever its other dimensions: bound
        # them, or torch.empty overflows (a TypeError or RuntimeError, not a report).
        if len(shape) > _MAX_DIMS or math.prod(d for d in shape if d) >= _MAX_ELEMENTS:
            raise bad(f"{name!r} has an impossible shape {shape[:_MAX_DIMS]}")
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
    try:
        return _views(buf, start, spans, bad), meta
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:  # torch's own checks
        raise bad(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


_MAX_DIMS = 32
_MAX_ELEMENTS = 2**62  # torch sizes are int64; any real tensor is far below


def _views(
    buf: bytearray, start: int, spans: list[Any], bad: Callable[[str], Exception]
) -> dict[str, torch.Tensor]:
    import torch

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
    return tensors


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )
