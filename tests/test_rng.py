"""``state.json``'s RNG part: the fast, cached encoding is byte for byte the plain one,
and a draw from any generator is seen."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from safepoint.fileio import dumps_json
from safepoint.rng import capture_rng, capture_rng_json, restore_rng
from safepoint.schema import STATE_NAME
from safepoint.snapshot import capture


@pytest.mark.parametrize(
    "draw",
    [
        lambda: None,
        lambda: random.random(),
        lambda: np.random.rand(),
        lambda: np.random.standard_normal(),  # the cached gauss only: pos may not move
        lambda: torch.rand(1),
        lambda: random.gauss(0, 1),
    ],
)
def test_the_cached_rng_text_is_the_plain_encoding_after_any_draw(draw: object) -> None:
    capture_rng_json()  # fill the cache
    for _ in range(3):
        draw()  # type: ignore[operator]
        assert capture_rng_json() == dumps_json(capture_rng()).decode()[:-1]


def test_state_json_is_the_plain_encoding_and_restores() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    snap = capture({"model": model, "optimizer": opt}, step=7, copy=False, progress={"b": 1})
    assert STATE_NAME not in snap.files  # made by the thread that writes it
    data = snap.resolve().files[STATE_NAME]
    doc = json.loads(data)
    assert data == dumps_json(doc)  # sorted, compact, as every reader expects
    expected = capture_rng()
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng(doc["rng"])
    assert capture_rng() == expected


def test_state_json_made_later_holds_the_state_at_capture() -> None:
    """The writer encodes ``state.json`` while training goes on: what it holds is what
    was true when the snapshot was taken, not when it is written."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    progress = {"sampler": {"position": 3}}
    before = capture_rng()
    snap = capture({"model": model, "optimizer": opt}, step=7, copy=False, progress=progress)
    random.random(), np.random.rand(), np.random.standard_normal(), torch.rand(1)
    progress["sampler"]["position"] = 4
    opt.param_groups[0]["lr"] = 0.25
    doc = json.loads(snap.resolve().files[STATE_NAME])
    assert doc["rng"] == json.loads(json.dumps(before))
    assert doc["progress"] == {"sampler": {"position": 3}}
    assert doc["entries"]["optimizer"]["tree"]["param_groups"][0]["lr"] == 0.5
    assert snap.resolve().files[STATE_NAME] is snap.files[STATE_NAME]  # made once
