"""Sharded tensors (DTensor: FSDP2, tensor parallel): which rank writes which piece, the
index of pieces (``shards.json``), and any slice read back from the pieces.

A state whose tensors are DTensors is saved by every rank at once: each rank writes the
pieces it holds into its own file (``model.shard-00001-of-00004.safetensors``), a piece
held by several ranks (a replicated mesh dimension) is written once, by the first of
them, and a plain tensor (every rank holds the same copy: the optimizer's ``step``) is
written by rank 0. ``shards.json``, written by rank 0 once every rank's files are
durable, says for every tensor its global shape and dtype and, for each piece, the file
that holds it, where it starts and its shape. The pieces of a tensor tile it exactly
(checked before anything is read), so any box of it, the slice a rank of another world
size needs, is read from the pieces that overlap the box.

No torch at module level: ``safepoint ls`` and ``verify`` check the index without it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safepoint.errors import ConfigError, CorruptCheckpointError
from safepoint.fileio import loads_json
from safepoint.schema import SHARDS_NAME

if TYPE_CHECKING:
    import torch

__all__ = ["SHARDS_NAME", "Piece", "ShardedTensor", "assemble", "build_index", "parse_index"]

SHARDS_VERSION = 1
_MAX_DIMS = 64
_MAX_PIECES = 1 << 16  # pieces of one tensor: one per rank at most


def shard_file(key: str, rank: int, world_size: int) -> str:
    """The file in which ``rank`` writes its pieces of the state entry ``key``."""
    return f"{key}.shard-{rank + 1:05d}-of-{world_size:05d}.safetensors"


@functools.cache
def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """True for a DTensor (a tensor whose data is spread over ranks). Called for every
    tensor of every save: the class is looked up once."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def _box(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, shape) of the local piece of DTensor ``t`` in the global tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(offset), tuple(shape)


def _first_replica(t: Any) -> bool:
    """Whether this rank holds the first copy of its piece (coordinate 0 along every
    mesh dimension on which ``t`` is replicated or partial)."""
    from torch.distributed.tensor import Partial, Shard

    if any(isinstance(p, Partial) for p in t.placements):
        raise ConfigError(
            f"cannot save a DTensor with a Partial placement ({t.placements}): its local "
            "values are unreduced parts; redistribute it to Shard or Replicate first"
        )
    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh
        return False
    placements = zip(t.placements, coordinate, strict=True)
    return all(isinstance(p, Shard) or c == 0 for p, c in placements)


def local_pieces(
    tensors: Mapping[str, torch.Tensor], *, rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """What ``rank`` writes of ``tensors`` (an entry's tensors, DTensors among them):
    ``{name: local tensor}`` and ``{name: {"shape", "dtype", "offset"}}`` for each piece
    (global shape; offset of the piece in it). Every name appears in the layout of rank
    0, even when another rank holds its only piece, so rank 0 knows every tensor."""
    from safepoint.format import dtype_code

    local: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        spec: dict[str, Any] = {"shape": list(t.shape), "dtype": dtype_code(t.dtype)}
        if is_sharded(t):
            offset, shape = _box(t)
            piece = t.to_local() if _first_replica(t) and math.prod(shape) > 0 else None
            if piece is not None and tuple(piece.shape) != shape:
                # Uneven sharding with padding: the piece is the first `shape` elements.
                piece = piece[tuple(slice(0, n) for n in shape)]
        else:
            offset, piece = (0,) * t.dim(), t if rank == 0 else None
        if piece is not None:
            local[name] = piece
            spec |= {"offset": list(offset), "local_shape": list(piece.shape)}
        if piece is not None or rank == 0:
            layout[name] = spec
    return local, layout


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class Piece:
    """One stored piece of a tensor: the file holding it (under the tensor's name)."""

    file: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardedTensor:
    """A tensor saved in pieces: global shape, dtype code, and the pieces tiling it."""

    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]


def build_index(
    world_size: int, layouts: list[dict[str, dict[str, dict[str, Any]]]]
) -> dict[str, Any]:
    """``shards.json`` from every rank's ``{entry: {name: spec}}`` (rank order)."""
    entries: dict[str, dict[str, Any]] = {}
    for rank, layout in enumerate(layouts):
        for key, names in layout.items():
            tensors = entries.setdefault(key, {})
            for name, spec in names.items():
                t = tensors.setdefault(
                    name, {"shape": spec["shape"], "dtype": spec["dtype"], "pieces": []}
                )
                if "offset" in spec:
                    t["pieces"].append(
                        {
                            "file": shard_file(key, rank, world_size),
                            "offset": spec["offset"],
                            "shape": spec["local_shape"],
                        }
                    )
    return {"version": SHARDS_VERSION, "world_size": world_size, "entries": entries}


def parse_index(
    data: bytes, *, files: Collection[str], where: str
) -> dict[str, dict[str, ShardedTensor]]:
    """The checked index ``{entry: {name: ShardedTensor}}`` of a ``shards.json``.

    Every piece lies in a file the manifest lists (``files``), inside the tensor, and
    the pieces of a tensor tile it exactly: no gap, no overlap. Raises
    ``CorruptCheckpointError`` naming the first problem."""

    def bad(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: {problem}")

    doc = loads_json(data, where=where)
    if not isinstance(doc, dict) or doc.get("version") != SHARDS_VERSION:
        raise bad(f"not a version {SHARDS_VERSION} shard index")
    world = doc.get("world_size")
    if not _count(world, 1, 1 << 20):
        raise bad(f"world_size {world!r} is not a process count")
    entries = doc.get("entries")
    if not isinstance(entries, dict):
        raise bad("entries is not an object")
    out: dict[str, dict[str, ShardedTensor]] = {}
    for key, tensors in entries.items():
        if not isinstance(tensors, dict):
            raise bad(f"entries.{key} is not an object")
        out[key] = {}
        for name, spec in tensors.items():
            field = f"entries.{key}.{name}"
            if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str):
                raise bad(f"{field} has no dtype")
            shape = _dims(spec.get("shape"))
            raw = spec.get("pieces")
            if shape is None:
                raise bad(f"{field}.shape is not a list of sizes")
            if not isinstance(raw, list) or len(raw) > _MAX_PIECES:
                raise bad(f"{field}.pieces is not a list of pieces")
            pieces = []
            for i, p in enumerate(raw):
                offset = _dims(p.get("offset")) if isinstance(p, dict) else None
                size = _dims(p.get("shape")) if isinstance(p, dict) else None
                file = p.get("file") if isinstance(p, dict) else None
                if offset is None or size is None or file not in files:
                    raise bad(f"{field}.pieces[{i}] is malformed or names an unlisted file")
                if (
                    len(offset) != len(shape)
                    or len(size) != len(shape)
                    or any(o + n > d for o, n, d in zip(offset, size, shape, strict=True))
                ):
                    raise bad(f"{field}.pieces[{i}] lies outside the tensor {list(shape)}")
                pieces.append(Piece(str(file), offset, size))
            _check_tiling(pieces, shape, bad, field)
            out[key][name] = ShardedTensor(shape, spec["dtype"], tuple(pieces))
    return out


def _check_tiling(
    pieces: list[Piece], shape: tuple[int, ...], bad: Callable[[str], Exception], field: str
) -> None:
    covered = sum(math.prod(p.shape) for p in pieces)
    if covered != math.prod(shape):
        raise bad(f"{field}: its pieces hold {covered} elements, the tensor {math.prod(shape)}")
    solid = [p for p in pieces if math.prod(p.shape)]
    for i, a in enumerate(solid):
        for b in solid[i + 1 :]:
            if _overlap(a.offset, a.shape, b.offset, b.shape) is not None:
                raise bad(f"{field}: two pieces overlap")


def _count(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _dims(value: object) -> tuple[int, ...] | None:
    if not isinstance(value, list) or len(value) > _MAX_DIMS:
        return None
    if not all(_count(v, 0, 1 << 62) for v in value):
        return None
    return tuple(value)  # type: ignore[arg-type]


Box = tuple[int, ...]


def _overlap(a_off: Box, a_shape: Box, b_off: Box, b_shape: Box) -> tuple[Box, Box] | None:
    """The intersection (offset, shape) of two boxes, or None when empty."""
    lo = tuple(max(a, b) for a, b in zip(a_off, b_off, strict=True))
    hi = tuple(min(a + n, b + m) for a, n, b, m in zip(a_off, a_shape, b_off, b_shape, strict=True))
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi, strict=True))


# ---------------------------------------------------------------------------- reading


def target_box(live: Any, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box of the global tensor this rank needs: its local piece when ``live`` is a
    DTensor of that shape, else the whole tensor."""
    if is_sharded(live) and tuple(live.shape) == shape:
        return _box(live)
    return (0,) * len(shape), shape


def assemble(
    name: str,
    spec: ShardedTensor,
    box: tuple[tuple[int, ...], tuple[int, ...]],
    read: Callable[[str], Mapping[str, torch.Tensor]],
    *,
    where: str,
) -> torch.Tensor:
    """The ``box`` (offset, shape) of tensor ``name``, copied from the pieces that
    overlap it; ``read(file)`` gives a file's tensors (checked against the manifest)."""
    import torch

    from safepoint.format import dtype_of

    dtype = dtype_of(spec.dtype, where=where)
    offset, shape = box
    out = torch.empty(shape, dtype=dtype)
    for piece in spec.pieces:
        common = _overlap(offset, shape, piece.offset, piece.shape)
        if common is None:
            continue
        stored = read(piece.file).get(name)
        if stored is None or tuple(stored.shape) != piece.shape or stored.dtype != dtype:
            raise CorruptCheckpointError(
                f"{where}: {piece.file} does not hold the piece of {name!r} the index lists"
            )
        at, size = common
        src = tuple(slice(a - p, a - p + n) for a, p, n in zip(at, piece.offset, size, strict=True))
        dst = tuple(slice(a - o, a - o + n) for a, o, n in zip(at, offset, size, strict=True))
        out[dst] = stored[src]
    return out


def like(live: Any, local: torch.Tensor) -> Any:
    """``local`` (this rank's box) as a tensor that loads into ``live``: a DTensor with
    ``live``'s mesh and placements when ``live`` is one, else ``local`` itself."""
    if not is_sharded(live):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local.to(live.device),
        live.device_mesh,
        live.placements,
        shape=live.shape,
        stride=live.stride(),
        run_check=False,
    )
