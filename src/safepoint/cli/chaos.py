"""``safepoint chaos``: crash-test a training command (the harness: ``safepoint.app.chaos``,
``chaos_events`` for ``--file-events``, ``chaos_powercut`` for ``--power-cut``)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import click

from safepoint.app.chaos import check_command, make_workdir, parse_modes, random_kills
from safepoint.app.chaos_events import file_events as run_file_events
from safepoint.app.chaos_events import parse_points
from safepoint.app.chaos_process import end_all
from safepoint.signals import STOP_EXIT_CODE
from safepoint.units import parse_duration, wrap_text


@click.command(
    "chaos",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--kills",
    default=5,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="How many times to kill the run.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the kill instants.")
@click.option(
    "--compare",
    "pattern",
    help="Artifact to compare, e.g. '{out}/checkpoint-*/adapter_model.safetensors' (the "
    "last match); default: the newest checkpoint's tensor files.",
)
@click.option("--signals", "use_signals", is_flag=True, help="Every other kill is a SIGTERM.")
@click.option(
    "--file-events",
    is_flag=True,
    help="Crash at every file event of the run's saves instead of at random instants.",
)
@click.option(
    "--modes",
    default="kill,torn,term",
    show_default=True,
    help="With --file-events: kill (SIGKILL before the event), torn (half a write, then "
    "SIGKILL), term (SIGTERM at the event, SIGKILL after --grace).",
)
@click.option(
    "--sample",
    type=click.IntRange(1, None),
    help="With --file-events: K points per mode spread evenly over the events (default all); "
    "with --power-cut: K cut points.",
)
@click.option(
    "--points",
    "points_text",
    help="With --file-events: only these event numbers, e.g. 58-274 or 3,7,10-12.",
)
@click.option(
    "--jobs",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="With --file-events: crash points run at a time (each is two runs, one after the "
    "other); with --power-cut: reruns at a time. Each run gets its share of the cores "
    "(OMP_NUM_THREADS, unless set).",
)
@click.option(
    "--cold",
    is_flag=True,
    help="With --file-events or --power-cut: start every run as a fresh process. By default "
    "a Python command's runs are forked from one that has imported torch and transformers (2-3x "
    "faster; they share its hash seed).",
)
@click.option(
    "--grace",
    "grace_text",
    default="10s",
    show_default=True,
    help="With --file-events: SIGKILL this long after a SIGTERM.",
)
@click.option(
    "--power-cut",
    is_flag=True,
    help="Cut the power (a FUSE file system that forgets what was not fsync'ed) before "
    "every file event of the run (--sample K of them) and at --kills random instants; "
    "needs fuse3 and safepoint[chaos].",
)
@click.option(
    "--samples",
    default=1,
    show_default=True,
    type=click.IntRange(0, 100),
    help="With --power-cut: reordered samples per cut, besides the strict one.",
)
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep both runs here.")
@click.option("--timeout", "timeout_text", help="Per run (default: 3x the first run + 60s).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def chaos_cmd(
    kills: int,
    seed: int,
    pattern: str | None,
    use_signals: bool,
    file_events: bool,
    modes: str,
    sample: int | None,
    points_text: str | None,
    jobs: int,
    cold: bool,
    grace_text: str,
    power_cut: bool,
    samples: int,
    workdir: str | None,
    timeout_text: str | None,
    command: tuple[str, ...],
) -> int:
    """Crash-test COMMAND: kill it at random instants, resume it, compare the results.

    Put {out} where COMMAND takes its output directory, e.g.

    \b
        safepoint chaos --kills 5 -- safepoint train --max-steps 30 --output-dir {out}

    Exit code 0: every resume worked and the results are the same; 1 otherwise; 3 when
    stopped by SIGTERM or SIGINT (its runs ended, its temporary folder removed).
    """
    check_command(command)
    # Every check before the first directory is made: a refused command leaves nothing.
    limit = None if timeout_text is None else parse_duration(timeout_text, what="--timeout")
    mode_list = parse_modes(modes) if file_events and not power_cut else []
    grace = parse_duration(grace_text, what="--grace") if file_events and not power_cut else 0.0
    only = parse_points(points_text) if points_text and file_events and not power_cut else None
    work = make_workdir(workdir)
    try:
        with _stop_signals():
            ok, kept = _run(
                command,
                work,
                kills,
                seed,
                pattern,
                use_signals,
                file_events,
                mode_list,
                sample,
                only,
                jobs,
                cold,
                grace,
                power_cut,
                samples,
                limit,
            )
    except _Stopped as e:
        # Its runs go with it (a forked one would train on, an orphan), and a temporary
        # folder of its own: nothing of a stopped chaos run is left but --workdir.
        end_all()
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        where = f"kept {work}" if workdir else f"removed {work}"
        _say(f"chaos: stopped by {e.name}; ended its runs and {where}", err=True)
        return STOP_EXIT_CODE
    # A passed run's own temporary folder goes, a failed one's stays.
    click.echo(f"chaos: {'PASS' if ok else 'FAIL'}")
    if ok and workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    elif not ok:
        _say(f"chaos: {kept} kept in {work}")
    return 0 if ok else 1


class _Stopped(BaseException):  # not an Exception: no "except Exception" may hold it
    """SIGTERM or SIGINT arrived: unwind to ``chaos_cmd``, which ends the runs."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise ``_Stopped`` in the main thread (once: a second one while
    the runs are ended is ignored); the previous handlers come back after."""

    def stop(signum: int, _frame: object) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        end_all(reap=False)  # now: threads waiting on a run (--jobs) must not wait on
        raise _Stopped(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(
    command: tuple[str, ...],
    work: Path,
    kills: int,
    seed: int,
    pattern: str | None,
    use_signals: bool,
    file_events: bool,
    mode_list: list[str],
    sample: int | None,
    only: set[int] | None,
    jobs: int,
    cold: bool,
    grace: float,
    power_cut: bool,
    samples: int,
    limit: float | None,
) -> tuple[bool, str]:
    """The chaos run of the mode asked: (passed, what a failure keeps)."""
    if power_cut:
        from safepoint.app.chaos_powercut import power_cut as run_power_cut

        ok = run_power_cut(
            command,
            work,
            k=sample,
            samples=samples,
            kills=kills,
            seed=seed,
            timeout=limit,
            pattern=pattern,
            jobs=jobs,
            warm=not cold,
            echo=_say,
        )
        kept = "runs, failed surviving states and logs"
    elif file_events:
        ok = run_file_events(
            command,
            work,
            modes=mode_list,
            k=sample,
            grace=grace,
            timeout=limit,
            pattern=pattern,
            only=only,
            jobs=jobs,
            warm=not cold,
            echo=_say,
        )
        kept = "runs and logs"
    else:
        ok = random_kills(
            command,
            work,
            kills=kills,
            seed=seed,
            use_signals=use_signals,
            timeout=limit,
            pattern=pattern,
            echo=_say,
        )
        kept = "both runs"
    return ok, kept


def _say(text: str, *, err: bool = False) -> None:
    """One of chaos's lines, broken to fit 80 columns (a long path, a failure's reason;
    a table row's last column goes whole onto the next line), never cut."""
    for line in wrap_text(text, 80):
        click.echo(line, err=err)


COMMANDS = [chaos_cmd]
