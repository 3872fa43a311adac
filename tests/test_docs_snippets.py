"""Every Python and shell snippet of README.md and docs/*.md runs as written.

The rules, explicit and reviewed here rather than guessed per block:

- A ```python block runs with this interpreter in a fresh folder; a ``safepoint``
  warning it logs fails it too (a README example must not warn).
- A ```/```bash/```console block is a command block when it has ``$ `` lines (then those
  are the commands and the rest is output) or when its first non-comment line starts
  with a command word (``COMMANDS``); it runs in bash with ``set -e`` in a fresh folder,
  with ``safepoint`` (and, for the SLURM script, ``srun``/``scontrol``) resolved to
  this interpreter's package. Any other block is a listing and must be in ``LISTINGS``.
- ``pip install`` and ``pytest`` lines are not run: the environment is already set
  up, and the suite must not run itself.
- ``safepoint train`` gets ``--max-steps`` (substituted or appended), so each run
  takes seconds on the built-in tiny model.
- ``<!-- no-run: REASON -->`` on the line before a block skips it, with that reason.
- A block that does not train starts in a folder holding a small finished default run
  (``runs/default``, as after ``safepoint train``); ``GIVEN`` adds what a block's text
  says the reader already has (a config file, a stock Trainer's output).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_STEPS = 4
COMMANDS = ("safepoint", "pip", "pytest", "python", "srun", "torchrun", "accelerate")
NOT_RUN = re.compile(r"^\s*(\$\s*)?(pip install|pytest)\b")
FENCE = re.compile(r"^```(\w*)\s*$")
NO_RUN = re.compile(r"^<!--\s*no-run:\s*(.+?)\s*-->$")

# (file, first line) of blocks that show files, not commands.
LISTINGS = {
    ("README.md", "runs/default/"),
    # docs/ARCHITECTURE.md: the layer diagram and the call trees of a save and a resume
    (
        "docs/ARCHITECTURE.md",
        " cli/           click commands (< 200 lines each): flags in, app calls, exit codes",
    ),
    ("docs/ARCHITECTURE.md", 'ckpt.step(120, state, metrics={"loss": 0.8})'),
    # docs/config.md: the YAML example, trained with by tests/test_train_settings.py
    ("docs/config.md", "# run.yaml: safepoint train --config run.yaml"),
    ("README.md", "# run.yaml: safepoint train --config run.yaml"),
    (
        "docs/ARCHITECTURE.md",
        "ckpt.restore(state)                              SafepointCallback: trainer.train()",
    ),
}
# Heavier cases, run with -m slow: each is several `safepoint train` processes.
SLOW_BLOCKS = {
    ("README.md", "#SBATCH --signal=USR1@120"),
    ("docs/report.md", "safepoint report runs/default"),
}
SLOW_LINE = re.compile(r"^\s*safepoint chaos\b")  # a reference run, kills and reruns
# What a block's own text assumes the reader has: path -> how to make it.
GIVEN = {
    ("README.md", "#SBATCH --signal=USR1@120"): {"run.yaml": "seed: 0\n"},
    ("docs/report.md", "safepoint report runs/default"): {
        "path/to/trainer_output": "stock-trainer"
    },
}


@dataclass(frozen=True)
class Block:
    file: str
    line: int  # of the opening fence
    lang: str
    text: str
    no_run: str | None

    @property
    def key(self) -> tuple[str, str]:
        first = next((s for s in self.text.splitlines() if s.strip()), "")
        return (self.file, first.split("  #", 1)[0].rstrip())  # without a trailing comment


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
            marker = NO_RUN.match(before)
            name = str(path.relative_to(ROOT))
            text = "\n".join(lines[i + 1 : end]) + "\n"
            found.append(Block(name, i + 1, m.group(1), text, marker and marker.group(1)))
            i = end + 1
    return found


def commands(block: Block) -> list[str] | None:
    """The block's command lines (None for a listing), before any rule is applied."""
    lines = block.text.splitlines()
    if any(s.startswith("$ ") for s in lines):
        return [s[2:] for s in lines if s.startswith("$ ")]
    first = next((s for s in lines if s.strip() and not s.startswith("#")), "")
    return lines if first.split(" ", 1)[0] in COMMANDS else None


def with_max_steps(line: str) -> str:
    # chaos needs the run as long as written: its kills must land after a checkpoint
    if not re.search(r"\bsafepoint train\b", line) or line.lstrip().startswith("safepoint chaos"):
        return line
    if "--max-steps" in line:
        return re.sub(r"--max-steps \d+", f"--max-steps {MAX_STEPS}", line)
    return re.sub(r"\bsafepoint train\b", f"safepoint train --max-steps {MAX_STEPS}", line, count=1)


@dataclass(frozen=True)
class Case:
    block: Block
    script: str
    slow: bool

    @property
    def trains(self) -> bool:
        return "safepoint train" in self.script and not SLOW_LINE.search(self.script)


def cases() -> list[Case]:
    found = []
    for b in blocks():
        if b.no_run:
            continue
        slow = b.key in SLOW_BLOCKS
        if b.lang == "python":
            found.append(Case(b, b.text, slow))
            continue
        lines = commands(b)
        if lines is None:
            continue
        lines = [": not run" if NOT_RUN.match(s) else with_max_steps(s) for s in lines]
        heavy = [s for s in lines if SLOW_LINE.match(s)]
        assert not any(s.endswith("\\") for s in heavy), "a slow line is split off whole"
        light = [s for s in lines if not SLOW_LINE.match(s)]
        if any(s.strip() and not s.startswith((":", "#")) for s in light):
            found.append(Case(b, "\n".join(light) + "\n", slow))
        if heavy:
            found.append(Case(b, "\n".join(heavy) + "\n", True))
    return found


def case_id(case: Case) -> str:
    lines = [s for s in case.script.splitlines() if s.strip() and not s.startswith((":", "#"))]
    first = lines[0] if lines else ""
    stem = re.sub(r"[^A-Za-z0-9]+", "-", first)[:40].strip("-")
    return f"{case.block.file}:{case.block.line}:{stem}"


ALL = cases()
PARAMS = [pytest.param(c, id=case_id(c), marks=[pytest.mark.slow] if c.slow else []) for c in ALL]

# Runs the snippet as __main__ and fails if safepoint logged a warning. One warning is
# measured, not a defect of the example: the save-cost advice depends on how fast this
# machine runs the tiny model's steps (a 9 ms step makes any interval look costly).
RUNNER = """\
import logging, runpy, sys
seen = []
class Catch(logging.Handler):
    def emit(self, record):
        if "per save spends ~" not in record.getMessage():
            seen.append(record.getMessage())
logging.getLogger("safepoint").addHandler(Catch(logging.WARNING))
runpy.run_path(sys.argv[1], run_name="__main__")
if seen:
    sys.exit("safepoint warned: " + " | ".join(seen))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``safepoint`` (and SLURM's ``srun``/``scontrol``) on PATH, for this interpreter."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shims = {
        "safepoint": f'exec "{sys.executable}" -m safepoint "$@"',
        "srun": 'exec "$@"',  # one task on this machine
        "scontrol": 'echo "scontrol $*"',
    }
    for name, body in shims.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        # the session's tiny-model cache, shared with the other test modules
        "SAFEPOINT_HOME": str(tmp_path_factory.getbasetemp() / "safepoint-home"),
        "TOKENIZERS_PARALLELISM": "false",
        # One thread per snippet: on a shared 2-core machine torch's second thread spins
        # against the other processes (a tiny-model step: 0.27 s with two, 0.023 s with one).
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """A folder holding a finished small ``runs/default`` with a few checkpoints."""
    base = tmp_path_factory.mktemp("default-run")
    train = [sys.executable, "-m", "safepoint", "train", "--max-steps", "6", "--save-every", "2"]
    done = run(train, base, env)
    assert done.returncode == 0, done.stderr[-3000:]
    return base


def make_given(cwd: Path, case: Case, env: dict[str, str]) -> None:
    for rel, what in GIVEN.get(case.block.key, {}).items():
        target = cwd / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if what == "stock-trainer":
            script = Path(__file__).parent / "programs" / "stock_trainer_run.py"
            done = run([sys.executable, str(script), str(target), "--steps", "8"], cwd, env)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            target.write_text(what)


@pytest.mark.parametrize("case", PARAMS)
def test_snippet_runs(
    case: Case, tmp_path: Path, env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    cwd = tmp_path / "work"
    if case.trains:
        cwd.mkdir()
    else:
        shutil.copytree(request.getfixturevalue("default_run"), cwd)
    make_given(cwd, case, env)
    if case.block.lang == "python":
        (tmp_path / "snippet.py").write_text(case.script)
        cmd = [sys.executable, "-c", RUNNER, str(tmp_path / "snippet.py")]
    else:
        cmd = ["bash", "-c", "set -ex\n" + case.script]
    done = run(cmd, cwd, env)
    assert done.returncode == 0, (
        f"{case.block.file} line {case.block.line}: the snippet failed ({done.returncode})\n"
        f"--- snippet as run\n{case.script}--- stdout (tail)\n{done.stdout[-2000:]}\n"
        f"--- stderr (tail)\n{done.stderr[-4000:]}"
    )
    if case.block.lang == "python" and "LoraConfig(" in case.script:
        check_peft_loads(cwd, env)


# A LoRA checkpoint loads by the auto class its adapter config names (#29 item 9: a
# LoraConfig without task_type gave "Cannot infer the auto class").
LOAD_PEFT = """\
import sys
from pathlib import Path
from peft import AutoPeftModelForCausalLM
ckpts = sorted(Path(sys.argv[1]).glob("runs/*/checkpoint-*"), key=lambda p: int(p.name[11:]))
model = AutoPeftModelForCausalLM.from_pretrained(str(ckpts[-1]))
print(type(model).__name__, ckpts[-1])
"""


def check_peft_loads(cwd: Path, env: dict[str, str]) -> None:
    done = run([sys.executable, "-c", LOAD_PEFT, str(cwd)], cwd, env)
    assert done.returncode == 0 and "PeftModelForCausalLM" in done.stdout, (
        f"AutoPeftModelForCausalLM cannot load the snippet's checkpoint:\n{done.stderr[-2000:]}"
    )


def test_every_block_is_run_or_skipped_for_a_reviewed_reason() -> None:
    all_blocks = blocks()
    assert len(all_blocks) >= 10, "the extractor found too few blocks"
    run_keys = {c.block.key for c in ALL}
    listings = {b.key for b in all_blocks if b.lang != "python" and commands(b) is None}
    assert listings == LISTINGS, "a block that is neither run nor a reviewed listing"
    for b in all_blocks:
        assert b.key in run_keys or b.no_run or b.key in LISTINGS, b
    # the tables name blocks that exist
    assert run_keys >= SLOW_BLOCKS | set(GIVEN)
    # the README's API snippets and main commands run in the default (CI) suite
    fast = {c.block.key for c in ALL if not c.slow}
    readme_python = [b.key for b in all_blocks if b.file == "README.md" and b.lang == "python"]
    assert len(readme_python) >= 2 and set(readme_python) <= fast
    fast_script = "".join(c.script for c in ALL if not c.slow)
    for command in ("train", "ls", "verify", "prune", "plan", "report", "export"):
        assert f"safepoint {command} " in fast_script, command


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("safepoint train", f"safepoint train --max-steps {MAX_STEPS}"),
        ("safepoint train  # resumes", f"safepoint train --max-steps {MAX_STEPS}  # resumes"),
        (
            "c -- safepoint train --max-steps 40 --o {out}",
            f"c -- safepoint train --max-steps {MAX_STEPS} --o {{out}}",
        ),
        ("safepoint ls runs/default", "safepoint ls runs/default"),
        (
            "safepoint chaos --kills 5 -- safepoint train --max-steps 40 --output-dir {out}",
            "safepoint chaos --kills 5 -- safepoint train --max-steps 40 --output-dir {out}",
        ),
    ],
)
def test_max_steps_rule(line: str, expected: str) -> None:
    assert with_max_steps(line) == expected
