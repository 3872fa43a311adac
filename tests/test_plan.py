"""``safepoint plan`` and the formulas behind it: numbers checked against the formulas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer
from safepoint.cli import main
from safepoint.plan import (
    daly_interval,
    disk_needed,
    measured,
    optimal_interval,
    outlook,
    overhead_share,
    overhead_warning,
    steps_for,
    work_lost_per_failure,
    young_interval,
)
from safepoint.records import read_events
from safepoint.retention import RetentionPolicy


def test_young_and_daly() -> None:
    assert young_interval(12, 21600) == pytest.approx(720.0)
    x = 12 / (2 * 21600)
    assert daly_interval(12, 21600) == pytest.approx(720 * (1 + math.sqrt(x) / 3 + x / 9) - 12)
    assert daly_interval(12, 21600) == pytest.approx(712.02, abs=0.01)
    assert daly_interval(100, 40) == 40  # stall >= 2 MTBF: save every MTBF


@pytest.mark.parametrize(
    ("stall", "mtbf", "overhead", "interval", "rule"),
    [
        (12, 21600, 0.02, 712.02, "Daly optimum"),
        (12, 3e6, 0.02, daly_interval(12, 3e6), "Daly"),
        (60, 3600, 0.02, 60 * 0.98 / 0.02, "overhead bound"),  # 2940 s > Daly's ~620 s
        (1, 100, 0.5, daly_interval(1, 100), "Daly"),
    ],
)
def test_optimal_interval(stall: float, mtbf: float, overhead: float, interval: float, rule: str):
    got, why = optimal_interval(stall, mtbf, overhead)
    assert got == pytest.approx(interval, abs=0.01)
    assert why.startswith(rule)
    assert overhead_share(got, stall) <= overhead + 1e-12


def test_small_formulas() -> None:
    assert overhead_share(98, 2) == pytest.approx(0.02)
    assert work_lost_per_failure(600, 12) == 306
    assert steps_for(712.01, 0.8) == 890
    assert steps_for(0.1, 0.8) == 1
    assert disk_needed(10, 3) == 40
    assert disk_needed(10, 3, max_bytes=15) == 30  # latest + best protected: 2, +1 in flight
    assert disk_needed(10, None) is None
    assert disk_needed(10, None, max_bytes=55) == 65


def test_outlook() -> None:
    o = outlook(
        400.0, stall=12, step_time=0.8, total_steps=10000, checkpoint_bytes=2_000_000_000,
        policy=RetentionPolicy(keep_last=3),
    )  # fmt: skip
    assert o.steps == 500
    assert o.saves == 20
    assert o.kept == 3
    assert o.disk_bytes == 8_000_000_000
    assert o.overhead == pytest.approx(12 / 412)
    assert o.lost_per_failure_s == pytest.approx(206)
    assert outlook(100.0, stall=1, step_time=0.3, total_steps=1000).saves == 4  # 333 x3 + final


def test_overhead_warning() -> None:
    note = overhead_warning("every 1 steps", interval=0.5, stall=1.5)
    assert note is not None and "every 1 steps" in note and "~75%" in note
    assert overhead_warning("every 500 steps", interval=400, stall=12) is None


def _plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_from_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    r = _plan_json(
        capsys,
        *("--step-time", "0.8s", "--save-time", "12s", "--mtbf", "6h", "--steps", "10000"),
        *("--checkpoint-size", "2GB", "--free-disk", "50GB", "--keep-last", "3"),
        *("--save-every", "500"),
    )
    tau = daly_interval(12, 6 * 3600)
    rec = r["recommended"]
    assert rec["interval_s"] == pytest.approx(tau)
    assert rec["steps"] == round(tau / 0.8) == int(rec["save_every"])
    assert rec["overhead"] == pytest.approx(12 / (tau + 12))
    assert rec["lost_per_failure_s"] == pytest.approx((tau + 12) / 2)
    assert rec["saves"] == 10000 // rec["steps"] + 1
    assert rec["disk_bytes"] == 4 * 2_000_000_000
    cur = r["current"]
    assert cur["interval_s"] == pytest.approx(400.0)
    assert cur["overhead"] == pytest.approx(12 / 412)
    assert cur["saves"] == 20
    assert r["fits"] is True
    assert r["rule"] == "Daly optimum"


def test_plan_table_and_disk_warning(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--save-time", "30s", "--step-time", "1s", "--steps", "5000"]
    args += ["--checkpoint-size", "20GB", "--free-disk", "50GB", "--save-every", "100"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "recommended" in out and "current" in out and "work lost per failure" in out
    assert "warning: the retention needs" in out  # keeps all 5 checkpoints: 120 GB


def test_plan_clamps_to_the_run_length(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--step-time", "0.4s", "--save-time", "0.1s", "--steps", "93", "--keep-last", "2")
    r = _plan_json(capsys, *args)
    optimum = daly_interval(0.1, 24 * 3600)
    assert r["clamped_from"] == {"interval_s": pytest.approx(optimum), "steps": 328}
    rec = r["recommended"]
    assert rec["save_every"] == "93" and rec["steps"] == 93 and rec["saves"] == 1
    assert rec["interval_s"] == pytest.approx(93 * 0.4)
    assert main(["plan", *args]) == 0
    out = capsys.readouterr().out
    assert "clamped: the Daly optimum is every 328 steps" in out
    assert "longer than the 93-step run" in out
    # a run longer than the optimum is not clamped
    r = _plan_json(capsys, *args[:5], "100000")
    assert r["clamped_from"] is None and r["recommended"]["steps"] == 328


def test_plan_needs_a_save_time(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--step-time", "1s"]) == 2
    assert "--save-time" in capsys.readouterr().err


def test_plan_from_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = torch.nn.Linear(64, 64)
    state = {"model": model}
    with Checkpointer(tmp_path, save_every="4", keep_last=2, total_steps=12) as ckpt:
        ckpt.restore(state)
        for step in range(1, 13):
            ckpt.step(step, state)
    m = measured(read_events(tmp_path))
    assert m.saves == 3 and m.step_time and m.stall and m.checkpoint_bytes
    r = _plan_json(capsys, str(tmp_path), "--mtbf", "1h")
    assert r["inputs"]["save_time_s"] == pytest.approx(m.stall)
    assert r["inputs"]["step_time_s"] == pytest.approx(m.step_time)
    assert r["inputs"]["total_steps"] == 12
    assert r["policy"]["keep_last"] == 2
    # the optimum (seconds) is far longer than this 12-step run: clamped to the run
    optimum = optimal_interval(m.stall, 3600)[0]
    assert r["clamped_from"]["interval_s"] == pytest.approx(optimum)
    assert r["recommended"]["interval_s"] == pytest.approx(min(optimum, 12 * m.step_time))
    assert r["recommended"]["save_every"] == "12"
    assert r["current"]["save_every"] == "4"
    assert r["current"]["interval_s"] == pytest.approx(4 * m.step_time)
    saves = math.ceil(12 / r["recommended"]["steps"])
    assert r["recommended"]["saves"] == saves
    assert r["recommended"]["disk_bytes"] == (min(saves, 2) + 1) * m.checkpoint_bytes
    assert r["current"]["disk_bytes"] == 3 * m.checkpoint_bytes  # 2 kept + 1 in flight
    # the run's stored MTBF (24h default) is used when none is given
    r = _plan_json(capsys, str(tmp_path))
    assert r["inputs"]["mtbf_s"] == 86400


def _exact_waste(interval: float, stall: float, mtbf: float) -> float:
    """Expected extra wall time per unit of work with Poisson failures (no restart cost):
    a segment of interval + stall takes (e^(L(interval+stall)) - 1) / L on average."""
    rate = 1.0 / mtbf
    return math.expm1(rate * (interval + stall)) / (rate * interval) - 1.0


@pytest.mark.parametrize(
    ("stall", "mtbf"), [(12, 6 * 3600), (60, 24 * 3600), (300, 3600), (1, 600)]
)
def test_daly_is_near_the_exact_optimum(stall: float, mtbf: float) -> None:
    grid = [t for k in range(1, 2000) if (t := stall * 1.01**k) < 5 * mtbf]
    best = min(_exact_waste(t, stall, mtbf) for t in grid)
    daly = _exact_waste(daly_interval(stall, mtbf), stall, mtbf)
    young = _exact_waste(young_interval(stall, mtbf), stall, mtbf)
    assert daly <= best * 1.005 + 1e-9  # within 0.5% of the best achievable waste
    assert daly <= young + 1e-12


def test_plan_current_auto_is_the_recommendation(capsys: pytest.CaptureFixture[str]) -> None:
    r = _plan_json(
        capsys, "--save-time", "5s", "--step-time", "2s", "--mtbf", "2h", "--save-every", "auto"
    )
    assert r["current"]["interval_s"] == pytest.approx(r["recommended"]["interval_s"])
    assert r["current"]["fits"] is None  # no checkpoint size, no free space given
