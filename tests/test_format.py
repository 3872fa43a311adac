"""Pickle-free serialization: exact round trips and safetensors compatibility."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from safepoint.errors import ConfigError, CorruptCheckpointError
from safepoint.fileio import hash_file, is_safe_name
from safepoint.format import decode_tree, encode_tree, read_safetensors, write_safetensors


def roundtrip(obj):
    tree, tensors = encode_tree(obj)
    return decode_tree(tree, tensors)


def assert_same(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


def trained_optimizer(kind: str) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opts = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True),
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        "adam-groups": lambda p: torch.optim.Adam(
            [{"params": list(p)[:2]}, {"params": [], "lr": 0.5}], lr=1e-2, betas=(0.8, 0.9)
        ),
    }
    opt = opts[kind](model.parameters())
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("kind", ["adamw", "sgd", "adam-groups"])
def test_optimizer_state_dict_roundtrips_exactly(kind: str) -> None:
    sd = trained_optimizer(kind).state_dict()
    assert_same(sd, roundtrip(sd))


@pytest.mark.parametrize(
    "value",
    [
        {1: "int key", "1": "str key", (2, 3): "tuple key"},
        {"__tensor__": "a user key that looks like a tag"},
        (1, 2.5, None, True, "x", [3, (4,)]),
        {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")},
        {"dtype": torch.bfloat16, "bytes": b"\x00\xff"},
        {"arr": np.arange(7, dtype=np.int16), "u32": np.array([1, 2**31], dtype=np.uint32)},
        {
            "bf16": torch.randn(3, 2).to(torch.bfloat16),
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 4),
            "bool": torch.tensor([True, False]),
            "i8": torch.tensor([-1, 2], dtype=torch.int8),
        },
    ],
)
def test_values_roundtrip_exactly(value) -> None:
    assert_same(value, roundtrip(value))


def test_tied_tensors_are_stored_once_and_stay_tied() -> None:
    w = torch.randn(10, 4)
    tree, tensors = encode_tree({"embed": w, "head": w, "other": w.clone()})
    assert len(tensors) == 2
    out = decode_tree(tree, tensors)
    assert out["embed"] is out["head"]


def test_views_of_one_storage_are_kept_apart() -> None:
    base = torch.arange(12.0)
    value = {"a": base[:6], "b": base[6:], "t": base.view(3, 4).t()}
    assert_same(value, roundtrip(value))


@pytest.mark.parametrize("bad", [object(), {1, 2}, torch.nn.Linear(2, 2), lambda: 0])
def test_values_without_a_safe_form_are_refused_with_their_path(bad) -> None:
    with pytest.raises(ConfigError, match=r"'outer\.inner'"):
        encode_tree({"outer": {"inner": bad}})


def test_sparse_tensors_get_a_hint() -> None:
    with pytest.raises(ConfigError, match="to_dense"):
        encode_tree({"s": torch.eye(3).to_sparse()})


def test_written_file_is_standard_safetensors(tmp_path) -> None:
    tensors = {
        "w": torch.randn(64, 33),
        "b16": torch.randn(5).to(torch.bfloat16),
        "half": torch.randn(2, 2).half(),
        "i64": torch.arange(5),
        "u8": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "flag": torch.tensor(True),
        "t": torch.randn(4, 6).t(),  # non-contiguous
    }
    path = tmp_path / "x.safetensors"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    size, digest = write_safetensors(fd, tensors, {"note": "hi"})
    os.close(fd)
    assert (size, digest) == hash_file(path)
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t), k
    _, meta = read_safetensors(path)
    assert meta == {"note": "hi"}


def test_unreadable_safetensors_is_corrupt(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptCheckpointError, match="not a readable safetensors"):
        read_safetensors(path)


@pytest.mark.parametrize(
    "tree", [{"__tensor__": "missing"}, {"__dict__": 5}, {"__tuple__": {}}, {"__dtype__": "os"}]
)
def test_malformed_trees_are_corrupt_not_crashes(tree) -> None:
    with pytest.raises(CorruptCheckpointError):
        decode_tree(tree, {})


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("model.safetensors", True),
        ("state.json", True),
        ("../x", False),
        ("/etc/passwd", False),
        ("a/b", False),
        (".hidden", False),
        ("", False),
        ("..", False),
        (3, False),
    ],
)
def test_safe_names(name, ok) -> None:
    assert is_safe_name(name) is ok


@pytest.mark.parametrize("keys", [[0, 0], [1, True], [3, 3.0]], ids=["same", "bool", "float"])
def test_a_dict_holding_a_key_twice_is_corrupt(keys: list[object]) -> None:
    # Decoded silently, the second pair would replace the first: an optimizer's state for
    # one parameter vanishes, or moves to another (found by the Trainer fuzz test).
    tree = {"__dict__": [[k, {"__tuple__": [i]}] for i, k in enumerate(keys)]}
    with pytest.raises(CorruptCheckpointError, match="appears twice"):
        decode_tree(tree, {})
