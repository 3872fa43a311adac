"""The memory a background copy may take: the tightest cgroup limit, else the host's.

The real tests put a child process into a new cgroup (v2 where its memory controller is
available, else v1's memory hierarchy) and skip, saying why, where none can be made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from safepoint.memory import available_memory
from safepoint.records import read_events

MB = 1 << 20
ROOT = Path("/sys/fs/cgroup")

# Moves itself into the cgroup whose cgroup.procs is argv[1], then becomes argv[2:]:
# everything the command allocates is charged to that cgroup from its first byte.
ENTER = "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); " + (
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize(
    ("proc", "files", "expected"),
    [
        # v2: the parent's limit is the tighter one (500 - 450), file cache not counted
        (
            "0::/a/b\n",
            {
                "cgroup.controllers": "memory",
                "a/memory.max": str(500 * MB),
                "a/memory.current": str(470 * MB),
                "a/memory.stat": f"anon 1\ninactive_file {20 * MB}\n",
                "a/b/memory.max": str(600 * MB),
                "a/b/memory.current": str(300 * MB),
            },
            (50 * MB, "a/memory.max"),
        ),
        # v2 "max" everywhere: the host's
        ("0::/a\n", {"a/memory.max": "max\n", "a/memory.current": "5"}, None),
        # hybrid: v2 under unified/ with no limit, v1 memory with one
        (
            "4:memory:/job\n0::/job\n",
            {
                "unified/job/memory.max": "max",
                "memory/job/memory.limit_in_bytes": str(600 * MB),
                "memory/job/memory.usage_in_bytes": str(200 * MB),
                "memory/job/memory.stat": f"cache 9\ntotal_inactive_file {50 * MB}\n",
                "memory/memory.limit_in_bytes": "9223372036854771712",
            },
            (450 * MB, "memory/job/memory.limit_in_bytes"),
        ),
        # usage over the limit: nothing left, never negative
        (
            "0::/\n",
            {"memory.max": str(100 * MB), "memory.current": str(150 * MB)},
            (0, "memory.max"),
        ),
    ],
)
def test_the_tightest_limit_wins(
    tmp_path: Path, proc: str, files: dict[str, str], expected: tuple[int, str] | None
) -> None:
    _write(tmp_path / "cg", files)
    (tmp_path / "cgroup").write_text(proc)
    room = available_memory(cgroup_root=tmp_path / "cg", proc_cgroup=tmp_path / "cgroup")
    if expected is None:
        assert room.source == "host"
        assert room.available > 0
    else:
        assert room == (expected[0], str(tmp_path / "cg" / expected[1]))


def test_no_cgroup_files_means_host_memory(tmp_path: Path) -> None:
    room = available_memory(cgroup_root=tmp_path, proc_cgroup=tmp_path / "missing")
    assert room.source == "host"
    assert room.available <= psutil.virtual_memory().total


class Cgroup:
    """A new cgroup with a memory limit; ``limit`` and ``procs`` are its files."""

    def __init__(self, folder: Path, v2: bool) -> None:
        self.folder = folder
        self.limit = folder / ("memory.max" if v2 else "memory.limit_in_bytes")
        self.procs = folder / "cgroup.procs"
        self.events = folder / ("memory.events" if v2 else "memory.oom_control")

    def oom_kills(self) -> int:
        for line in self.events.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
        return 0


def _make_cgroup(name: str) -> Cgroup:
    """A fresh cgroup with the memory controller, or pytest.skip saying why not."""
    if os.geteuid() != 0:
        pytest.skip("cgroups can be written only as root")
    if (ROOT / "cgroup.controllers").is_file():  # v2 mounted at the root
        if "memory" not in (ROOT / "cgroup.controllers").read_text().split():
            pytest.skip("cgroup v2 has no memory controller here")
        try:
            if "memory" not in (ROOT / "cgroup.subtree_control").read_text().split():
                (ROOT / "cgroup.subtree_control").write_text("+memory")
            (ROOT / name).mkdir()
        except OSError as e:
            pytest.skip(f"cannot enable +memory or make a cgroup under {ROOT}: {e}")
        return Cgroup(ROOT / name, v2=True)
    if (ROOT / "memory" / "memory.limit_in_bytes").is_file():  # v1 (or hybrid)
        try:
            (ROOT / "memory" / name).mkdir()
        except OSError as e:
            pytest.skip(f"cannot make a v1 memory cgroup under {ROOT / 'memory'}: {e}")
        return Cgroup(ROOT / "memory" / name, v2=False)
    pytest.skip(f"no cgroup memory controller under {ROOT}")


@pytest.fixture
def cgroup(request: pytest.FixtureRequest) -> Iterator[Cgroup]:
    group = _make_cgroup(f"safepoint-test-{os.getpid()}-{request.node.name[:40]}")
    yield group
    group.folder.rmdir()  # its processes have exited: an empty cgroup


def run_in(group: Cgroup, cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", ENTER, str(group.procs), *cmd],
        capture_output=True,
        text=True,
        **kwargs,
    )


def test_a_process_in_a_limited_cgroup_sees_the_limit(cgroup: Cgroup) -> None:
    cgroup.limit.write_text(str(300 * MB))
    show = "from safepoint.memory import available_memory as a; print(list(a()))"
    proc = run_in(cgroup, [sys.executable, "-c", show], timeout=60)
    assert proc.returncode == 0, proc.stderr
    available, source = json.loads(proc.stdout.replace("'", '"'))
    assert source == str(cgroup.limit)
    assert 0 < available <= 300 * MB  # the host's is many GB


def _bigger_model(folder: Path) -> None:
    """A GPT-2 of 22M parameters with the tiny model's tokenizer: its full fine-tuning
    checkpoint (weights and AdamW state) is 254 MB, a background copy that matters."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from safepoint.app.tiny import tiny_model_path

    tok = AutoTokenizer.from_pretrained(tiny_model_path())
    tok.save_pretrained(folder)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=768,
        n_layer=3,
        n_head=12,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)


@pytest.mark.slow  # two training runs of ~30 s each
@pytest.mark.timeout(600)
def test_full_fine_tune_in_a_tight_cgroup_saves_in_line_and_finishes(
    tmp_path: Path, cgroup: Cgroup
) -> None:
    model = tmp_path / "model"
    _bigger_model(model)
    train = [sys.executable, "-m", "safepoint", "train", "--full", "--model", str(model)]
    train += ["--max-steps", "2", "--save-every", "2", "--batch-size", "2", "--max-length", "32"]

    # What the run takes with the checkpoint written in line: its peak resident memory.
    sizing = subprocess.Popen([*train, "--sync-save", "--output-dir", str(tmp_path / "sync")])
    _, status, usage = os.wait4(sizing.pid, 0)
    sizing.returncode = os.waitstatus_to_exitcode(status)
    assert sizing.returncode == 0
    peak = usage.ru_maxrss * 1024
    ckpt_bytes = sum(f.stat().st_size for f in (tmp_path / "sync" / "checkpoint-2").iterdir())
    assert ckpt_bytes > 200 * MB

    # Room for that plus 150 MB: a background copy (the whole checkpoint on top) does
    # not fit, and the host-wide reading (many GB free) would have started one.
    cgroup.limit.write_text(str(peak + 150 * MB))
    out = tmp_path / "limited"
    proc = run_in(cgroup, [*train, "--output-dir", str(out)], timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]  # 137 is the OOM killer
    assert cgroup.oom_kills() == 0
    fallback = [e for e in read_events(out) if e["event"] == "async_fallback"]
    assert fallback and fallback[0]["limit"] == str(cgroup.limit), proc.stderr[-3000:]
    assert fallback[0]["free"] < fallback[0]["need"] + 512 * MB
    assert "saving in-line" in proc.stderr
    saves = [e for e in read_events(out) if e["event"] == "save"]
    assert [(e["step"], e["result"]) for e in saves] == [(2, "committed")]
