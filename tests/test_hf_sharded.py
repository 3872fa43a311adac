"""#16: SafepointCallback in a user's SFTTrainer script whose model is sharded (FSDP2,
transformers' ``DistributedConfig``; gloo on CPU under torchrun), which the stock Trainer
refuses to checkpoint. Every rank writes its own pieces; a rank killed mid-run loses
nothing and the rerun ends bit-identical; a checkpoint resumes on another number of
processes (2 -> 3, 2 -> 1, 1 -> 2) with the whole weights and optimizer state equal to
the saved ones; ``export`` assembles the pieces into a model ``from_pretrained`` loads.

The program, tests/programs/fsdp_sft.py, dumps the gathered state where asked.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safepoint.validity import inspect

pytestmark = [pytest.mark.distributed, pytest.mark.crash]

PROGRAM = Path(__file__).parent / "programs" / "fsdp_sft.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(out: Path, model: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """The program on ``nproc`` processes (torchrun; 1: a plain process, whole weights)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [str(PROGRAM), str(out), str(model), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


def ok(proc: subprocess.CompletedProcess[str], nproc: int = 2) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count(" done ") == nproc, proc.stdout[-2000:]


def same_state(a: Path, b: Path) -> None:
    """The two dumps hold the same tensors, bit for bit."""
    x, y = load_file(a), load_file(b)
    assert sorted(x) == sorted(y)
    assert any(k.startswith("optimizer.") for k in x), "no optimizer state in the dump"
    differ = [k for k in x if not (x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]))]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def exported_equal_saved(run_dir: Path, saved: Path, exported: Path) -> None:
    """``safepoint export`` of the run's latest checkpoint: a model folder that
    ``from_pretrained`` loads, with the saved weights (assembled from the pieces)."""
    from transformers import AutoModelForCausalLM

    cmd = [sys.executable, "-m", "safepoint", "export", str(run_dir), "--checkpoint", "latest"]
    proc = subprocess.run([*cmd, "--out", str(exported)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    weights = {k[6:]: v for k, v in load_file(saved).items() if k.startswith("model.")}
    assert sorted(loaded) == sorted(weights)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert json.loads((exported / "config.json").read_text())["model_type"] == "gpt2"


@pytest.mark.parametrize("sharder", ["transformers", "accelerate"])
def test_each_rank_writes_its_pieces_and_a_rank_killed_mid_run_resumes_bit_identical(
    tmp_path: Path, tiny_model_dir: Path, sharder: str
) -> None:
    """transformers: sharded at load (DistributedConfig); accelerate: sharded by its FSDP2
    plugin at prepare, the Trainer's FSDP resume path (see the program)."""
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    how = ("--accelerate",) if sharder == "accelerate" else ()
    ok(run(reference, tiny_model_dir, *how, "--dump-end", str(tmp_path / "reference.st")))
    ckpt = inspect(reference / "checkpoint-8")
    assert ckpt.status == "valid" and ckpt.manifest is not None
    files = set(ckpt.manifest.files)
    pieces = {f"model.shard-0000{r}-of-00002.safetensors" for r in (1, 2)}
    assert pieces <= files
    assert "optimizer.shard-00002-of-00002.safetensors" in files
    assert "model.safetensors" not in files and "config.json" in files
    writers = {w["rank"]: set(w["files"]) for w in ckpt.manifest.info["writers"]}
    assert "model.shard-00002-of-00002.safetensors" in writers[1]
    assert "model.shard-00001-of-00002.safetensors" in writers[0]

    killed = run(crashed, tiny_model_dir, *how, "--kill-at", "10")
    assert killed.returncode != 0
    left = sorted(p.name for p in crashed.glob("checkpoint-*"))
    assert left == ["checkpoint-4", "checkpoint-8"]
    proc = run(crashed, tiny_model_dir, *how, "--dump-end", str(tmp_path / "resumed.st"))
    ok(proc)
    assert "resuming from" in proc.stderr and "checkpoint-8 (step 8)" in proc.stderr
    same_state(tmp_path / "reference.st", tmp_path / "resumed.st")


def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    two = tmp_path / "two"
    ok(run(two, tiny_model_dir, "--steps", "8", "--dump-end", str(tmp_path / "saved.st")))
    exported_equal_saved(two, tmp_path / "saved.st", tmp_path / "exported")
    # 2 -> 3 and 2 -> 1: the state the loop resumes with is the one saved
    for nproc in (3, 1):
        out = tmp_path / f"from-two-on-{nproc}"
        shutil.copytree(two, out)
        dump = tmp_path / f"begin-{nproc}.st"
        end = tmp_path / f"end-{nproc}.st"
        ok(
            run(
                out, tiny_model_dir, "--dump-begin", str(dump), "--dump-end", str(end), nproc=nproc
            ),
            nproc,
        )
        same_state(tmp_path / "saved.st", dump)
    three = inspect(tmp_path / "from-two-on-3" / "checkpoint-12").manifest
    assert three is not None and "model.shard-00003-of-00003.safetensors" in three.files
    one = inspect(tmp_path / "from-two-on-1" / "checkpoint-12").manifest
    assert one is not None and "model.safetensors" in one.files  # one process: whole weights
    # 1 -> 2: the Hugging Face files of one process, into a model accelerate shards
    out = tmp_path / "from-one-on-two"
    shutil.copytree(tmp_path / "from-two-on-1", out)
    back = ("--steps", "16", "--accelerate", "--dump-begin", str(tmp_path / "begin-back.st"))
    ok(run(out, tiny_model_dir, *back))
    same_state(tmp_path / "end-1.st", tmp_path / "begin-back.st")


def test_a_lora_adapter_on_a_sharded_base_is_saved_whole_and_resumes(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """PEFT's adapter on an FSDP2 base is plain (every rank holds it): saved as
    adapter_model.safetensors, as without FSDP, and resumed with its optimizer state."""
    out = tmp_path / "run"
    ok(run(out, tiny_model_dir, "--lora", "--steps", "8", "--dump-end", str(tmp_path / "end.st")))
    manifest = inspect(out / "checkpoint-8").manifest
    assert manifest is not None and "adapter_model.safetensors" in manifest.files
    again = ("--lora", "--steps", "12", "--dump-begin", str(tmp_path / "begin.st"))
    ok(run(out, tiny_model_dir, *again))
    same_state(tmp_path / "end.st", tmp_path / "begin.st")


def test_safepoint_train_fsdp_saves_sharded_reports_once_and_resumes_on_three(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "run"
    train = ["-m", "safepoint", "train", "--full", "--fsdp", "--save-every", "4"]
    train += ["--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAFEPOINT_HOME": str(tiny_model_dir.parents[1])}

    def torchrun(nproc: int, steps: int) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(nproc), *train, "--max-steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc

    first = torchrun(2, 8)
    said = " ".join(first.stdout.split())  # its lines wrap at 80 columns
    assert said.count("done: 8 steps") == 1  # rank 0 reports, not every rank
    assert said.count(f"saved {out / 'checkpoint-4'}") == 1
    manifest = inspect(out / "checkpoint-8").manifest
    assert manifest is not None
    assert {f"model.shard-0000{r}-of-00002.safetensors" for r in (1, 2)} <= set(manifest.files)
    again = torchrun(3, 12)
    said_again = " ".join(again.stdout.split())
    assert said_again.count(f"resuming from {out / 'checkpoint-8'} (step 8)") == 1
    assert " ".join(again.stderr.split()).count("was saved by 2 process(es), this run has 3") == 1
    manifest = inspect(out / "checkpoint-12").manifest
    assert manifest is not None and "model.shard-00003-of-00003.safetensors" in manifest.files
    verify = subprocess.run(
        [sys.executable, "-m", "safepoint", "verify", str(out)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def wait_for_step(
    out: Path, proc: subprocess.Popen[bytes], step: int, share: float, ref: Path
) -> None:
    """Return ``share`` of a step after the run record in ``out`` reaches ``step`` (by
    the run's own pace), or, for step 0, ``share`` of the reference run's start-up
    after the record's ``start``: the kill lands while the run starts."""
    from safepoint.app.chaos_process import processes, progress, step_seconds

    events = processes(ref)[-1]
    start, first = (next(e["t"] for e in events if e["event"] == k) for k in ("start", "metrics"))
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"the run ended before step {step}"
        assert time.monotonic() < deadline, f"step {step} not reached in 120 s"
        runs = processes(out) if out.is_dir() else []
        if runs and (progress(runs[-1])[1] or 0) >= step:
            break
        time.sleep(0.01)
    pace = (first - start) if step == 0 else step_seconds(runs[-1]) or step_seconds(events)
    time.sleep(share * (pace or 0.1))


def started(
    out: Path, model: Path, *args: str
) -> tuple[subprocess.Popen[bytes], list[tuple[str, str]]]:
    """The program on 2 processes, once both ranks have printed their pids: the
    process and the (rank, pid) pairs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(PROGRAM), str(out), str(model), *args]
    log = out.with_suffix(".log")
    sink = log.open("w")
    proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=ENV)
    sink.close()
    deadline = time.monotonic() + 120
    while len(pids := re.findall(r"rank (\d) pid (\d+)", log.read_text())) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    return proc, pids


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_hunt_a_rank_killed_at_a_random_instant_resumes_bit_identical(
    tmp_path: Path, tiny_model_dir: Path, seed: int
) -> None:
    """SIGKILL of one rank (either) at a random instant of a run that saves every 2
    steps (mid-save, between saves, while starting). The rerun ends bit-identical.

    The instant is a random step of the run's own progress (its run record) and a random
    part of a step after it, not a time drawn from the uninterrupted run: that run goes
    first and took up to 1.6 times as long, so times drawn from it came after the end
    (3 of 6 seeds, 2026-12-06)."""
    rng = random.Random(seed)
    args = ("--steps", "40", "--save-every", "2")
    reference, _ = started(
        tmp_path / "reference", tiny_model_dir, *args, "--dump-end", str(tmp_path / "ref.st")
    )
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    proc, pids = started(tmp_path / "run", tiny_model_dir, *args)
    wait_for_step(
        tmp_path / "run", proc, rng.randrange(0, 36), rng.random(), tmp_path / "reference"
    )
    os.kill(int(rng.choice(pids)[1]), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0, "the run ended before the kill"
    ok(run(tmp_path / "run", tiny_model_dir, *args, "--dump-end", str(tmp_path / "end.st")))
    same_state(tmp_path / "ref.st", tmp_path / "end.st")


def test_an_fsdp1_model_is_refused_with_what_to_use_instead() -> None:
    """FSDP1 needs a GPU to be built; a bare instance of its class stands in for one."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from safepoint.errors import ConfigError
    from safepoint.integrations.hf_sharded import is_sharded_model

    fsdp1 = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(fsdp1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), fsdp1)
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        is_sharded_model(model)
    assert not is_sharded_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
