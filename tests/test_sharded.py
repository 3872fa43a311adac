"""Sharded saves (FSDP2 under torchrun, gloo on CPU): every rank writes its own pieces,
a rank killed mid-save loses nothing, and a checkpoint resumes on another number of
processes with the same state; plus the shard index's own checks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from safepoint.errors import CorruptCheckpointError
from safepoint.sharding import build_index, parse_index
from safepoint.validity import inspect
from tests.conftest import same_tensors
from tests.test_hostile import resign

SLOW = pytest.mark.slow
SCRIPT = Path(__file__).parent / "programs" / "dist_train.py"


def torchrun(
    out: Path, *args: str, nproc: int = 2, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), str(SCRIPT), str(out), "--sharded", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def saves(out: Path) -> list[dict[str, object]]:
    lines = (out / "safepoint.log.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    return [e for e in events if e["event"] == "save" and e.get("result") == "committed"]


# ------------------------------------------------------------------------ processes


@pytest.mark.distributed
@pytest.mark.crash
def test_each_rank_writes_its_pieces_and_a_rank_killed_mid_save_loses_nothing(
    tmp_path: Path,
) -> None:
    reference, run = tmp_path / "reference", tmp_path / "run"
    args = ("--steps", "20", "--save-every", "5")
    proc = ok(torchrun(reference, *args))
    pids = {int(r): int(p) for r, p in re.findall(r"rank (\d) pid (\d+)", proc.stdout)}
    files = set(inspect(reference / "checkpoint-20").manifest.files)  # type: ignore[union-attr]
    shards = {
        f"{k}.shard-0000{r}-of-00002.safetensors" for k in ("model", "optimizer") for r in (1, 2)
    }
    assert shards | {"shards.json", "state.json", "ranks.json"} <= files
    assert "model.safetensors" not in files
    # The record says which process wrote which files: each rank its own pieces.
    for event in saves(reference):
        assert event["mode"] == "sharded"
        writers = event["writers"]
        assert [w["rank"] for w in writers] == [0, 1]  # type: ignore[index]
        for w in writers:  # type: ignore[union-attr]
            assert w["pid"] == pids[w["rank"]]
            assert any(".shard-0000" + str(w["rank"] + 1) in f for f in w["files"])
            assert not any(".shard-0000" + str(2 - w["rank"]) in f for f in w["files"])

    # Rank 1 alone dies by SIGKILL in the middle of its first piece of the second save.
    crash = {"SAFEPOINT_CRASH_AT": "tensor_file@2", "SAFEPOINT_CRASH_RANK": "1"}
    assert torchrun(run, *args, env=crash).returncode != 0
    assert inspect(run / "checkpoint-5").valid and not (run / "checkpoint-10").exists()
    assert any(p.name.startswith(".staging-checkpoint-10-") for p in run.iterdir())

    rerun = ok(torchrun(run, *args))
    assert rerun.stdout.count("start 5") == 2
    assert not any(p.name.startswith(".staging-") for p in run.iterdir())
    assert same_tensors(reference / "final.safetensors", run / "final.safetensors")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.crash
@pytest.mark.parametrize(
    ("point", "rank"),
    [
        ("tensor_file@1", "0"),  # rank 0, mid-piece, first save: nothing committed yet
        ("tensor_file@3", "1"),
        ("tensor_file@3", "0"),
        ("after_files@2", "0"),  # every piece durable, no index or manifest yet
        ("after_manifest@2", "0"),  # manifest written, not renamed
        ("after_rename@2", "0"),  # committed, the parent not yet fsynced
    ],
)
def test_killed_at_each_point_of_a_sharded_save_the_rerun_resumes_and_ends_identical(
    tmp_path: Path, point: str, rank: str
) -> None:
    """SIGKILL of one rank at each named point of the sharded commit protocol: the rerun
    resumes from the newest checkpoint that was committed and ends bit-identical."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    args = ("--steps", "20", "--save-every", "5")
    ok(torchrun(reference, *args))
    crash = {"SAFEPOINT_CRASH_AT": point, "SAFEPOINT_CRASH_RANK": rank}
    assert torchrun(run, *args, env=crash).returncode != 0
    valid = [inspect(p) for p in run.glob("checkpoint-*")]
    newest = max((i.step for i in valid if i.valid), default=0)
    assert not any(i.status not in ("valid",) for i in valid), [i.problems for i in valid]
    rerun = ok(torchrun(run, *args))
    assert rerun.stdout.count(f"start {newest}") == 2, rerun.stdout
    assert same_tensors(reference / "final.safetensors", run / "final.safetensors")


@pytest.mark.slow
@pytest.mark.distributed
def test_hunt_sharded_runs_end_cleanly_every_time(tmp_path: Path) -> None:
    """Hunting loop for aborts at exit (seen in FSDP runs: "terminate called without an
    active exception"): 10 sharded runs with saves, resumes and a world-size change must
    all exit 0 (the program leaves past the interpreter's teardown only after "done")."""
    out = tmp_path / "run"
    for i in range(10):
        nproc = 2 + i % 2
        proc = torchrun(out, "--steps", str(4 * (i + 1)), "--save-every", "3", nproc=nproc)
        assert proc.returncode == 0, f"run {i}: " + proc.stderr[-3000:]
        assert proc.stdout.count("done") == nproc


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("saved_by", "resumed_by"),
    [
        (2, 3),
        (2, 1),
        pytest.param(1, 2, marks=pytest.mark.slow),
        pytest.param(3, 2, marks=pytest.mark.slow),
    ],
)
def test_resume_on_another_number_of_processes_restores_the_same_state(
    tmp_path: Path, saved_by: int, resumed_by: int
) -> None:
    """The whole model and AdamW state, gathered after the resume on M processes, is bit
    for bit the state gathered when N processes saved it (uneven pieces and a rank with
    no piece of a tensor among them: 4 rows over 3 ranks is 2, 2, 0)."""
    out = tmp_path / "run"
    args = ("--steps", "10", "--save-every", "5")
    ok(torchrun(out, *args, "--dump-final", str(tmp_path / "saved.safetensors"), nproc=saved_by))
    resumed = ok(
        torchrun(
            out, *args, "--dump-restored", str(tmp_path / "back.safetensors"), nproc=resumed_by
        )
    )
    assert resumed.stdout.count("start 10") == resumed_by
    assert f"saved by {saved_by} process(es), this run has {resumed_by}" in resumed.stderr
    assert same_tensors(tmp_path / "saved.safetensors", tmp_path / "back.safetensors")

    # verify reads every piece: one flipped byte in the last rank's file is found.
    piece = out / "checkpoint-10" / f"optimizer.shard-{saved_by:05d}-of-{saved_by:05d}.safetensors"
    data = bytearray(piece.read_bytes())
    data[-1] ^= 0xFF
    piece.write_bytes(bytes(data))
    cli = subprocess.run(
        [sys.executable, "-m", "safepoint", "verify", str(out / "checkpoint-10")],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 1 and piece.name in cli.stdout + cli.stderr

    # An index that lies (two pieces of one tensor overlap), under a manifest re-signed to
    # match it as an attacker would: corrupt in verify; a resume would fall back.
    data[-1] ^= 0xFF
    piece.write_bytes(bytes(data))
    folder = out / "checkpoint-10"
    index = json.loads((folder / "shards.json").read_bytes())
    pieces = index["entries"]["model"]["0.weight"]["pieces"]
    pieces[-1]["offset"][0] -= 1
    (folder / "shards.json").write_text(json.dumps(index))
    resign(folder)
    cli = subprocess.run(
        [sys.executable, "-m", "safepoint", "verify", str(folder)], capture_output=True, text=True
    )
    assert cli.returncode == 1 and "shards.json" in cli.stdout + cli.stderr, cli.stdout


@pytest.mark.distributed
def test_a_full_disk_is_retried_by_every_rank_together(
    tmp_path: Path, tmpfs: Callable[..., Path]
) -> None:
    """A disk with room for two checkpoints and a half, keep_last=2: the third save runs
    out of space mid-piece; rank 0 frees the oldest (retention deletes it anyway once the
    new one commits) and both ranks retry that save together. Nothing is lost."""
    args = ("--steps", "20", "--save-every", "5", "--keep-last", "2", "--width", "1600")
    reference = tmp_path / "reference"
    ok(torchrun(reference, *args))
    size = inspect(reference / "checkpoint-20").size
    run = tmpfs(int(size * 2.6)) / "run"
    ok(torchrun(run, *args, "--no-check-disk"))
    retries = [json.loads(line) for line in (run / "safepoint.log.jsonl").read_text().splitlines()]
    retries = [e for e in retries if e["event"] == "save_retry"]
    assert retries and "No space left" in retries[0]["error"], retries
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-20"]
    assert same_tensors(reference / "final.safetensors", run / "final.safetensors")


@pytest.mark.distributed
def test_the_disk_preflight_counts_every_ranks_pieces(tmp_path: Path) -> None:
    """Rank 0 holds half of the state: the estimate must still be the whole checkpoint
    (it was half of it), before the optimizer's first step and after."""
    program = Path(__file__).parent / "programs" / "sharded_estimate.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    cmd += ["2", str(program), str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = ok(subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240))
    before, after, real = map(int, re.findall(r"estimate (\d+) (\d+) real (\d+)", proc.stdout)[0])
    assert abs(before - real) / real < 0.02 and abs(after - real) / real < 0.02, (
        before,
        after,
        real,
    )


# ------------------------------------------------------------------------ the index


def _index(*pieces: tuple[str, list[int], list[int]], shape: list[int]) -> bytes:
    listed = [{"file": f, "offset": o, "shape": n} for f, o, n in pieces]
    tensor = {"shape": shape, "dtype": "F32", "pieces": listed}
    return json.dumps({"version": 1, "world_size": 2, "entries": {"model": {"w": tensor}}}).encode()


FILES = ["model.shard-00001-of-00002.safetensors", "model.shard-00002-of-00002.safetensors"]
UNLISTED = "model.shard-00002-of-00002.x"


def test_the_index_of_two_ranks_pieces_parses() -> None:
    layouts = [
        {
            "model": {
                "w": {"shape": [5, 4], "dtype": "F32", "offset": [0, 0], "local_shape": [3, 4]}
            }
        },
        {
            "model": {
                "w": {"shape": [5, 4], "dtype": "F32", "offset": [3, 0], "local_shape": [2, 4]}
            }
        },
    ]
    data = json.dumps(build_index(2, layouts)).encode()
    index = parse_index(data, files=FILES, where="shards.json")
    pieces = index["model"]["w"].pieces
    assert [(p.file, p.offset, p.shape) for p in pieces] == [
        (FILES[0], (0, 0), (3, 4)),
        (FILES[1], (3, 0), (2, 4)),
    ]


@pytest.mark.parametrize(
    ("pieces", "problem"),
    [
        (((FILES[0], [0, 0], [3, 4]),), "hold 12 elements, the tensor 20"),
        (((FILES[0], [0, 0], [3, 4]), (FILES[1], [3, 0], [3, 4])), "lies outside"),
        (((FILES[0], [0, 0], [3, 4]), (FILES[1], [1, 0], [2, 4])), "two pieces overlap"),
        (((FILES[0], [0, 0], [3, 4]), (UNLISTED, [3, 0], [2, 4])), "unlisted"),
        (((FILES[0], [0, 0], [3]), (FILES[1], [3, 0], [2, 4])), "lies outside"),
    ],
)
def test_an_index_with_a_gap_an_overlap_or_an_unlisted_file_is_corrupt(
    pieces: tuple[tuple[str, list[int], list[int]], ...], problem: str
) -> None:
    data = _index(*pieces, shape=[5, 4])
    with pytest.raises(CorruptCheckpointError, match=problem):
        parse_index(data, files=FILES, where="shards.json")


def test_a_partial_dtensor_is_refused_not_saved_unreduced(tmp_path: Path) -> None:
    """A Partial placement holds unreduced parts: saving rank 0's part would be wrong
    data under a valid checksum. One process, in this process's own gloo group."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    from safepoint.errors import ConfigError
    from safepoint.snapshot import capture

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        partial = DTensor.from_local(torch.ones(3), mesh, [Partial()])
        with pytest.raises(ConfigError, match="Partial placement"):
            capture({"x": partial}, step=1, copy=False)
    finally:
        dist.destroy_process_group()
