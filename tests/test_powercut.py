"""The power-cut simulator (safepoint.powercut) and ``safepoint chaos --power-cut``.

Real FUSE mounts (needs /dev/fuse, fuse3 and mfusepy): outside CI they skip with the
reason; under ``CI=true`` a missing piece is a failure (.ci/run installs fuse3).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from safepoint.powercut import PowerCutFS, available, tree_digest
from safepoint.validity import latest_checkpoint

_WHY = available()
if _WHY is not None and os.environ.get("CI") == "true":
    raise RuntimeError(f"power-cut tests cannot run in CI: {_WHY}")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"power cuts: {_WHY}")

TESTS = Path(__file__).parent
PROGRAMS = TESTS / "programs"


@pytest.fixture
def fs(tmp_path: Path):
    with PowerCutFS(tmp_path / "backing", tmp_path / "mnt", journal=tmp_path / "journal") as f:
        yield f


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, *, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


# ------------------------------------------------------------------ the simulator


def test_unsynced_file_is_gone_and_synced_one_survives(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    _write(m / "kept", b"durable", sync=True)
    _fsync_dir(m)
    _write(m / "lost", b"never synced", sync=False)
    (m / "dir").mkdir()
    assert (m / "lost").read_bytes() == b"never synced"  # the live view is plain POSIX
    assert _tree(fs.cut("strict")) == {"kept": b"durable"}


def test_synced_data_without_parent_fsync_is_not_linked(fs: PowerCutFS) -> None:
    _write(fs.mountpoint / "f", b"data", sync=True)
    assert _tree(fs.cut("strict")) == {}


def test_parent_fsync_without_file_fsync_leaves_an_empty_file(fs: PowerCutFS) -> None:
    _write(fs.mountpoint / "f", b"data", sync=False)
    _fsync_dir(fs.mountpoint)
    assert _tree(fs.cut("strict")) == {"f": b""}


def test_rename_without_parent_fsync_is_undone(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    _write(m / "a", b"old", sync=True)
    _fsync_dir(m)
    _write(m / "tmp", b"new", sync=True)
    os.replace(m / "tmp", m / "a")
    assert (m / "a").read_bytes() == b"new"
    assert _tree(fs.cut("strict")) == {"a": b"old"}


def test_rename_with_parent_fsync_is_atomic_across_directories(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    (m / "staging").mkdir()
    _write(m / "staging" / "x", b"payload", sync=True)
    _fsync_dir(m / "staging")
    os.replace(m / "staging", m / "final")
    _fsync_dir(m)
    assert _tree(fs.cut("strict")) == {"final": None, "final/x": b"payload"}


def test_reordered_cut_can_leave_a_renamed_file_empty_zeroed_or_short(fs: PowerCutFS) -> None:
    """The classic bug: write, rename over, fsync the directory but not the file."""
    m = fs.mountpoint
    data = bytes(range(256)) * 64
    for i in range(4):  # several writes, as a real writer does
        with open(m / "tmp", "ab") as f:
            f.write(data[i * 4096 : (i + 1) * 4096])
    os.replace(m / "tmp", m / "final")
    _fsync_dir(m)
    assert _tree(fs.cut("strict")) == {"final": b""}
    seen = set()
    for seed in range(40):
        got = _tree(fs.cut("reordered", seed)).get("final")
        assert got is not None  # the rename was made durable: the name is always there
        if got == data:
            seen.add("complete")
        elif got == bytes(len(data)):
            seen.add("zeros")
        elif len(got) < len(data):
            seen.add("empty" if not got else "short")
    assert {"complete", "zeros", "empty", "short"} <= seen


def test_reordered_includes_strict_and_is_seeded(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    _write(m / "kept", b"durable", sync=True)
    _fsync_dir(m)
    for i in range(5):
        _write(m / f"maybe-{i}", b"x" * i, sync=False)
    one, two = fs.cut("reordered", 7), fs.cut("reordered", 7)
    assert tree_digest(one) == tree_digest(two)
    assert _tree(one)["kept"] == b"durable"


def test_cut_at_an_event_freezes_the_file_system(tmp_path: Path) -> None:
    with PowerCutFS(tmp_path / "b", tmp_path / "m", cut_at=3) as fs:
        m = fs.mountpoint
        f = open(m / "f", "wb")  # noqa: SIM115 (event 1: create)
        f.write(b"data")
        f.flush()  # event 2: write
        with pytest.raises(OSError):
            os.fsync(f.fileno())  # event 3: the power is gone
        assert fs.wait_cut(5)
        with pytest.raises(OSError):
            (m / "g").mkdir()
        f.close()
        assert fs.freeze() == 2
    assert fs.journal().count == 2
    assert _tree(fs.cut("strict")) == {}


# ------------------------------------------------- the plain-loop Checkpointer


def _toy(out: Path, capsys: pytest.CaptureFixture[str]) -> int:
    """Run tests/programs/toy_train.py in-process on ``out``; the step it started from."""
    sys.path.insert(0, str(PROGRAMS))
    try:
        import toy_train
    finally:
        sys.path.remove(str(PROGRAMS))
    capsys.readouterr()
    toy_train.main([str(out), *TOY_ARGS])
    first = capsys.readouterr().out.splitlines()[0]
    return int(first.split()[1])


TOY_ARGS = ["--steps", "12", "--save-every", "4", "--keep-last", "2"]


@pytest.mark.crash
def test_checkpointer_survives_a_power_cut_at_every_file_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recorded run of the plain loop on the simulator; then a cut before each of its
    file events (strict), and reordered samples: every rerun resumes from the newest
    intact checkpoint and ends bit-identical."""
    with PowerCutFS(tmp_path / "ref", tmp_path / "mnt", journal=tmp_path / "journal") as fs:
        subprocess.run(
            [sys.executable, str(PROGRAMS / "toy_train.py"), str(fs.mountpoint), *TOY_ARGS],
            check=True,
            capture_output=True,
        )
    reference = (tmp_path / "ref" / "final.safetensors").read_bytes()
    journal = fs.journal()
    events = journal.numbered()
    assert any(e.op == "fsyncdir" for e in events) and any(e.op == "rename" for e in events)
    rng = random.Random(0)
    plan = [(k, "strict", 0) for k in range(1, journal.count + 2)]
    plan += [(rng.randint(1, journal.count + 1), "reordered", s) for s in range(12)]
    seen: set[str] = set()
    resumed = 0
    for k, mode, seed in plan:
        state = journal.materialise(
            tmp_path / f"cut-{k}-{mode}-{seed}", before=k, mode=mode, seed=seed
        )
        digest = tree_digest(state)
        if digest in seen:
            continue
        seen.add(digest)
        newest = latest_checkpoint(state)
        expected = int(newest.name.split("-")[1]) if newest else 0
        start = _toy(state, capsys)
        where = f"cut before event {k} ({events[k - 1] if k <= len(events) else 'end'}), {mode}"
        assert start == expected, f"{where}: resumed from {start}, newest intact {expected}"
        assert (state / "final.safetensors").read_bytes() == reference, where
        resumed += start > 0
    assert resumed >= 3


# --------------------------------------------------------- safepoint chaos --power-cut


def _chaos(tmp_path: Path, *args: str, timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["safepoint", "chaos", "--power-cut", "--workdir", str(tmp_path / "chaos"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.crash
def test_chaos_power_cut_on_safepoint_train_every_point(tmp_path: Path) -> None:
    """A cut before every file event of ``safepoint train --max-steps 20 --save-every 5``
    (150 of them) and after the last, strict and one reordered state each, and a live
    cut: every surviving state resumes from its newest intact checkpoint (or starts
    over when it has none) and ends bit-identical (about 3 min: warm, 2 at a time)."""
    r = _chaos(
        tmp_path,
        *("--samples", "1", "--kills", "1", "--jobs", "2", "--"),
        *("safepoint", "train", "--max-steps", "20", "--save-every", "5"),
        *("--output-dir", "{out}"),
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "chaos: PASS" in r.stdout
    events = int(r.stdout.split(" file events in ")[0].rsplit(maxsplit=1)[-1])
    states = int(r.stdout.split(" surviving states, ")[0].rsplit(maxsplit=1)[-1])
    assert events > 100 and states == 2 * (events + 1) + 2  # every point, both modes


@pytest.mark.crash
def test_chaos_power_cut_on_safepoint_train_with_async_save(tmp_path: Path) -> None:
    """The background writer (O_DIRECT where it can, page cache on FUSE) under cuts: the
    commit protocol is the same on the writer thread, so every cut resumes intact."""
    r = _chaos(
        tmp_path,
        *("--sample", "3", "--samples", "1", "--kills", "0", "--"),
        *("safepoint", "train", "--max-steps", "4", "--save-every", "2", "--async-save"),
        *("--output-dir", "{out}"),
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "chaos: PASS" in r.stdout


@pytest.mark.slow
@pytest.mark.crash
@pytest.mark.parametrize("async_save", [False, True])
def test_chaos_power_cut_on_a_users_trainer_script(tmp_path: Path, async_save: bool) -> None:
    """A user's own SFTTrainer script with SafepointCallback (not ``safepoint train``):
    cuts before an even spread of its file events, strict and reordered."""
    from safepoint.app import tiny

    model = tiny.tiny_model_path()
    script = Path(__file__).parent / "programs" / "hf_user_train.py"
    r = _chaos(
        tmp_path,
        *("--sample", "12", "--samples", "2", "--kills", "1", "--jobs", "2"),
        *("--compare", "{out}/final.safetensors", "--"),
        *(sys.executable, str(script), "{out}", str(model), "--steps", "8", "--save-every", "2"),
        *(("--async-save",) if async_save else ()),
        timeout=3 * 3600,
    )
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
    assert "chaos: PASS" in r.stdout


@pytest.mark.slow
@pytest.mark.crash
def test_chaos_power_cut_on_safepoint_train_every_point_two_samples(tmp_path: Path) -> None:
    r = _chaos(
        tmp_path,
        *("--samples", "2", "--kills", "2", "--jobs", "2", "--"),
        *("safepoint", "train", "--max-steps", "20", "--save-every", "5"),
        *("--output-dir", "{out}"),
        timeout=4 * 3600,
    )
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]


def test_chaos_power_cut_fails_on_a_program_that_skips_fsync(tmp_path: Path) -> None:
    """A 'checkpointer' that renames without fsync'ing: the power cut must catch it."""
    script = tmp_path / "careless.py"
    script.write_text(
        "import json, os, sys\n"
        "out = sys.argv[1]\n"
        "path = os.path.join(out, 'state.json')\n"
        "step = json.load(open(path))['step'] if os.path.exists(path) else 0\n"
        "print(f'resuming from {path} (step {step})' if step else 'fresh', flush=True)\n"
        "for s in range(step + 1, 4):\n"
        "    tmp = path + '.tmp'\n"
        "    open(tmp, 'w').write(json.dumps({'step': s}))\n"
        "    os.replace(tmp, path)\n"
        "    fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)\n"
    )
    r = _chaos(
        tmp_path,
        "--samples",
        "0",
        "--kills",
        "0",
        "--compare",
        "{out}/state.json",
        "--",
        sys.executable,
        str(script),
        "{out}",
        timeout=300,
    )
    assert r.returncode == 1, r.stdout
    assert "FAIL" in r.stdout
