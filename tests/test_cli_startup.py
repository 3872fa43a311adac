"""Read-only commands start fast: they never import torch or transformers (~1 s and ~3 s).

Timings are in ``benchmarks/cli_startup.py``; this checks the cause, not the clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer

HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "matplotlib", "fsspec")

# Runs the CLI in a fresh interpreter, then reports which heavy modules it loaded.
PROBE = """
import json, sys
from safepoint.cli import main
rc = main(sys.argv[1:])
heavy = [m for m in {heavy!r} if m in sys.modules]
print("PROBE " + json.dumps({{"rc": rc, "heavy": heavy}}), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    model = torch.nn.Linear(16, 16)
    state = {"model": model, "optimizer": torch.optim.AdamW(model.parameters())}
    with Checkpointer(out, save_every="5", keep_last=3, total_steps=20) as ckpt:
        for step in range(1, 21):
            ckpt.step(step, state, metrics={"loss": 1.0 / step})
    return out


def _probe(*args: str) -> tuple[int, list[str]]:
    code = PROBE.format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    line = next((ln for ln in proc.stderr.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, proc.stderr[-2000:]
    result = json.loads(line.removeprefix("PROBE "))
    return result["rc"], result["heavy"]


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["--help"],
        ["ls", "{run}"],
        ["ls", "--json", "{run}"],
        ["verify", "{run}"],
        ["verify", "{run}/checkpoint-20"],
        ["plan", "{run}"],
        ["prune", "{run}", "--keep-last", "1", "--dry-run"],
    ],
    ids=lambda a: " ".join(a).replace("{run}", "DIR"),
)
def test_read_only_commands_do_not_import_torch(run_dir: Path, args: list[str]) -> None:
    rc, heavy = _probe(*(a.replace("{run}", str(run_dir)) for a in args))
    assert rc == 0
    assert heavy == []


def test_import_safepoint_is_light_and_checkpointer_still_there() -> None:
    code = (
        "import sys, safepoint; light = 'torch' not in sys.modules; "
        "from safepoint import Checkpointer, SafepointCallback, verify; "
        "print(light, Checkpointer.__name__, 'torch' in sys.modules, "
        "all(hasattr(safepoint, n) for n in safepoint.__all__))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.split() == ["True", "Checkpointer", "True", "True"]
