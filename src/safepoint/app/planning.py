"""``safepoint plan``: when to save and whether the retention fits the disk, as data.

``make_plan`` takes the numbers given on the command line, fills in what a run's
directory measured (save stalls, step times, checkpoint sizes, its policy) and returns
the JSON that ``plan --json`` prints; the table is drawn from the same dict.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safepoint.app.runs import (
    POLICY_KEYS,
    checkpoints,
    policy_from_options,
    recorded_options,
    run_directory,
    run_policy,
)
from safepoint.errors import ConfigError
from safepoint.options import Options
from safepoint.plan import (
    DEFAULT_MAX_OVERHEAD,
    DEFAULT_MTBF_S,
    Outlook,
    clamp_to_run,
    measured,
    optimal_interval,
    outlook,
    steps_for,
)
from safepoint.records import read_events
from safepoint.retention import RetentionPolicy
from safepoint.schedule import Schedule, parse_save_every
from safepoint.units import parse_duration, parse_size
from safepoint.validity import CheckpointInfo


def make_plan(directory: Path | None, opts: dict[str, Any]) -> dict[str, Any]:
    """The numbers ``safepoint plan`` prints, as a JSON-ready dict. ``opts``: the plan
    command's options by name (None: not given)."""
    i, policy, spec = _plan_inputs(directory, opts)
    stall, mtbf, step_time = i["save_time_s"], i["mtbf_s"], i["step_time_s"]
    interval, rule = optimal_interval(stall, mtbf, i["max_overhead"])
    clamped = None
    run = clamp_to_run(interval, step_time=step_time, total_steps=i["total_steps"])
    if run is not None:  # the optimum is longer than the run: save once, at the end
        clamped = {"interval_s": interval, "steps": steps_for(interval, step_time)}
        interval = run
    common = {
        "stall": stall,
        "step_time": step_time,
        "total_steps": i["total_steps"],
        "checkpoint_bytes": i["checkpoint_bytes"],
        "policy": policy,
    }
    recommended = outlook(interval, **common)
    current = None
    if spec and step_time:
        schedule = Schedule(
            parse_save_every(spec),
            total_steps=i["total_steps"],
            mtbf=mtbf,
            max_overhead=i["max_overhead"],
        )
        if schedule.auto is not None:
            schedule.auto.observe(stall=stall)
        gap = schedule.interval_seconds(step_time)
        if gap is not None:
            current = outlook(gap, **common)
    free = i["free_bytes"]
    return {
        "inputs": i,
        "policy": asdict(policy),
        "rule": rule,
        "clamped_from": clamped,
        "recommended": {"save_every": _spec(recommended), **_outlook_json(recommended, free)},
        "current": None
        if current is None
        else {"save_every": spec, **_outlook_json(current, free)},
        "fits": _fits(recommended, free),
    }


def _seconds(text: str | None, what: str) -> float | None:
    return None if text is None else parse_duration(text, what=what)


def _bytes(text: str | None, what: str) -> int | None:
    return None if text is None else parse_size(text, what=what)


def _plan_inputs(
    directory: Path | None, opts: dict[str, Any]
) -> tuple[dict[str, Any], RetentionPolicy, str | None]:
    """The measured or given numbers, the retention policy and the current schedule."""
    infos: list[CheckpointInfo] = []
    m = None
    events: list[dict[str, Any]] = []
    if directory is not None:
        run_directory(directory, "give a run's folder")
        events = list(read_events(directory))
        m = measured(events)
        infos = checkpoints(directory)
    config = m.config if m else {}
    stall = _seconds(opts["save_time"], "--save-time") or (m.stall if m else None)
    if stall is None:
        raise ConfigError(
            "plan needs the time a save blocks training: pass --save-time (e.g. 12s) or a "
            "run directory that has saved at least once"
        )
    # what the newest checkpoint recorded (integrations learn total_steps after start)
    stored = recorded_options(infos) or Options()
    free = _bytes(opts["free_disk"], "--free-disk")
    if free is None and directory is not None:
        free = shutil.disk_usage(directory).free + sum(i.size for i in infos if i.valid)
    max_overhead = opts["max_overhead"] or DEFAULT_MAX_OVERHEAD
    if not 0 < max_overhead < 1:
        raise ConfigError(f"--max-overhead {max_overhead} must be a share in (0, 1), e.g. 0.02")
    base = run_policy(directory, infos, events=events)
    policy = policy_from_options(base, {k: opts[k] for k in POLICY_KEYS}, required=False)
    inputs = {
        "step_time_s": _seconds(opts["step_time"], "--step-time") or (m and m.step_time),
        "save_time_s": stall,
        "mtbf_s": _seconds(opts["mtbf"], "--mtbf") or stored.mtbf_s or DEFAULT_MTBF_S,
        "total_steps": opts["steps"] or config.get("total_steps") or stored.total_steps,
        "checkpoint_bytes": _bytes(opts["checkpoint_size"], "--checkpoint-size")
        or (m and m.checkpoint_bytes),
        "free_bytes": free,
        "max_overhead": max_overhead,
        "measured_saves": m.saves if m else None,
        "resumes": m.resumes if m else None,
    }
    spec = opts["save_every"] or config.get("save_every") or stored.save_every
    return inputs, policy or RetentionPolicy(), spec


def _fits(o: Outlook, free: int | None) -> bool | None:
    return None if free is None or o.disk_bytes is None else o.disk_bytes <= free


def _spec(o: Outlook) -> str:
    return str(o.steps) if o.steps else f"{o.interval_s:.0f}s"


def _outlook_json(o: Outlook, free: int | None) -> dict[str, Any]:
    return {
        "fits": _fits(o, free),
        "interval_s": o.interval_s,
        "steps": o.steps,
        "overhead": o.overhead,
        "lost_per_failure_s": o.lost_per_failure_s,
        "saves": o.saves,
        "kept": o.kept,
        "disk_bytes": o.disk_bytes,
    }
