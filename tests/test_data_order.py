"""GlobalOrderSampler: every sample of an epoch exactly once across resumes on 1, 2 and 3
processes, a position that is arithmetic to restore, and refusals that say what to do.

The unit tests build one sampler per rank (explicit rank and world size, no process
group); the distributed tests run a real DDP loop under torchrun that is saved, stopped
and resumed on another number of processes, and check the ids each rank trained on."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from safepoint import Checkpointer
from safepoint.data_order import GlobalOrderSampler
from safepoint.errors import ConfigError, IncompatibleCheckpointError, SafepointWarning

PROGRAM = Path(__file__).parent / "programs" / "data_order_train.py"


def ranks(
    n: int, batch: int, world: int, state: dict | None = None, **kw: object
) -> list[GlobalOrderSampler]:
    samplers = [
        GlobalOrderSampler(n, batch, rank=r, world_size=world, **kw)  # type: ignore[arg-type]
        for r in range(world)
    ]
    for s in samplers:
        if state is not None:
            s.load_state_dict(state)
    return samplers


def train(samplers: list[GlobalOrderSampler], steps: int | None) -> list[list[list[int]]]:
    """``steps`` steps of a loop on every rank (None: to the end of the epoch): the
    batches of each step, by rank; every rank advances after each."""
    iters = [iter(s) for s in samplers]
    done: list[list[list[int]]] = []
    while steps is None or len(done) < steps:
        shares = [next(it, None) for it in iters]
        if shares[0] is None:
            assert all(s is None for s in shares), "ranks disagree on the number of steps"
            break
        done.append(shares)  # type: ignore[arg-type]
        for s in samplers:
            s.advance()
    return done


def saved(samplers: list[GlobalOrderSampler]) -> dict:
    states = [s.state_dict() for s in samplers]
    assert all(s == states[0] for s in states), "ranks must save the same position"
    return json.loads(json.dumps(states[0]))  # what state.json gives back


def ids(steps: list[list[list[int]]]) -> list[int]:
    return [i for shares in steps for share in shares for i in share]


def order(n: int, seed: int = 0, epoch: int = 0) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


# ---------------------------------------------------------------------- exactly once


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 300),
    batch=st.integers(1, 9),
    cuts=st.lists(st.integers(0, 40), min_size=2, max_size=2),
    worlds=st.permutations([1, 2, 3]),
)
def test_every_sample_exactly_once_over_world_changes(
    n: int, batch: int, cuts: list[int], worlds: list[int]
) -> None:
    """An epoch run as three runs on 1, 2 and 3 processes (in any order), each stopped
    after an arbitrary number of steps, trains each sample once, in one global order."""
    state = None
    consumed: list[int] = []
    for world, steps in zip(worlds, [*cuts, None], strict=True):
        samplers = ranks(n, batch, world, state)
        consumed += ids(train(samplers, steps))
        state = saved(samplers)
        if state["epoch"] == 1:
            break
    if state["epoch"] == 0:  # the cuts left samples: a last run on 2 processes ends it
        samplers = ranks(n, batch, 2, state)
        consumed += ids(train(samplers, None))
        state = saved(samplers)
    assert consumed == order(n)  # not only each sample once: the one seeded order
    assert (state["epoch"], state["cursor"]) == (1, 0)


@pytest.mark.parametrize(
    ("n", "batch", "world", "last_sizes"),
    [
        (24, 4, 3, [4, 4, 4]),  # no tail: the last step is full
        (22, 4, 3, [4, 3, 3]),  # 10 left: as even as possible, lower ranks first
        (25, 4, 3, [1, 0, 0]),  # 1 left for 3 ranks: two empty batches
        (5, 4, 3, [2, 2, 1]),  # the whole epoch is one short step
        (1, 1, 2, [1, 0]),
    ],
)
def test_tail_is_split_evenly_and_the_steps_agree(
    n: int, batch: int, world: int, last_sizes: list[int]
) -> None:
    samplers = ranks(n, batch, world)
    steps = train(samplers, None)
    assert [len(share) for share in steps[-1]] == last_sizes
    assert all(len(share) == batch for shares in steps[:-1] for share in shares)
    assert len(steps) == -(-n // (batch * world)) == len(ranks(n, batch, world)[0])
    assert sorted(ids(steps)) == list(range(n))


def test_drop_last_trains_each_sample_at_most_once_and_drops_fewer_than_a_global_batch() -> None:
    n, batch = 50, 4
    a = ranks(n, batch, 1, drop_last=True)
    first = ids(train(a, 5))  # 20 samples
    b = ranks(n, batch, 3, saved(a), drop_last=True)  # 30 left: 2 steps of 12, 6 dropped
    second = ids(train(b, None))
    assert first + second == order(n)[:44]
    assert (b[0].epoch, b[0].cursor, len(b[0])) == (1, 0, 4)  # 50 // 12


def test_drop_last_resume_where_the_new_global_batch_no_longer_fits_starts_next_epoch() -> None:
    n, batch = 30, 4
    a = ranks(n, batch, 1, drop_last=True)
    train(a, 6)  # 24 trained, 6 left: one more batch of 4 for one process
    b = ranks(n, batch, 2, saved(a), drop_last=True)  # 8 per step: the epoch is over
    assert (b[0].epoch, b[0].cursor) == (1, 0)
    assert ids(train(b, 1)) == order(n, epoch=1)[:8]


# ---------------------------------------------------------------------- position


def test_position_is_global_and_resumes_with_any_world_and_batch_size() -> None:
    a = ranks(100, 5, 2)
    train(a, 3)
    state = saved(a)
    assert state == {
        "version": 1,
        "seed": 0,
        "dataset_size": 100,
        "epoch": 0,
        "cursor": 30,
        "permutation_xxh3": state["permutation_xxh3"],
    }
    b = ranks(100, 7, 3, state)  # another world size and per-process batch
    assert (b[0].epoch, b[0].cursor, len(b[0])) == (0, 30, 4)  # 70 left, 21 per step
    assert ids(train(b, 1)) == order(100)[30:51]


def test_resume_is_arithmetic_whatever_the_cursor() -> None:
    """Putting the position back iterates nothing: at 2**61 samples into an epoch of
    2**62 it is immediate (iterating, or even building the order, would never end)."""
    n = 2**62
    sampler = GlobalOrderSampler(n, 8, rank=1, world_size=4)
    state = {"version": 1, "seed": 0, "dataset_size": n, "epoch": 3}
    sampler.load_state_dict({**state, "cursor": 2**61, "permutation_xxh3": 0})
    assert (sampler.epoch, sampler.cursor, len(sampler)) == (3, 2**61, 2**61 // 32)
    sampler.advance(2)
    assert sampler.cursor == 2**61 + 64


def test_first_batch_after_a_resume_is_the_orders_next() -> None:
    for cursor in (0, 7, 64, 993):
        sampler = GlobalOrderSampler(1000, 8, rank=0, world_size=1, seed=5)
        state = {"version": 1, "seed": 5, "dataset_size": 1000, "epoch": 2, "cursor": cursor}
        saver = GlobalOrderSampler(1000, 8, seed=5, rank=0, world_size=1)
        saver.set_epoch(2)
        sampler.load_state_dict(
            {**state, "permutation_xxh3": saver.state_dict()["permutation_xxh3"]}
        )
        assert next(iter(sampler)) == order(1000, seed=5, epoch=2)[cursor : cursor + 8]


def test_a_changed_permutation_is_refused_when_the_order_is_rebuilt() -> None:
    sampler = GlobalOrderSampler(100, 4, rank=0, world_size=1)
    state = sampler.state_dict()
    other = GlobalOrderSampler(100, 4, rank=0, world_size=1)
    other.load_state_dict({**state, "permutation_xxh3": state["permutation_xxh3"] ^ 1})
    with pytest.raises(IncompatibleCheckpointError, match="torch version that saved it"):
        next(iter(other))


def test_the_position_is_what_the_loop_consumed_not_what_workers_prefetched() -> None:
    """A DataLoader with workers asks for batches ahead; the saved cursor counts only
    the batches the loop trained on, and a resumed loader continues with the next one."""
    data = list(range(200))
    sampler = GlobalOrderSampler(200, 4, rank=0, world_size=1)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=2, prefetch_factor=4)
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(5)]
    for _ in seen:
        sampler.advance()
    state = sampler.state_dict()
    following = next(it).tolist()
    del it
    assert state["cursor"] == 20
    fresh = GlobalOrderSampler(200, 4, rank=0, world_size=1)
    fresh.load_state_dict(state)
    assert next(iter(DataLoader(data, batch_sampler=fresh))).tolist() == following


def test_forgetting_advance_warns_once_at_save() -> None:
    sampler = GlobalOrderSampler(100, 4, rank=0, world_size=1)
    it = iter(sampler)
    next(it), next(it)
    with pytest.warns(SafepointWarning, match=r"call sampler.advance\(\)"):
        sampler.state_dict()
    sampler.state_dict()  # once is enough (pytest turns a second warning into an error)


# ---------------------------------------------------------------------- epochs


def test_epochs_roll_over_at_the_end_and_set_epoch_only_moves_forward() -> None:
    sampler = GlobalOrderSampler(10, 4, rank=0, world_size=1)
    first = list(sampler)
    for _ in first:
        sampler.advance()
    assert (sampler.epoch, sampler.cursor) == (1, 0)
    assert [i for b in first for i in b] == order(10)
    assert [i for b in sampler for i in b] == order(10, epoch=1)
    sampler.advance()
    sampler.set_epoch(1)  # the current epoch: a resumed loop continues where it was
    assert (sampler.epoch, sampler.cursor) == (1, 4)
    sampler.set_epoch(3)
    assert (sampler.epoch, sampler.cursor) == (3, 0)
    with pytest.raises(ConfigError, match=r"range\(sampler.epoch, epochs\)"):
        sampler.set_epoch(2)


# ---------------------------------------------------------------------- refusals


def test_another_dataset_size_or_seed_is_refused_with_what_to_do() -> None:
    state = GlobalOrderSampler(100, 4, rank=0, world_size=1, seed=1).state_dict()
    checked = GlobalOrderSampler(99, 4, rank=0, world_size=1, seed=1)
    with pytest.raises(IncompatibleCheckpointError, match="resume with the same data set"):
        checked.check_state_dict(state)  # checks, changes nothing
    assert (checked.epoch, checked.cursor) == (0, 0)
    with pytest.raises(IncompatibleCheckpointError, match="100 samples, this sampler has 99"):
        GlobalOrderSampler(99, 4, rank=0, world_size=1, seed=1).load_state_dict(state)
    with pytest.raises(IncompatibleCheckpointError, match="resume with seed=1"):
        GlobalOrderSampler(100, 4, rank=0, world_size=1, seed=2).load_state_dict(state)
    with pytest.raises(IncompatibleCheckpointError, match="upgrade safepoint"):
        GlobalOrderSampler(100, 4, rank=0, world_size=1, seed=1).load_state_dict(
            {**state, "version": 2}
        )
    with pytest.raises(IncompatibleCheckpointError, match="lacks valid cursor"):
        GlobalOrderSampler(100, 4, rank=0, world_size=1, seed=1).load_state_dict(
            {**state, "cursor": "3"}
        )
    with pytest.raises(IncompatibleCheckpointError, match="past the end"):
        GlobalOrderSampler(100, 4, rank=0, world_size=1, seed=1).load_state_dict(
            {**state, "cursor": 101}
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset_size": 0}, "dataset_size must be a positive int"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"rank": 2, "world_size": 2}, "pass 0 <= rank < world_size"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"dataset_size": 7, "world_size": 2, "drop_last": True}, "use drop_last=False"),
    ],
)
def test_bad_arguments_say_what_to_pass(kwargs: dict, match: str) -> None:
    args = {"dataset_size": 10, "batch_size": 4, "rank": 0, "world_size": 1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        GlobalOrderSampler(**args)


# ---------------------------------------------------------------------- Checkpointer


def test_round_trips_as_a_checkpointer_state_entry(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sampler = GlobalOrderSampler(50, 4, rank=0, world_size=1, seed=3)
    state = {"model": net, "optimizer": opt, "data": sampler}
    data = torch.arange(50, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    with Checkpointer(tmp_path / "run", save_every="4") as ckpt:
        batches = iter(DataLoader(data, batch_sampler=sampler))
        for step in range(6):
            loss = net(next(batches)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sampler.advance()
            ckpt.step(step + 1, state)
    doc = json.loads((tmp_path / "run" / "checkpoint-4" / "state.json").read_text())
    assert json.dumps(doc["entries"]["data"]).count('"cursor": 16') == 1

    resumed = GlobalOrderSampler(50, 2, seed=3, rank=1, world_size=3)  # another layout
    state2 = {"model": torch.nn.Linear(3, 1), "optimizer": None, "data": resumed}
    state2["optimizer"] = torch.optim.SGD(state2["model"].parameters(), lr=0.1)  # type: ignore[union-attr]
    with Checkpointer(tmp_path / "run", save_every="4") as ckpt:
        assert ckpt.restore(state2, checkpoint=4) == 4
    assert (resumed.epoch, resumed.cursor) == (0, 16)
    assert next(iter(resumed)) == order(50, seed=3)[18:20]  # rank 1 of 3, 2 each

    # A sampler of another seed: refused before anything is loaded (all or nothing).
    wrong = GlobalOrderSampler(50, 4, seed=4, rank=0, world_size=1)
    fresh = torch.nn.Linear(3, 1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    state3 = {"model": fresh, "optimizer": torch.optim.SGD(fresh.parameters()), "data": wrong}
    with (
        Checkpointer(tmp_path / "run", save_every="4") as ckpt,
        pytest.raises(IncompatibleCheckpointError, match="resume with seed=3") as refused,
    ):
        ckpt.restore(state3, checkpoint=4)
    assert "same model and optimizer" not in str(refused.value)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


# ---------------------------------------------------------------------- real processes


def launch(
    out: Path, world: int, *args: str, popen: bool = False
) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(world), str(PROGRAM), str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def trained_ids(out: Path, runs: list[str]) -> Counter[int]:
    """The ids of every step as trained by the last run that trained it (a run killed
    after its last checkpoint redid nothing the rerun did not redo): rank logs are
    lines ``{"tag", "step", "rank", "ids"}``, a torn last line of a killed rank dropped."""
    by_step: dict[int, tuple[int, list[int]]] = {}
    for log in sorted(out.glob("ids-rank*.jsonl")):
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            rank_of_run = runs.index(rec["tag"])
            known = by_step.get(rec["step"])
            if known is None or known[0] < rank_of_run:
                by_step[rec["step"]] = (rank_of_run, list(rec["ids"]))
            elif known[0] == rank_of_run:
                known[1].extend(rec["ids"])
    return Counter(i for _, got in by_step.values() for i in got)


N, BATCH = 97, 4  # an odd size: the 3-process run ends on a 1-sample tail (two empty ranks)


@pytest.mark.distributed
def test_exactly_once_over_one_two_three_processes(tmp_path: Path) -> None:
    """One epoch trained as a 1-process run to step 6, a 2-process run to step 12 and a
    3-process run to the end (each ending on a save, workers prefetching): every sample
    trained once. Cursor 6*4 = 24, then 24 + 6*8 = 72, then 2 steps of 12 and 1 sample."""
    out = tmp_path / "run"
    common = ["--size", str(N), "--batch", str(BATCH), "--save-every", "3", "--workers", "1"]
    launch(out, 1, *common, "--steps", "6", "--tag", "a")
    launch(out, 2, *common, "--steps", "12", "--tag", "b")
    last = launch(out, 3, *common, "--steps", "15", "--tag", "c")
    assert "rank 2 start 12 epoch 0 cursor 72" in last.stdout  # type: ignore[union-attr]
    assert "rank 0 end epoch 1 cursor 0" in last.stdout  # type: ignore[union-attr]
    assert trained_ids(out, ["a", "b", "c"]) == Counter(range(N))


@pytest.mark.slow  # ~35 s on 2 loaded cores, over the default suite's share
@pytest.mark.distributed
@pytest.mark.crash
def test_killed_between_saves_and_resumed_on_another_world_size(tmp_path: Path) -> None:
    """The 2-process run is SIGKILLed (all its processes) at step 10, after its save at
    9: the 3-process rerun redoes step 10 onwards, and the steps as finally trained
    still cover the epoch exactly once."""
    out = tmp_path / "run"
    common = ["--size", str(N), "--batch", str(BATCH), "--save-every", "3"]
    launch(out, 1, *common, "--steps", "6", "--tag", "a")
    proc = launch(out, 2, *common, "--steps", "12", "--tag", "b", "--pause-at", "10", popen=True)
    assert isinstance(proc, subprocess.Popen) and proc.stdout is not None
    lines: list[str] = []
    # the ranks sleep at most 120 s at the pause: a run that never pauses cannot hang the test
    watchdog = threading.Timer(180, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            paused = re.findall(r"rank \d+ paused at 10 pid (\d+)", "".join(lines))
            if len(paused) == 2:  # (two ranks' lines can interleave within one line)
                for pid in paused:  # torchrun gives each rank a session of its own
                    os.kill(int(pid), signal.SIGKILL)
                break
        else:
            pytest.fail("the run ended before pausing:\n" + "".join(lines) + proc.stderr.read())
    finally:
        watchdog.cancel()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    rerun = launch(out, 3, *common, "--steps", "14", "--tag", "c")
    # the rerun resumed from the save at 9 (cursor 24 + 3*8 = 48): 4 steps of 12 and 1
    assert "rank 0 start 9 epoch 0 cursor 48" in rerun.stdout  # type: ignore[union-attr]
    assert "rank 0 end epoch 1 cursor 0" in rerun.stdout  # type: ignore[union-attr]
    assert trained_ids(out, ["a", "b", "c"]) == Counter(range(N))
