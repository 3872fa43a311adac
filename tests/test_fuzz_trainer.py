"""Issue 28, items 3 and 4: crafted, re-signed optimizer, scheduler and state entries of
a Trainer checkpoint, resumed by a real SFTTrainer + SafepointCallback in a child process
(``programs/fuzz_trainer.py``, many cases per process).

Each case ends one of two ways: the run falls back to the older valid checkpoint
(finishes, says which it skipped and why, in a warning and in the run record's resume
event) with weights bit-identical to a run resumed from that checkpoint directly; or,
with the checkpoint named explicitly, one line: the error a plain Checkpointer gives
for it. Never a traceback, an abort, a segfault or a heap error.

On a4c0e11 (before): an ``exp_avg`` of 2 elements was accepted (non-finite weights, then
``free(): invalid next size``: the child aborts), a relabelled dtype was accepted (the
run resumed from the crafted checkpoint), a ``[2**63+5, 0]`` tensor raised ``TypeError``
and ``last_epoch: "x"`` a ``TypeError`` mid-training (tracebacks), and damage found in
``on_train_begin`` never fell back (the same error on every rerun).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from safepoint.app.tiny import tiny_model_path

PROGRAMS = Path(__file__).parent / "programs"
FIXED = ("few", "i32", "huge_opt", "huge_adapter", "last_epoch", "ids", "ndarray")
SLOW_CASES = int(os.environ.get("SAFEPOINT_FUZZ_CASES", "500"))
HEAP = ("free():", "double free", "corrupted", "malloc", "Segmentation", "Aborted")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's script's run (SFTTrainer + SafepointCallback): checkpoints 2 and 4."""
    out = tmp_path_factory.mktemp("fuzz") / "base"
    proc = subprocess.run(
        [sys.executable, str(PROGRAMS / "hf_user_train.py"), str(out), str(tiny_model_path()),
         "--steps", "4", "--save-every", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _run(base: Path, work: Path, cases: list[dict[str, Any]], timeout: int) -> list[dict]:
    work.mkdir()
    cases = [{"name": "ref", "drop": True}, *cases]
    (work / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, str(PROGRAMS / "fuzz_trainer.py"), str(base), str(work / "runs"),
         str(tiny_model_path()), str(work / "cases.json")],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]  # an abort is -6 or 134, a segfault -11 or 139
    assert "Traceback" not in text, text[-4000:]
    assert not [h for h in HEAP if h in proc.stderr], proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"name"')]
    assert [r["name"] for r in results] == [c["name"] for c in cases], text[-4000:]
    return results


def _check(results: list[dict[str, Any]]) -> dict[str, int]:
    ref = results[0]
    assert ref["resumed"] == "checkpoint-2" and ref["step"] == 6, ref
    seen = {"fallback": 0, "explicit": 0}
    for r in results[1:]:
        where = json.dumps(r)
        if r["name"].startswith("x"):  # named explicitly: one line, the engine's error
            assert "error" in r and "\n" not in r["error"], where
            assert r["exit_code"] in (2, 4) and "checkpoint-4" in r["error"], where
            seen["explicit"] += 1
            continue
        assert "error" not in r, where
        assert r["resumed"] == "checkpoint-2" and r["step"] == 6, where
        assert r["digest"] == ref["digest"], where  # as if resumed from checkpoint-2
        skipped = {s["checkpoint"]: s["problem"] for s in r["skipped"] or []}
        assert skipped.get("checkpoint-4"), where
        assert any("checkpoint-4" in w for w in r["warnings"]), where
        seen["fallback"] += 1
    return seen


def _cases(seeds: range, explicit_every: int) -> list[dict[str, Any]]:
    return [
        {"name": f"{'x' if s % explicit_every == 0 else 'c'}{s}", "seed": s,
         "explicit": s % explicit_every == 0}
        for s in seeds
    ]  # fmt: skip


def test_crafted_trainer_checkpoints_fall_back_or_stop(base_run: Path, tmp_path: Path) -> None:
    """The issue's reproductions by name, each resumed automatically (it falls back) and
    two named explicitly (one line); the seeded mutations are the slow test's."""
    named = [{"name": f"c{k}", "seed": k, "explicit": False} for k in FIXED]
    named += [{"name": f"x{k}", "seed": k, "explicit": True} for k in ("few", "last_epoch")]
    seen = _check(_run(base_run, tmp_path / "w", named, timeout=900))
    assert seen == {"fallback": len(FIXED), "explicit": 2}, seen


def test_rejected_twice_starts_fresh_bit_identical(base_run: Path, tmp_path: Path) -> None:
    """Both checkpoints rejected in on_train_begin (damage only the live optimizer
    shows): the run starts from scratch, bit-identical to a fresh run, although the
    Trainer had been called twice before (its optimizer, the RNG put back)."""
    work = tmp_path / "w"
    cases = [{"name": "fresh", "drop_all": True}, {"name": "both", "seed": 1, "both": True}]
    results = _run(base_run, work, cases, timeout=600)
    fresh, both = results[1], results[2]
    assert fresh["resumed"] is None and fresh["step"] == 6, fresh
    assert both["resumed"] is None and both["step"] == 6, both
    assert both["digest"] == fresh["digest"], results
    for name in ("checkpoint-2", "checkpoint-4"):  # said, each with its reason
        assert any(name in w and "impossible shape" in w for w in both["warnings"]), both


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_trainer_many(base_run: Path, tmp_path: Path) -> None:
    """``SAFEPOINT_FUZZ_CASES`` (500) seeded cases, in 4 child processes."""
    per = -(-SLOW_CASES // 4)
    total = {"fallback": 0, "explicit": 0}
    for i in range(4):
        seeds = range(1000 + i * per, 1000 + min((i + 1) * per, SLOW_CASES))
        results = _run(base_run, tmp_path / f"w{i}", _cases(seeds, 7), timeout=7200)
        for k, v in _check(results).items():
            total[k] += v
    print(f"fuzz: {sum(total.values())} cases: {total}")
    assert sum(total.values()) == SLOW_CASES, total
