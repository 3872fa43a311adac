"""Fuzzing the readers of untrusted checkpoint files (manifest, state.json, safetensors).

Whatever the bytes: the readers return or raise a ``SafepointError``, never anything
else, never hang (pytest-timeout and hypothesis deadlines), and never open a file
outside the checkpoint folder (an audit hook records every ``open`` and listing).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safepoint.errors import SafepointError
from safepoint.format import decode_tree, read_safetensors
from safepoint.manifest import MANIFEST_NAME, Manifest, _self_checksum
from safepoint.restore import apply, read_state_doc
from safepoint.rng import capture_rng, restore_rng
from safepoint.snapshot import STATE_NAME, capture
from safepoint.store import Store
from safepoint.validity import inspect

FUZZ = settings(
    max_examples=150,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TAGS = ["__tensor__", "__tuple__", "__dict__", "__ndarray__", "__bytes__", "__dtype__", "__float__"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["float32", "O", "<f4", "|V8", "nan", "inf", "AAAA", "model", "t"])
)
keys = st.text(max_size=8) | st.sampled_from([*TAGS, "data", "file", "kind", "tree", "t"])
trees = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=25,
)


# ------------------------------------------------------------------ the audit hook

_opened: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _opened is not None and event in ("open", "os.listdir", "os.scandir") and args:
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            _opened.append(os.fsdecode(path))


sys.addaudithook(_audit)  # cannot be removed: it records only inside ``confined``


@contextmanager
def confined(folder: Path) -> Iterator[None]:
    """Fail if the body opens or lists anything outside ``folder`` (Python's own module
    files aside)."""
    global _opened
    _opened = []
    try:
        yield
    finally:
        seen, _opened = _opened, None
    root = os.path.realpath(folder)
    outside = [
        p
        for p in seen
        if not os.path.realpath(p).startswith(root)
        and not p.endswith((".py", ".pyc", ".so"))
        and not os.path.realpath(p).startswith(sys.prefix)
    ]
    assert not outside, f"opened outside the checkpoint: {outside}"


def only_safepoint_errors(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except SafepointError:
        return None


# ----------------------------------------------------------------------- manifest


@FUZZ
@given(st.binary(max_size=400))
def test_manifest_from_arbitrary_bytes(data: bytes) -> None:
    only_safepoint_errors(Manifest.from_json, data, where="fuzz")


entries = (
    st.fixed_dictionaries({"size": scalars, "xxh3_128": scalars}, optional={"extra": scalars})
    | trees
)
manifest_bodies = st.fixed_dictionaries(
    {
        "format": st.just("safepoint"),
        "version": st.sampled_from([1, 0, -1, 2, True, "1", None]),
        "checksum": st.just("xxh3_128") | scalars,
        "files": st.dictionaries(
            st.text(max_size=12) | st.sampled_from(["../x", "/etc/passwd", ".hidden", "a"]),
            entries,
            max_size=3,
        )
        | trees,
        "step": st.integers(min_value=-3, max_value=2**64) | scalars,
    },
    optional={
        "created": scalars,
        "reason": trees,
        "metrics": trees,
        "fingerprint": trees,
        "versions": trees,
        "info": trees,
    },
)


@FUZZ
@given(manifest_bodies)
def test_signed_manifests_never_crash_the_reader_or_inspect(body: dict[str, Any]) -> None:
    body["manifest_checksum"] = _self_checksum(body)  # as an attacker would
    data = json.dumps(body).encode()
    only_safepoint_errors(Manifest.from_json, data, where="fuzz")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run" / "checkpoint-3"
        folder.mkdir(parents=True)
        (folder / MANIFEST_NAME).write_bytes(data)
        with confined(folder.parent):
            info = inspect(folder, deep=True)  # never raises: it reports
            Store(folder.parent).scan()
        assert info.status in ("valid", "corrupt", "foreign", "incomplete")


# ------------------------------------------------------------------- state trees


@FUZZ
@given(trees)
def test_decode_tree_with_arbitrary_trees(tree: Any) -> None:
    only_safepoint_errors(decode_tree, tree, {"t": torch.arange(4, dtype=torch.uint8)}, where="f")


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "extra": {"a": 1}, "w": torch.zeros(2)}


state_entries = (
    st.fixed_dictionaries(
        {
            "kind": st.sampled_from(["stateful", "value", "other"]) | scalars,
            "tree": trees,
            "file": st.sampled_from([None, "model.safetensors", "../x", "/etc/hosts", "nope"])
            | scalars,
        }
    )
    | trees
)
state_docs = st.fixed_dictionaries(
    {
        "version": st.sampled_from([1, 0, 2, None, "1"]),
        "entries": st.dictionaries(
            st.sampled_from(["model", "optimizer", "extra", "w", "zzz"]), state_entries, max_size=4
        )
        | trees,
    },
    optional={"rng": trees, "progress": trees, "step": scalars},
)


@FUZZ
@given(state_docs)
def test_state_readers_raise_only_safepoint_errors_and_stay_in_the_folder(doc: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint-1"
        folder.mkdir()
        snap = capture(_state(), step=1, copy=True, rng=False)
        model_file = snap.files["model.safetensors"]
        from safetensors.torch import save_file

        save_file(dict(model_file.tensors), str(folder / "model.safetensors"))
        (folder / STATE_NAME).write_text(json.dumps(doc))
        entries = doc.get("entries") if isinstance(doc, dict) else None
        # the keys the checkpoint claims, so that the loaders are reached
        state = {k: v for k, v in _state().items() if isinstance(entries, dict) and k in entries}
        rng = capture_rng()
        with confined(folder):
            only_safepoint_errors(read_state_doc, folder)
            only_safepoint_errors(apply, folder, state, rng=True)
        restore_rng(rng)


# --------------------------------------------------------------------- safetensors

tensor_headers = st.dictionaries(
    st.text(max_size=6),
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "U8", "X"]) | scalars,
            "shape": st.lists(st.integers(min_value=-2, max_value=2**40), max_size=3) | scalars,
            "data_offsets": st.lists(st.integers(min_value=-4, max_value=2**33), max_size=3)
            | scalars,
        }
    )
    | trees,
    max_size=3,
)


@FUZZ
@given(tensor_headers, st.binary(max_size=64), st.integers(min_value=-8, max_value=8))
def test_read_safetensors_with_arbitrary_headers(header: Any, data: bytes, skew: int) -> None:
    blob = json.dumps(header).encode()
    raw = struct.pack("<Q", max(len(blob) + skew, 0)) + blob + data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw)
        only_safepoint_errors(read_safetensors, path)


@pytest.mark.slow
@settings(max_examples=3000, deadline=5000, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=2000))
def test_read_safetensors_with_arbitrary_bytes_long(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw)
        only_safepoint_errors(read_safetensors, path)
