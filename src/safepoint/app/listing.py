"""What ``safepoint ls`` shows: the checkpoints of a directory as JSON rows or as a table
that fits the terminal, with why each one is kept and what the next save deletes.

``train`` shows the same table after training (``render_listing``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safepoint.app.runs import policy_from_options, retention_view, run_directory, run_policy
from safepoint.records import save_timings
from safepoint.remote import upload_states
from safepoint.units import format_duration, format_size, wrap_text
from safepoint.validity import Aside, CheckpointInfo, aside_folders, scan

if TYPE_CHECKING:
    # rich is imported where a table is drawn: `ls --json` and `verify` skip its ~50 ms
    from rich.table import Table

_STYLE = {
    "valid": "green",
    "complete": "green",
    "corrupt": "bold red",
    "incomplete": "yellow",
    "foreign": "cyan",
    "staging": "magenta",
}


def shown_status(info: CheckpointInfo, *, verified: bool) -> str:
    """The state a command may claim: ``valid`` only after re-hashing every file.

    ``ls`` checks the manifest and the file sizes, not the checksums, so a checkpoint
    that passes says ``complete``; ``verify`` (and resume) prove ``valid``.
    """
    return "complete" if info.status == "valid" and not verified else info.status


def info_json(info: CheckpointInfo, *, verified: bool) -> dict[str, object]:
    """The JSON form of one checkpoint in ``ls --json`` and ``verify --json``."""
    m = info.manifest
    return {
        "name": info.name,
        "path": str(info.path),
        "step": info.step,
        "status": shown_status(info, verified=verified),
        "kind": ("thin" if info.thin else "full") if info.valid else None,
        "problems": list(info.problems),
        "size": info.size,
        "created": m.created if m else None,
        "reason": m.reason if m else None,
        "metrics": info.metrics,
        "info": m.info if m else {},
        "extra_files": list(info.extra_files),
    }


@dataclass
class Listing:
    """The facts ``ls`` shows about one directory."""

    directory: str
    """As the user gave it (the table's title)."""
    infos: list[CheckpointInfo]
    why: dict[str, str]
    """Folder name -> why the retention policy keeps it."""
    next_deletes: list[str]
    """Folder names the next save would delete."""
    note: str
    """The retention note printed below the table ('' without a policy)."""
    timings: dict[int, dict[str, Any]]
    uploads: dict[str, str]
    """Folder name -> upload state; empty unless the run has a remote mirror."""
    ranked: str | None
    """The metric checkpoints are ranked by: its column comes first."""
    aside: list[Aside] = field(default_factory=list)
    """Folders the store set aside: superseded lines of the run, damaged checkpoints."""


def list_run(directory: str, options: Mapping[str, Any] | None = None) -> Listing:
    """The listing of ``directory``; ``options`` are ``--keep-last``... given on the
    command line (None values: not given) over the policy the run used."""
    options = options or {}
    infos = scan(run_directory(directory, "give the run's --output-dir"))
    base = run_policy(Path(directory), infos)
    policy = policy_from_options(base, options, required=False)
    why: dict[str, str] = {}
    nxt: list[str] = []
    note = ""
    if policy is not None:
        why, delete, nxt = retention_view(infos, policy)
        notes = [f"next save would delete: {', '.join(nxt) if nxt else 'nothing'}"]
        if delete:
            notes.append(f"the policy no longer keeps: {', '.join(delete)} (safepoint prune)")
        note = "; ".join(notes)
    return Listing(
        directory,
        infos,
        why,
        nxt,
        note,
        save_timings(directory),
        upload_states(directory),
        options.get("metric") or (base.metric if base else None),
        aside_folders(directory),
    )


_ASIDE_WHY = {
    "superseded": "another line (a resume went back)",
    "corrupt": "damaged; its step was saved anew",
    "incomplete": "never committed; saved anew",
    "foreign": "another tool's; its step saved anew",
}


def aside_lines(listing: Listing) -> list[str]:
    """The lines below the table that name each folder set aside, and why."""
    if not listing.aside:
        return []
    lines = ["set aside (never resumed from; delete them when no longer needed):"]
    for a in listing.aside:
        lines.append(f"  {a.path.name}: {_ASIDE_WHY.get(a.why, a.why)}")
    return lines


def listing_json(listing: Listing) -> list[dict[str, Any]]:
    """The rows of ``ls --json``."""
    uploads = listing.uploads
    return [
        {
            **info_json(i, verified=False),
            **_timing(i, listing.timings),
            "kept_because": listing.why.get(i.name),
            "next_deletes": i.name in listing.next_deletes,
            "remote": uploads.get(i.name, "local only") if uploads else None,
        }
        for i in listing.infos
    ] + [
        {"name": a.path.name, "step": a.step, "status": "set aside", "why": a.why}
        for a in listing.aside
    ]


@dataclass
class Page:
    """The ``ls`` table as printed: a title line, the table in a console of ``width``
    columns, then the lines below it."""

    title: str
    table: Table | None = None
    width: int = 0
    after: list[str] = field(default_factory=list)


def render_listing(listing: Listing, *, width: int | None) -> Page:
    """The listing as a page that fits ``width`` columns (None: every column)."""
    infos = listing.infos
    if not infos:
        after = _fitted(aside_lines(listing), width)
        return Page(f"{listing.directory}: no checkpoints yet", after=after)
    columns = _ls_columns(listing)
    shown, fitted = _fit(columns, width)
    after = []
    # Problems must not vanish with the note column: then they follow the table.
    if not any(c.header == "note" and not c.metric for c in shown):
        after += [f"{i.name}: {'; '.join(i.problems)}" for i in infos if i.problems]
    if listing.note:
        after.append(listing.note)
    after += aside_lines(listing)
    return Page(str(listing.directory), _table(shown), fitted, _fitted(after, width))


def _fitted(lines: list[str], width: int | None) -> list[str]:
    """The lines below the table fitted to ``width`` too: broken at a clause or a space,
    never inside a name or a number (None: as they are)."""
    return lines if width is None else [part for t in lines for part in wrap_text(t, width)]


# ------------------------------------------------------------------ the ls table


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _timing(info: CheckpointInfo, timings: dict[int, dict[str, Any]]) -> dict[str, float | None]:
    """Training stall and write time of a save: from the run record, else the manifest."""
    event = timings.get(info.step, {}) if info.valid else {}
    saved = info.manifest.info if info.manifest else {}
    return {
        k: v if isinstance(v := event.get(k, saved.get(k)), (int, float)) else None
        for k in ("stall_s", "write_s")
    }


@dataclass(eq=False)
class _Column:
    header: str
    cells: list[str]  # rich markup
    right: bool = False
    give_way: int = 0
    """Order in which the column gives way to a narrow terminal (1 first; 0 never)."""
    metric: bool = False


def _ls_columns(listing: Listing) -> list[_Column]:
    """Every column of the ``ls`` table, in display order. The metric checkpoints are
    ranked by comes first and stays longest."""
    infos, why, uploads, ranked = listing.infos, listing.why, listing.uploads, listing.ranked
    metric_names = sorted({k for i in infos for k in i.metrics}, key=lambda k: (k != ranked, k))
    times = [_timing(i, listing.timings) for i in infos]

    def dur(key: str) -> list[str]:
        return ["-" if t[key] is None else format_duration(t[key]) for t in times]

    def state(i: CheckpointInfo) -> str:
        text = shown_status(i, verified=False)
        remote = f", {uploads.get(i.name, 'local only')}" if uploads and i.valid else ""
        # full (resumable) is the rule and says nothing more; thin (keep_full: weights,
        # configs, trainer state; exported, never resumed from) says so
        thin = ", [cyan]thin[/]" if i.thin else ""
        return f"[{_STYLE[text]}]{text}[/]{thin}{remote}"

    # Give-way order, least useful first: the write and stall times (the report has
    # them), the note (problems then print below the table), the save time, the
    # metrics (the first one last), why kept, the size, the state.
    metrics = [
        _Column(k, [f"{i.metrics[k]:.4g}" if k in i.metrics else "-" for i in infos], True, 6, True)
        for k in metric_names
    ]
    if metrics:
        metrics[0].give_way = 7
    return [
        _Column("checkpoint", [i.name for i in infos]),
        _Column("step", [str(i.step) for i in infos], right=True),
        _Column("saved", [_when(i.created) for i in infos], True, 5),
        _Column("size", [format_size(i.size) for i in infos], True, 9),
        _Column("stall", dur("stall_s"), True, 3),
        _Column("write", dur("write_s"), True, 2),
        *metrics,
        _Column("state", [state(i) for i in infos], give_way=10),
        _Column("kept", [why.get(i.name, "") for i in infos], give_way=8),
        _Column(
            "note",
            ["; ".join(i.problems) or (i.manifest.reason if i.manifest else "") for i in infos],
            give_way=4,
        ),
    ]


def _table(columns: list[_Column]) -> Table:
    from rich.table import Table

    table = Table()
    for c in columns:
        table.add_column(c.header, justify="right" if c.right else "left", no_wrap=True)
    for row in zip(*(c.cells for c in columns), strict=True):
        table.add_row(*row)
    return table


def _fit(columns: list[_Column], width: int | None) -> tuple[list[_Column], int]:
    """The columns that fit in ``width`` without cutting a cell, and the console width to
    print them in.

    First the save time is shortened to month-day hour:minute, then whole columns give
    way in their order; a column dropped on the way comes back if it fits in the room
    left. The checkpoint name and step always stay.
    """

    def natural(cols: list[_Column]) -> int:
        # rich's default table: one space of padding each side, a rule between columns
        # and at both edges (its own measure() overestimates by a few columns)
        return 1 + sum(3 + max(map(_cell_len, (c.header, *c.cells))) for c in cols)

    shown = list(columns)
    if width is not None and natural(shown) > width:
        saved = next(c for c in shown if c.header == "saved" and not c.metric)
        saved.cells = [_short_time(cell) for cell in saved.cells]
        for rank in sorted({c.give_way for c in columns} - {0}):
            if natural(shown) <= width:
                break
            shown = [c for c in shown if c.give_way != rank]
        dropped = [c for c in columns if c not in shown]
        for back in sorted(dropped, key=lambda c: -c.give_way):  # stable: display order
            wider = [c for c in columns if c in shown or c is back]
            if natural(wider) <= width:
                shown = wider
    # Never squeezed: piped output and --wide keep their natural width.
    return shown, max(natural(shown), width or 0)


def _cell_len(markup: str) -> int:
    from rich.text import Text

    return Text.from_markup(markup).cell_len


def _short_time(cell: str) -> str:
    """``2024-06-12 14:03:05`` as ``06-12 14:03``."""
    return cell[5:16] if len(cell) == 19 else cell
