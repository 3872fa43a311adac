"""``safepoint plan`` and ``safepoint prune``: when to save and what to keep, from the shell.

Also the retention view that ``safepoint ls`` shows (why each checkpoint is kept, what
the next save would delete).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from safepoint.errors import CheckpointNotFoundError, ConfigError
from safepoint.lock import RunLock
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
from safepoint.records import RunRecord, read_events
from safepoint.retention import (
    Candidate,
    RetentionPolicy,
    next_deletions,
    plan,
    policy_from_json,
)
from safepoint.schedule import Schedule, parse_save_every
from safepoint.store import CheckpointInfo, Store, scan
from safepoint.units import format_duration, format_size, parse_duration, parse_size

# ------------------------------------------------------------------- retention view


def stored_policy(infos: Sequence[CheckpointInfo]) -> RetentionPolicy | None:
    """The retention policy the run used, from its newest manifest that records one."""
    for info in reversed(infos):
        doc = info.manifest.info.get("policy") if info.valid and info.manifest else None
        if isinstance(doc, dict):
            return policy_from_json(doc)
    return None


def _foreign_metrics(info: CheckpointInfo) -> dict[str, float]:
    """Metrics the stock Trainer logged at this checkpoint's step (trainer_state.json)."""
    try:
        state = json.loads((info.path / "trainer_state.json").read_text())
        history = state.get("log_history") or []
    except (OSError, ValueError, AttributeError):
        return {}
    metrics: dict[str, float] = {}
    for entry in history:
        if isinstance(entry, dict) and entry.get("step") == info.step:
            metrics.update(
                {
                    k: float(v)
                    for k, v in entry.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
                }
            )
    return metrics


def retention_view(
    infos: Sequence[CheckpointInfo], policy: RetentionPolicy, *, include_foreign: bool = False
) -> tuple[dict[str, str], list[str], list[str]]:
    """For ``ls`` and ``prune``: why each folder is kept, what the policy deletes now, and
    what the next save would delete (folder names).

    Only valid checkpoints (and foreign ones with ``include_foreign``) are candidates;
    the newest valid safepoint checkpoint is never deleted.
    """
    eligible = [i for i in infos if i.valid or (include_foreign and i.status == "foreign")]
    by_step = {i.step: i for i in eligible}
    candidates = [
        Candidate(i.step, i.size, i.metrics if i.valid else _foreign_metrics(i))
        for i in by_step.values()
    ]
    decision = plan(candidates, policy)
    newest_valid = max((i.step for i in eligible if i.valid), default=None)
    why = {by_step[s].name: ", ".join(r) for s, r in decision.keep.items()}
    delete = [by_step[s].name for s in decision.delete if s != newest_valid]
    if newest_valid is not None and by_step[newest_valid].name not in why:
        why[by_step[newest_valid].name] = "newest valid"
    kept = [c for c in candidates if by_step[c.step].name in why]
    size = max((c.size for c in kept), default=0)
    step = max((c.step for c in kept), default=0) + 1
    nxt = [by_step[s].name for s in next_deletions(kept, policy, step=step, size=size)]
    return why, delete, nxt


def ls_retention(
    infos: Sequence[CheckpointInfo], options: dict[str, Any]
) -> tuple[dict[str, str], list[str], str]:
    """For ``ls``: why each checkpoint is kept, what the next save deletes, and a note."""
    policy = policy_from_options(infos, options, required=False)
    if policy is None:
        return {}, [], ""
    why, delete, nxt = retention_view(infos, policy)
    notes = [f"next save would delete: {', '.join(nxt) if nxt else 'nothing'}"]
    if delete:
        notes.append(f"the policy no longer keeps: {', '.join(delete)} (safepoint prune)")
    return why, nxt, "; ".join(notes)


# ---------------------------------------------------------------------------- prune


def policy_options(f: Any) -> Any:
    for option in reversed(
        [
            click.option("--keep-last", type=click.IntRange(min=1), help="Keep the newest N."),
            click.option("--keep-best", type=click.IntRange(min=0), help="Keep the best K."),
            click.option("--metric", help="Metric that ranks checkpoints (default eval_loss)."),
            click.option("--mode", type=click.Choice(["min", "max"]), help="Lower or higher."),
            click.option("--keep-every", type=click.IntRange(min=1), help="Milestone steps."),
            click.option("--max-disk", help="Byte budget for all checkpoints, e.g. 20GB."),
        ]
    ):
        f = option(f)
    return f


def policy_from_options(
    infos: Sequence[CheckpointInfo], options: dict[str, Any], *, required: bool
) -> RetentionPolicy | None:
    """The policy given on the command line, over the one the run stored."""
    given = {k: v for k, v in options.items() if v is not None}
    if "max_disk" in given:
        given["max_bytes"] = parse_size(given.pop("max_disk"), what="--max-disk")
    base = stored_policy(infos)
    if not given and base is None:
        if required:
            raise ConfigError(
                "no retention policy given and none recorded in the checkpoints; pass "
                "--keep-last N (and/or --keep-best, --keep-every, --max-disk)"
            )
        return None
    doc = {**(asdict(base) if base else {}), **given}
    if given and "keep_last" not in given and base is None:
        doc["keep_last"] = None
    return RetentionPolicy(**doc)


@click.command("prune")
@click.argument("directory", type=click.Path(file_okay=False))
@policy_options
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@click.option(
    "--include-foreign",
    is_flag=True,
    help="Also apply the policy to checkpoint-N folders written by other tools.",
)
def prune_cmd(directory: str, dry_run: bool, include_foreign: bool, **options: Any) -> None:
    """Apply a retention policy to the checkpoints of DIRECTORY.

    Without options, the policy the run recorded in its checkpoints. Refuses while a
    run holds the directory's lock. Incomplete and corrupt folders are never touched.
    """
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: no such directory; give the run's --output-dir")
    infos = [i for i in scan(path) if i.status != "staging"]
    policy = policy_from_options(infos, options, required=True)
    assert policy is not None
    if dry_run:
        _prune_table(path, infos, policy, include_foreign, dry_run=True)
        return
    with RunLock(path):  # a live run prunes by itself; never race it
        infos = [i for i in scan(path) if i.status != "staging"]
        delete = _prune_table(path, infos, policy, include_foreign, dry_run=False)
        store, record = Store(path), RunRecord(path)
        for info in delete:
            store.delete(info, allow_foreign=include_foreign)
            record.event(
                "delete", step=info.step, checkpoint=info.name, bytes=info.size, rule="prune"
            )
    freed = sum(i.size for i in delete)
    click.echo(f"deleted {len(delete)} checkpoint(s), freed {format_size(freed)}")


def _prune_table(
    path: Path,
    infos: list[CheckpointInfo],
    policy: RetentionPolicy,
    include_foreign: bool,
    *,
    dry_run: bool,
) -> list[CheckpointInfo]:
    from rich.console import Console  # only where a table is drawn: ~50 ms to import
    from rich.table import Table

    why, delete, _ = retention_view(infos, policy, include_foreign=include_foreign)
    table = Table(title=f"{path}{' (dry run)' if dry_run else ''}", title_justify="left")
    for col in ("checkpoint", "status", "size", "action"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for i in infos:
        if i.name in delete:
            action = "[red]would delete[/]" if dry_run else "[red]delete[/]"
        elif i.name in why:
            action = f"keep: {why[i.name]}"
        elif i.status == "foreign":
            action = "untouched (foreign; --include-foreign to prune)"
        else:
            action = f"untouched ({i.status})"
        table.add_row(i.name, i.status, format_size(i.size), action)
    Console().print(table)
    gone = [i for i in infos if i.name in delete]
    if dry_run:
        freed = format_size(sum(i.size for i in gone))
        click.echo(f"would delete {len(gone)} checkpoint(s), freeing {freed}")
    return gone


# ----------------------------------------------------------------------------- plan


def _seconds(text: str | None, what: str) -> float | None:
    return None if text is None else parse_duration(text, what=what)


def _bytes(text: str | None, what: str) -> int | None:
    return None if text is None else parse_size(text, what=what)


@click.command("plan")
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--step-time", help="Time per training step, e.g. 0.8s.")
@click.option("--save-time", help="Time training is blocked per save, e.g. 12s.")
@click.option("--mtbf", help="Mean time between failures (default 24h), e.g. 6h.")
@click.option("--steps", type=click.IntRange(min=1), help="Total training steps.")
@click.option("--checkpoint-size", help="Size of one checkpoint, e.g. 2GB.")
@click.option("--free-disk", help="Free space for checkpoints (default: DIR's free space).")
@click.option("--max-overhead", type=float, help="Largest share of the run for saves (0.02).")
@click.option("--save-every", help="Current schedule to compare with (default: the run's).")
@policy_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def plan_cmd(directory: str | None, as_json: bool, **opts: Any) -> None:
    """Recommend save_every and check the retention against the disk.

    Give the numbers (--step-time --save-time --mtbf --steps ...) or a run's DIRECTORY,
    whose recorded measurements fill in what is not given.
    """
    result = make_plan(Path(directory) if directory else None, opts)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        _print_plan(result)


def make_plan(directory: Path | None, opts: dict[str, Any]) -> dict[str, Any]:
    """The numbers ``safepoint plan`` prints, as a JSON-ready dict."""
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
        "keep_last": policy.keep_last,
        "keep_best": policy.keep_best,
        "keep_every": policy.keep_every,
        "max_bytes": policy.max_bytes,
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


def _plan_inputs(
    directory: Path | None, opts: dict[str, Any]
) -> tuple[dict[str, Any], RetentionPolicy, str | None]:
    """The measured or given numbers, the retention policy and the current schedule."""
    infos: list[CheckpointInfo] = []
    m = None
    if directory is not None:
        if not directory.is_dir():
            raise CheckpointNotFoundError(f"{directory}: no such directory; give a run's folder")
        m = measured(read_events(directory))
        infos = [i for i in scan(directory) if i.status != "staging"]
    config = m.config if m else {}
    stall = _seconds(opts["save_time"], "--save-time") or (m.stall if m else None)
    if stall is None:
        raise ConfigError(
            "plan needs the time a save blocks training: pass --save-time (e.g. 12s) or a "
            "run directory that has saved at least once"
        )
    # what the newest checkpoint recorded (integrations learn total_steps after start)
    stored = next((i.manifest.info["policy"] for i in reversed(infos) if _has_policy(i)), {})
    free = _bytes(opts["free_disk"], "--free-disk")
    if free is None and directory is not None:
        free = shutil.disk_usage(directory).free + sum(i.size for i in infos if i.valid)
    max_overhead = opts["max_overhead"] or DEFAULT_MAX_OVERHEAD
    if not 0 < max_overhead < 1:
        raise ConfigError(f"--max-overhead {max_overhead} must be a share in (0, 1), e.g. 0.02")
    policy_opts = {k: opts[k] for k in ("keep_last", "keep_best", "metric", "mode")}
    policy_opts |= {"keep_every": opts["keep_every"], "max_disk": opts["max_disk"]}
    policy = policy_from_options(infos, policy_opts, required=False)
    if policy is None and config:
        policy = _policy_from_config(config)
    inputs = {
        "step_time_s": _seconds(opts["step_time"], "--step-time") or (m and m.step_time),
        "save_time_s": stall,
        "mtbf_s": _seconds(opts["mtbf"], "--mtbf") or stored.get("mtbf_s") or DEFAULT_MTBF_S,
        "total_steps": opts["steps"] or config.get("total_steps") or stored.get("total_steps"),
        "checkpoint_bytes": _bytes(opts["checkpoint_size"], "--checkpoint-size")
        or (m and m.checkpoint_bytes),
        "free_bytes": free,
        "max_overhead": max_overhead,
        "measured_saves": m.saves if m else None,
        "resumes": m.resumes if m else None,
    }
    spec = opts["save_every"] or config.get("save_every") or stored.get("save_every_spec")
    return inputs, policy or RetentionPolicy(), spec


def _fits(o: Outlook, free: int | None) -> bool | None:
    return None if free is None or o.disk_bytes is None else o.disk_bytes <= free


def _has_policy(info: CheckpointInfo) -> bool:
    return bool(info.valid and info.manifest and isinstance(info.manifest.info.get("policy"), dict))


def _policy_from_config(config: dict[str, Any]) -> RetentionPolicy:
    doc = {k: config.get(k) for k in ("keep_last", "keep_every")}
    doc |= {"keep_best": config.get("keep_best") or 0, "max_bytes": config.get("max_disk")}
    doc |= {k: config[k] for k in ("metric", "mode") if config.get(k)}
    return RetentionPolicy(**doc)


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


def _print_plan(r: dict[str, Any]) -> None:
    i = r["inputs"]
    known = [
        f"step {format_duration(i['step_time_s'])}" if i["step_time_s"] else None,
        f"save {format_duration(i['save_time_s'])}",
        f"MTBF {format_duration(i['mtbf_s'])}",
        f"{i['total_steps']} steps" if i["total_steps"] else None,
        f"checkpoint {format_size(i['checkpoint_bytes'])}" if i["checkpoint_bytes"] else None,
        f"{format_size(i['free_bytes'])} free" if i["free_bytes"] is not None else None,
    ]
    click.echo("inputs: " + ", ".join(k for k in known if k))
    from rich.console import Console
    from rich.table import Table

    table = Table(title_justify="left")
    table.add_column("")
    cols = [("recommended", r["recommended"])]
    if r["current"]:
        cols.insert(0, ("current", r["current"]))
    for name, _ in cols:
        table.add_column(name, justify="right")

    def row(label: str, fmt: Any, key: str) -> None:
        table.add_row(label, *(fmt(c[key]) if c[key] is not None else "-" for _, c in cols))

    row("save_every", str, "save_every")
    row("interval", format_duration, "interval_s")
    row("checkpoint overhead", lambda x: f"{x:.2%}", "overhead")
    row("work lost per failure", format_duration, "lost_per_failure_s")
    row("saves in the run", str, "saves")
    row("checkpoints kept", str, "kept")
    row("disk needed", format_size, "disk_bytes")
    Console().print(table)
    click.echo(f"recommended by the {r['rule']}; retention: {_policy_text(r['policy'])}")
    if c := r["clamped_from"]:
        click.echo(
            f"clamped: the {r['rule']} is every {c['steps']} steps "
            f"({format_duration(c['interval_s'])}), longer than the {i['total_steps']}-step "
            "run; save_every is the run's length (one save, at the end)"
        )
    if r["fits"] is False:
        click.echo(
            f"warning: the retention needs {format_size(r['recommended']['disk_bytes'])} but "
            f"{format_size(i['free_bytes'])} is free; lower --keep-last or set --max-disk"
        )


def _policy_text(p: dict[str, Any]) -> str:
    parts = [f"keep_last={p['keep_last']}" if p["keep_last"] else "keep all"]
    if p["keep_best"]:
        parts.append(f"keep_best={p['keep_best']} by {p['metric']} ({p['mode']})")
    if p["keep_every"]:
        parts.append(f"keep_every={p['keep_every']}")
    if p["max_bytes"]:
        parts.append(f"max_disk={format_size(p['max_bytes'])}")
    return ", ".join(parts)


COMMANDS = [plan_cmd, prune_cmd]
