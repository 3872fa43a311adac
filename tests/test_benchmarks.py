"""The statistics of benchmarks/save_overhead.py: the bootstrap interval, the random
order of a round and the figures paired within a round (no benchmark is run)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import save_overhead
from _common import bootstrap_ci, dd_write, format_ci


def test_bootstrap_interval_holds_the_median_and_is_seeded() -> None:
    values = [0.31, 0.28, 0.44, 0.23, 0.27, 0.35]
    point, low, high = bootstrap_ci(values, seed=3)
    assert point == pytest.approx(0.295)
    assert min(values) <= low <= point <= high <= max(values)
    assert bootstrap_ci(values, seed=3) == (point, low, high)
    narrow = bootstrap_ci(values, level=0.5, seed=3)
    assert low <= narrow[1] <= narrow[2] <= high


@pytest.mark.parametrize(
    ("values", "expected"),
    [([], None), ([None, None], None), ([2.0], (2.0, 2.0, 2.0)), ([None, 2.0], (2.0, 2.0, 2.0))],
)
def test_bootstrap_edges(values: list, expected: tuple | None) -> None:
    assert bootstrap_ci(values) == expected


def test_format_ci() -> None:
    assert format_ci((0.2812, 0.2291, 0.4377)) == "0.281 [0.229, 0.438]"
    assert format_ci(None) == "-"


def test_round_order_is_a_seeded_permutation_with_dd_last_in_round_one() -> None:
    variants = list(save_overhead.VARIANTS)
    first = save_overhead.round_order(variants, random.Random(7), first=True)
    assert first[-1] == "dd" and sorted(first[:-1]) == sorted(variants)
    again = save_overhead.round_order(variants, random.Random(7), first=True)
    assert again == first
    orders = {tuple(save_overhead.round_order(variants, random.Random(s), False)) for s in range(9)}
    assert len(orders) == 9  # a new order each round


def _run(total: float, stalls: list[float], retention: list[float]) -> dict:
    return {
        "total_s": total,
        "step_times": [1.0] * 4,
        "stalls": stalls,
        "retention_in_stall": retention,
        "peak_rss": 10**9,
    }


def test_figures_are_paired_within_the_round() -> None:
    rnd = {
        "runs": {
            "none": _run(10.0, [], []),
            "stock": _run(14.0, [1.0, 1.2], [0.2, 0.2]),
            "floor": _run(11.0, [0.1], [0.0]),
            "async": _run(11.5, [0.05], [0.0]),
        },
        "dd": {},
    }
    figs = save_overhead.round_figures(rnd, save_every=5)
    assert figs["async"]["overhead_s"] == pytest.approx(1.5)
    assert figs["async"]["over_stock"] == pytest.approx(1.5 / 4.0)
    assert figs["async"]["over_floor"] == pytest.approx(1.5)
    assert figs["stock"]["stall_less_retention_s"] == pytest.approx(0.9)
    assert figs["async"]["stall_over_stock"] == pytest.approx(0.05 / 0.9)


def test_dd_baselines(tmp_path: Path) -> None:
    cache = dd_write(tmp_path, 1 << 20, direct=False)
    assert cache is not None and cache["mode"] == "conv=fsync" and cache["bytes"] == 1 << 20
    direct = dd_write(tmp_path, 1 << 20, direct=True)  # None where O_DIRECT is refused
    assert direct is None or direct["mode"] == "oflag=direct conv=fsync"
    assert not list(tmp_path.iterdir())
