"""hf_data: where a Trainer resumed on another number of processes lands in the data
order, checked against accelerate's own sharding and skipping (``BatchSamplerShard``,
``SkipBatchSampler``: the objects the Trainer's dataloader and ``skip_first_batches``
use) and the Trainer's step arithmetic (``_init_training_state``)."""

from __future__ import annotations

import math

import pytest
from torch.utils.data import BatchSampler, SequentialSampler

from safepoint.integrations.hf_data import Layout, trainer_data_resume

accelerate_data = pytest.importorskip("accelerate.data_loader")


def shards(n: int, layout: Layout, drop_last: bool) -> list[list[list[int]]]:
    """Each process's batches of one epoch, as accelerate shards them. Sequential ids:
    a sample's id is its position in the epoch's order (the order is shared by all
    processes, so a shuffled one changes nothing here)."""
    base = BatchSampler(SequentialSampler(range(n)), layout.batch_size, drop_last)
    return [
        list(accelerate_data.BatchSamplerShard(base, layout.world_size, p, even_batches=True))
        for p in range(layout.world_size)
    ]


def trainer_position(step: int, n: int, layout: Layout, drop_last: bool) -> tuple[int, set[int]]:
    """(epoch, ids of that epoch a Trainer of ``layout`` counts as done at ``step``):
    the Trainer's epoch length and skip, applied with accelerate's own objects."""
    per_process = shards(n, layout, drop_last)
    ga = layout.gradient_accumulation_steps
    per_epoch = max(math.ceil(len(per_process[0]) / ga), 1)  # num_update_steps_per_epoch
    epoch, in_epoch = divmod(step, per_epoch)
    skipped: set[int] = set()
    for batches in per_process:
        kept = list(accelerate_data.SkipBatchSampler(batches, skip_batches=in_epoch * ga))
        skipped |= {i for b in batches[: len(batches) - len(kept)] for i in b}
    return epoch, skipped


@pytest.mark.parametrize(
    ("n", "step", "saved", "now"),
    [
        (1000, 10, Layout(2, 8), Layout(3, 8)),  # more processes: samples skipped
        (1000, 10, Layout(3, 8), Layout(2, 8)),  # fewer: samples trained again
        (1000, 10, Layout(2, 8, 3), Layout(3, 8)),
        (1000, 10, Layout(2, 8, 2), Layout(4, 8, 1)),  # same samples per step: exact
        (1000, 10, Layout(2, 8), Layout(2, 8)),
        (1001, 7, Layout(3, 5), Layout(2, 5)),
        (999, 20, Layout(1, 4, 2), Layout(2, 4, 1)),
        (96, 3, Layout(2, 8), Layout(1, 16)),
    ],
)
@pytest.mark.parametrize("drop_last", [False, True])
def test_offset_matches_what_accelerate_and_the_trainer_do(
    n: int, step: int, saved: Layout, now: Layout, drop_last: bool
) -> None:
    epoch, trained = trainer_position(step, n, saved, drop_last)
    resumed_epoch, skipped = trainer_position(step, n, now, drop_last)
    got = trainer_data_resume(step, n, saved=saved, now=now, drop_last=drop_last)
    assert (got.epoch, got.resumed_epoch) == (epoch, resumed_epoch) == (0, 0)
    never, again = skipped - trained, trained - skipped
    assert got.offset == len(never) - len(again)
    assert not (never and again)  # one order, so one of the two is a prefix of the other
    assert got.exact == (got.message() is None) == (skipped == trained)


def test_message_says_what_happens_and_the_setting_that_avoids_it() -> None:
    more = trainer_data_resume(40, 10_000, saved=Layout(2, 8), now=Layout(3, 8))
    assert more.offset == 320
    assert "320 samples of the order are never trained" in (more.message() or "")
    assert "keep processes x per_device_train_batch_size x gradient_accumulation_steps at 16" in (
        more.message() or ""
    )
    fewer = trainer_data_resume(40, 10_000, saved=Layout(4, 8), now=Layout(2, 8))
    assert fewer.offset == -640 and fewer.suggestion == 2
    assert "640 samples are trained a second time" in (fewer.message() or "")
    assert "resume with gradient_accumulation_steps=2" in (fewer.message() or "")
    assert trainer_data_resume(40, 10_000, saved=Layout(4, 8), now=Layout(2, 8, 2)).exact


def test_ignore_data_skip_restarts_the_epoch_and_a_later_step_can_change_epoch() -> None:
    same = trainer_data_resume(40, 10_000, saved=Layout(2, 8), now=Layout(2, 8))
    assert same.exact
    restart = trainer_data_resume(
        40, 10_000, saved=Layout(2, 8), now=Layout(2, 8), ignore_data_skip=True
    )
    assert restart.offset == -640 and "ignore_data_skip=True" in (restart.message() or "")
    # 1000 samples: 63 steps per epoch with 2 x 8, 125 with 1 x 8; step 100 is in
    # epoch 1 for the first and epoch 0 for the second
    back = trainer_data_resume(100, 1000, saved=Layout(2, 8), now=Layout(1, 8))
    assert (back.epoch, back.resumed_epoch) == (1, 0)
    assert back.offset == 800 - 1000 - 592  # 592 of epoch 1 trained; resumes at 800 of 0
