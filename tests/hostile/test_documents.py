"""#17 defects 6 and 7: hostile numbers, nesting and kinds in the manifest and
``state.json`` make that checkpoint corrupt (ls and verify say why) and resume falls back
to the older valid one; a checkpoint that does not fit the live objects is never applied
in part."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from safepoint import Checkpointer, IncompatibleCheckpointError

from .helpers import body, check_entry_points, edit_state, make_run, sign, small_state

pytestmark = pytest.mark.timeout(300)


def _manifest(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def do(ck: Path) -> None:
        doc = body(ck)
        change(doc)
        sign(ck, doc)

    return do


def _state(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return lambda ck: edit_state(ck, change)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            doc = doc[int(p)] if isinstance(doc, list) else doc[p]
        if isinstance(doc, list):
            doc[int(last)] = value
        else:
            doc[last] = value

    return change


def _nested(depth: int) -> Callable[[dict[str, Any]], bytes]:
    def change(doc: dict[str, Any]) -> bytes:
        deep = "[" * depth + "]" * depth
        return json.dumps(doc).replace('"progress": {}', f'"progress": {{"x": {deep}}}').encode()

    return change


HOSTILE = {
    "metric 10**400": (_manifest(_set("metrics", {"loss": 10**400})), "out of range"),
    "created 1e300": (_manifest(_set("created", 1e300)), "created is 1e+300"),
    "created NaN": (_manifest(_set("created", float("nan"))), "NaN is not a JSON number"),
    "created -1e18": (_manifest(_set("created", -1e18)), "created is -1e+18"),
    "policy keep_last 2.5": (
        _manifest(_set("info.policy.keep_last", 2.5)),
        "info.policy.keep_last is 2.5",
    ),
    "state.json 900 deep": (_state(_nested(900)), "nested deeper than 64"),
    "rng numpy key -1": (_state(_set("rng.numpy.keys.0", -1)), "rng.numpy.keys"),
    "rng python word 2**70": (_state(_set("rng.python.state.3", 2**70)), "out of range"),
    "rng torch state short": (_state(_set("rng.torch", "AAAA")), "rng.torch is '3 bytes'"),
    "entry kind unknown": (_state(_set("entries.model.kind", "pickle")), "entries.model.kind"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_values_make_the_checkpoint_corrupt(tmp_path: Path, name: str, caplog) -> None:
    do, reason = HOSTILE[name]
    make_run(tmp_path)
    do(tmp_path / "checkpoint-9")
    check_entry_points(tmp_path, "checkpoint-9", reason, caplog=caplog)


# ------------------------------------------------------------- does not fit (defect 7)


def _retensor(ck: Path, file: str, name: str, tensor: torch.Tensor) -> None:
    tensors = load_file(str(ck / file))
    tensors[name] = tensor
    save_file(tensors, str(ck / file))
    sign(ck, body(ck))


def _optimizer_tensor(ck: Path) -> str:
    return next(k for k in load_file(str(ck / "optimizer.safetensors")) if "exp_avg" in k)


MISFITS = {
    "model saved as a value": (
        lambda ck: edit_state(ck, _set("entries.model.kind", "value")),
        "saved as a plain value",
    ),
    "optimizer moment of the wrong shape": (
        lambda ck: _retensor(ck, "optimizer.safetensors", _optimizer_tensor(ck), torch.zeros(4, 3)),
        "the parameter float32 [3, 4]",
    ),
    "model weight of the wrong shape": (
        lambda ck: _retensor(ck, "model.safetensors", "weight", torch.zeros(4, 3)),
        "weight is (4, 3) in the checkpoint",
    ),
}


@pytest.mark.parametrize("name", list(MISFITS))
def test_a_checkpoint_that_does_not_fit_falls_back_untouched(
    tmp_path: Path, name: str, caplog
) -> None:
    do, reason = MISFITS[name]
    saved = make_run(tmp_path)
    do(tmp_path / "checkpoint-9")
    # the newest one does not fit: nothing of it is applied, the older one is restored
    state = small_state(seed=123)
    with (
        caplog.at_level("WARNING", logger="safepoint"),
        Checkpointer(tmp_path, signals=None) as ckpt,
    ):
        assert ckpt.restore(state) == 5
    assert any(reason in r.getMessage() for r in caplog.records)
    for k, v in state["model"].state_dict().items():
        assert torch.equal(v, saved[5][k])
    state["model"](torch.randn(2, 4)).sum().backward()
    state["optimizer"].step()  # the restored optimizer works

    # asked for explicitly: refused with the reason, the live objects untouched
    state = small_state(seed=123)
    before = {k: v.clone() for k, v in state["model"].state_dict().items()}
    with Checkpointer(tmp_path, signals=None) as ckpt, pytest.raises(IncompatibleCheckpointError):
        ckpt.restore(state, checkpoint=9)
    assert all(torch.equal(v, before[k]) for k, v in state["model"].state_dict().items())
    assert isinstance(state["model"], torch.nn.Module)
    assert state["optimizer"].state == {}


def test_when_no_checkpoint_fits_the_first_reason_is_raised(tmp_path: Path) -> None:
    make_run(tmp_path)
    model = torch.nn.Linear(5, 3)  # the user changed the model: nothing fits
    state = {"model": model, "optimizer": torch.optim.AdamW(model.parameters())}
    with (
        Checkpointer(tmp_path, signals=None) as ckpt,
        pytest.raises(IncompatibleCheckpointError, match="checkpoint-9"),
    ):
        ckpt.restore(state)
