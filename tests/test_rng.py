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
    data = snap.files[STATE_NAME]
    doc = json.loads(data)
    assert data == dumps_json(doc)  # sorted, compact, as every reader expects
    expected = capture_rng()
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng(doc["rng"])
    assert capture_rng() == expected
