"""Every error a user can cause is one line ``Error: ...``, exit code 2, and changes nothing.

A table: each case is the argv of a real ``python -m safepoint`` process, the setups it
needs (files, a read-only mount, a full disk, a live run holding the lock) and a piece
of the expected message. Cases that would train fail before any model is loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import unavailable

# ------------------------------------------------------------------------ setups


def _files(tmp: Path) -> None:
    (tmp / "afile").write_text("not a directory\n")
    good = '{"text": "a b c"}\n'
    (tmp / "bad.jsonl").write_text(good * 20 + '{"text": oops}\n' + good)
    (tmp / "notobj.jsonl").write_text("[1, 2]\n" + good)
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.txt").write_text("\n  \n\n")
    (tmp / "bad.json").write_text('[\n {"text": "a"},\n {"text" "b"}\n]\n')
    (tmp / "ragged.csv").write_text("text\na\nb,c,d\n")
    (tmp / "data.xml").write_text("<a/>\n")
    (tmp / "nocol.jsonl").write_text('{"question": "a", "answer": "b"}\n' * 5)
    (tmp / "bad.yaml").write_text("lora_r: [1\n")
    (tmp / "list.yaml").write_text("- 1\n")
    (tmp / "typo.yaml").write_text("lora_rank: 4\n")


def _run(tmp: Path) -> None:
    """A real run directory with three committed checkpoints (no metrics)."""
    import torch

    from safepoint import Checkpointer

    ckpt = Checkpointer(tmp / "run", save_every="1", keep_last=None, keep_best=0)
    state = {"model": torch.nn.Linear(64, 64)}
    for step in (1, 2, 3):
        ckpt.step(step, state)
    ckpt.close()


def _mount(target: Path, *options: str) -> None:
    target.mkdir(exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        unavailable(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")


def _ro(tmp: Path) -> None:
    _mount(tmp / "ro", "size=1m", "ro")


def _full(tmp: Path) -> None:
    _mount(tmp / "full", "size=256k")
    with open(tmp / "full" / "fill", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def _ro_run(tmp: Path) -> None:
    """``runro``: a run directory on a read-only bind mount."""
    _run(tmp)
    (tmp / "runro").mkdir()
    for cmd in (
        ["mount", "--bind", str(tmp / "run"), str(tmp / "runro")],
        ["mount", "-o", "remount,bind,ro", str(tmp / "runro")],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            unavailable(f"cannot make a read-only bind mount: {proc.stderr.strip()}")


_HOLDER = """
import sys
from safepoint.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()
"""


def _locked(tmp: Path) -> subprocess.Popen[str]:
    """``locked``: a directory whose lock a live process (safepoint's own lock) holds."""
    (tmp / "locked").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp / "locked")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


SETUPS: dict[str, Callable[[Path], object]] = {
    "files": _files,
    "run": _run,
    "ro": _ro,
    "full": _full,
    "ro_run": _ro_run,
    "locked": _locked,
}

# -------------------------------------------------------------------------- table

T = "train --output-dir out"
CASES: list[tuple[str, str, tuple[str, ...], str]] = [
    # id, argv, setups, expected piece of the message
    # train: the output directory
    ("out-is-file", "train --output-dir afile", ("files",), "afile: is a file, not a dir"),
    ("out-under-file", "train --output-dir afile/x", ("files",), "afile is a file"),
    ("out-read-only", "train --output-dir ro/x", ("ro",), "read-only file system"),
    ("out-run-read-only", "train --output-dir runro", ("ro_run",), "read-only file system"),
    ("out-disk-full", "train --output-dir full/x", ("full",), "is full"),
    ("out-locked", "train --output-dir locked", ("locked",), "another run holds the lock"),
    # train: data files
    ("data-missing", f"{T} --dataset nope.jsonl", (), "--dataset nope.jsonl: no such file"),
    ("data-is-dir", f"{T} --dataset ro", ("ro",), "is a directory"),
    ("data-type", f"{T} --dataset data.xml", ("files",), "unknown file type '.xml'"),
    ("data-empty", f"{T} --dataset empty.jsonl", ("files",), "the data set is empty"),
    ("data-blank", f"{T} --dataset blank.txt", ("files",), "the data set is empty"),
    ("data-bad-line", f"{T} --dataset bad.jsonl", ("files",), "line 21 is not valid JSON"),
    ("data-not-object", f"{T} --dataset notobj.jsonl", ("files",), "line 1 is not a JSON obj"),
    ("data-bad-json", f"{T} --dataset bad.json", ("files",), "not valid JSON (line 3:"),
    ("data-ragged-csv", f"{T} --dataset ragged.csv", ("files",), "in line 3"),
    ("data-no-column", f"{T} --dataset nocol.jsonl", ("files",), "name the column"),
    ("eval-empty", f"{T} --eval-dataset empty.jsonl", ("files",), "--eval-dataset empty.jsonl"),
    # train: values
    ("keep-last", f"{T} --keep-last -1", (), "or 0 to keep all"),
    ("save-every", f"{T} --save-every 0", (), "--save-every '0': a step interval"),
    ("save-every-text", f"{T} --save-every often", (), "cannot read 'often'"),
    ("max-steps", f"{T} --max-steps 0", (), "--max-steps must be at least 1"),
    ("max-disk", f"{T} --max-disk lots", (), "is not a size"),
    ("not-an-int", f"{T} --batch-size x", (), "'x' is not a valid integer"),
    ("bad-choice", f"{T} --mode mid", (), "Invalid value for '--mode'"),
    ("unknown-flag", f"{T} --bogus", (), "No such option '--bogus'"),
    ("remote-url", f"{T} --remote foo://bar", (), "cannot open the remote"),
    ("model-file", f"{T} --model afile", ("files",), "has no config.json"),
    ("model-missing", f"{T} --model ./nope", (), "no such folder"),
    ("resume-missing", f"{T} --resume nope", (), "no such checkpoint"),
    ("resume-not-ckpt", f"{T} --resume run", ("run",), "--resume run: run is incomplete"),
    # train: config files
    ("config-missing", f"{T} --config nope.yaml", (), "no such config file"),
    ("config-is-dir", f"{T} --config ro", ("ro",), "is a directory"),
    ("config-yaml", f"{T} --config bad.yaml", ("files",), "not valid YAML (line 2:"),
    ("config-list", f"{T} --config list.yaml", ("files",), "a mapping of keys"),
    ("config-typo", f"{T} --config typo.yaml", ("files",), "did you mean 'lora_r'"),
    # ls, verify
    ("ls-missing", "ls nope", (), "nope: no such directory"),
    ("ls-file", "ls afile", ("files",), "is a file"),
    ("verify-missing", "verify nope", (), "no such checkpoint or directory"),
    # prune
    ("prune-missing", "prune nope --keep-last 1", (), "no such directory"),
    ("prune-read-only", "prune runro --keep-last 1", ("ro_run",), "Read-only file system"),
    ("prune-locked", "prune locked --keep-last 1", ("locked",), "another run holds the lock"),
    ("prune-keep-0", "prune run --keep-last 0", ("run",), "not in the range x>=1"),
    # plan
    ("plan-missing", "plan nope", (), "no such directory"),
    ("plan-duration", "plan --save-time soon", (), "is not a duration"),
    ("plan-overhead", "plan --save-time 1s --max-overhead 2", (), "must be a share in (0, 1)"),
    # report
    ("report-file", "report afile", ("files",), "is a file"),
    ("report-read-only", "report runro", ("ro_run",), "Read-only file system"),
    ("report-out-ro", "report run --out ro/rep", ("run", "ro"), "Read-only file system"),
    # export
    ("export-missing", "export nope --out m", (), "no such directory"),
    ("export-best", "export run --out m", ("run",), "no checkpoint has the metric"),
    ("export-step", "export run --checkpoint 7 --out m", ("run",), "7"),
    ("export-not-hf", "export run --checkpoint 2 --out m", ("run",), "no config.json"),
    ("export-out-file", "export run --checkpoint latest --out afile", ("run", "files"), "afile"),
    ("export-out-ro", "export run --checkpoint latest --out ro/m", ("run", "ro"), "not writ"),
    ("export-disk-full", "export run --checkpoint latest --out full/m", ("run", "full"), "free on"),
    # chaos
    ("chaos-no-out", "chaos -- true", (), "put {out} where"),
    ("chaos-timeout", "chaos --workdir w --timeout soon -- x {out}", (), "is not a duration"),
    ("chaos-read-only", "chaos --workdir ro/w -- x {out}", ("ro",), "--workdir ro/w: cannot"),
    ("chaos-kills", "chaos --kills -1 -- x {out}", (), "Invalid value for '--kills'"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its mode, size and mtime: what "unchanged" means."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            out[rel] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a case's setups started (the lock holder); stopped after the case."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture
def work(tmp_path: Path, started: list[subprocess.Popen[str]]) -> Iterator[Path]:
    """The case's working directory; its mounts are undone after the case."""
    work = tmp_path / "work"
    work.mkdir()
    yield work
    for mount in ("runro", "ro", "full"):  # ismount misses a bind mount of the same fs
        if (work / mount).is_dir():
            subprocess.run(["umount", "-l", str(work / mount)], capture_output=True)


@pytest.mark.parametrize(
    ("argv", "setups", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    work: Path,
    tmp_path: Path,
    started: list[subprocess.Popen[str]],
    argv: str,
    setups: tuple[str, ...],
    expected: str,
) -> None:
    for name in setups:
        result = SETUPS[name](work)
        if isinstance(result, subprocess.Popen):
            started.append(result)
    before = _snapshot(work)
    env = {
        **os.environ,
        "SAFEPOINT_HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "safepoint", *argv.split()],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{err[-3000:]}"
    assert err.startswith("Error: ") and len(err.splitlines()) == 1, err
    assert expected in err, err
    assert _snapshot(work) == before, "a refused command changed the disk"
    assert not (tmp_path / "home").exists(), "the model was built: the check came too late"


def test_flags_that_the_config_allows(tmp_path: Path) -> None:
    """``--keep-last 0`` keeps all; ``--stop-on-nan`` exists; --save-every help is full."""
    import yaml

    def run(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "safepoint", "train", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return proc.stdout

    resolved = yaml.safe_load(run("--keep-last", "0", "--stop-on-nan", "--print-config"))
    assert resolved["keep_last"] is None and resolved["stop_on_nan"] is True
    assert yaml.safe_load(run("--no-stop-on-nan", "--print-config"))["stop_on_nan"] is False
    text = " ".join(run("--help").split())
    assert "'auto'" in text and "10,15m" in text and "--stop-on-nan / --no-stop-on-nan" in text
    assert "0 keeps all" in text
    assert not list(tmp_path.iterdir())
