"""``fits.check_fits``: a decoded state is checked against the live object before any
apply. Cases the Trainer fuzz test found, on real saves re-signed as an attacker can."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer
from safepoint.errors import IncompatibleCheckpointError
from tests.hostile.helpers import edit_state


def run(out: Path, opt: type[torch.optim.Optimizer], **kw: object) -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    state = {"model": model, "optimizer": opt(model.parameters(), lr=0.1, **kw)}
    with Checkpointer(out, save_every="1", total_steps=1, signals=None) as ckpt:
        model(torch.ones(2, 4)).sum().backward()
        state["optimizer"].step()  # type: ignore[union-attr]
        ckpt.step(1, state)
    return state


def fresh(opt: type[torch.optim.Optimizer], **kw: object) -> dict[str, object]:
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3)
    return {"model": model, "optimizer": opt(model.parameters(), lr=0.1, **kw)}


def test_sgd_without_momentum_resumes_with_its_empty_momentum_buffers(tmp_path: Path) -> None:
    run(tmp_path, torch.optim.SGD)  # torch stores momentum_buffer: None
    state = fresh(torch.optim.SGD)
    with Checkpointer(tmp_path, signals=None) as ckpt:
        assert ckpt.restore(state) == 1


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_an_adam_moment_that_is_none_is_refused_before_any_apply(tmp_path: Path, key: str):
    # Accepted, it reached fused Adam's kernel: a TypeError in the middle of training.
    run(tmp_path, torch.optim.AdamW)

    def blank(doc: dict) -> None:
        pairs = doc["entries"]["optimizer"]["tree"]["state"]["__dict__"]
        pairs[0][1][key] = None

    edit_state(tmp_path / "checkpoint-1", blank)
    state = fresh(torch.optim.AdamW)
    before = {k: v.clone() for k, v in state["model"].state_dict().items()}  # type: ignore[union-attr]
    refused = pytest.raises(IncompatibleCheckpointError, match=f"'{key}' of parameter")
    with Checkpointer(tmp_path, signals=None) as ckpt, refused:
        ckpt.restore(state, checkpoint=1)
    after = state["model"].state_dict()  # type: ignore[union-attr]
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing applied
