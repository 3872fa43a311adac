"""Drawing of ``safepoint report``: ``ReportData`` to PNG panels, written with its page.

Only presentation lives here; every number drawn comes from ``safepoint.report.extract``.
The HTML page (``safepoint.report_html``) embeds these images as ``data:`` URIs and
loads nothing from the network.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safepoint.errors import ConfigError
from safepoint.report import Point, ReportData
from safepoint.report_html import html_page
from safepoint.units import format_size

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PNG_NAME = "report.png"
HTML_NAME = "report.html"

TRAIN_COLOR = "#2b6cb0"
EVAL_COLOR = "#dd6b20"
REDONE_COLOR = "#f6ad55"
STALL_COLOR = "#c53030"
WRITE_COLOR = "#63b3ed"
DISK_COLOR = "#38a169"
MARK_STYLE: dict[str, dict[str, Any]] = {
    "kept": {"marker": "o", "color": "#2f855a", "s": 46, "label": "kept checkpoint"},
    "deleted": {"marker": "x", "color": "#a0aec0", "s": 40, "label": "deleted by retention"},
    "best": {"marker": "*", "color": "#d69e2e", "s": 190, "label": "best checkpoint"},
    "emergency": {"marker": "D", "color": "#e53e3e", "s": 52, "label": "emergency save"},
}


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError(
            "safepoint report draws with matplotlib, which is not installed; "
            "run `pip install 'safepoint[report]'`"
        ) from e
    return plt


def _style(ax: Axes, title: str) -> None:
    ax.set_title(title, loc="left", fontsize=12, fontweight="bold", color="#1a202c")
    ax.grid(True, color="#e2e8f0", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#a0aec0")
    ax.tick_params(colors="#4a5568", labelsize=9)


def _legend(ax: Axes, *, ncol: int) -> None:
    # Above the plot, right of the title: never over the data.
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False, ncol=ncol)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#718096", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


# ----------------------------------------------------------------------------- panels


def draw_loss(ax: Axes, data: ReportData) -> None:
    """Train and eval loss over steps, checkpoint marks, resume points, redone steps."""
    from matplotlib.ticker import MaxNLocator

    _style(ax, "Loss, checkpoints and restarts")
    if not data.train_loss and not data.eval_loss and not data.checkpoints:
        _empty(ax, "no metrics recorded yet")
        return
    first = min((p.attempt for p in data.train_loss), default=0)
    for attempt in sorted({p.attempt for p in data.train_loss}):
        pts = [p for p in data.train_loss if p.attempt == attempt]
        ax.plot(
            *_joined(data, attempt, pts),
            color=TRAIN_COLOR,
            linewidth=1.4,
            alpha=0.9,
            label="train loss" if attempt == first else None,
        )
    if data.eval_loss:
        ax.plot(
            [p.step for p in data.eval_loss],
            [p.value for p in data.eval_loss],
            color=EVAL_COLOR,
            linewidth=1.6,
            marker="o",
            markersize=2.5,
            label="eval loss",
        )
    values = [p.value for p in (*data.train_loss, *data.eval_loss)]
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")
    for i, r in enumerate(data.resumes):
        if r.reached is not None and r.reached > r.step:
            ax.axvspan(
                r.step,
                r.reached,
                color=REDONE_COLOR,
                alpha=0.28,
                linewidth=0,
                label="steps redone after a restart" if i == 0 else None,
            )
        ax.axvline(r.step, color="#805ad5", linestyle="--", linewidth=1.1)
        lost = "?" if r.steps_lost is None else str(r.steps_lost)
        ax.annotate(
            f"restart {i + 1}: from {r.checkpoint}\n{lost} steps lost",
            xy=(r.step, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(4, -4),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="#553c9a",
        )
    _draw_marks(ax, data)
    ax.set_xlabel("step", color="#4a5568")
    ax.set_ylabel("loss", color="#4a5568")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(ax, ncol=4)


def _joined(data: ReportData, attempt: int, pts: list[Point]) -> tuple[list[int], list[float]]:
    """The points of one process, starting at the value it resumed from (no gap)."""
    resume = next((r for r in data.resumes if r.attempt == attempt), None)
    if resume is not None:
        before = [p for p in data.train_loss if p.attempt < attempt and p.step == resume.step]
        pts = before[-1:] + pts
    return [p.step for p in pts], [p.value for p in pts]


def _draw_marks(ax: Axes, data: ReportData) -> None:
    from matplotlib.transforms import blended_transform_factory

    rug = blended_transform_factory(ax.transData, ax.transAxes)
    for kind, style in MARK_STYLE.items():
        marks = [m for m in data.checkpoints if m.kind == kind]
        if not marks:
            continue
        style = dict(style)
        label = style.pop("label")
        on_curve = [m for m in marks if m.y is not None]
        off_curve = [m for m in marks if m.y is None]
        if on_curve:
            ax.scatter(
                [m.step for m in on_curve],
                [m.y for m in on_curve],
                zorder=5,
                label=label,
                edgecolors="white" if style["marker"] != "x" else None,
                linewidths=0.6 if style["marker"] != "x" else 1.6,
                **style,
            )
        if off_curve:
            ax.scatter(
                [m.step for m in off_curve],
                [0.03] * len(off_curve),
                transform=rug,
                zorder=5,
                clip_on=False,
                label=None if on_curve else label,
                **style,
            )


def _time_unit(seconds: list[float]) -> tuple[float, str]:
    span = max(seconds, default=0.0)
    if span >= 7200:
        return 3600.0, "h"
    if span >= 120:
        return 60.0, "min"
    return 1.0, "s"


def _size_unit(values: list[float]) -> tuple[float, str]:
    top = max(values, default=0.0)
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if top >= scale:
            return scale, unit
    return 1.0, "B"


def draw_saves(ax: Axes, data: ReportData) -> None:
    """Training stall and background write time of every save, in save order."""
    _style(ax, "Time per save: training stall vs. write")
    saves = data.saves
    if not saves:
        _empty(ax, "no save timings recorded" + (" (stock Trainer)" if data.notes else ""))
        return
    times = [s.stall_s or 0.0 for s in saves] + [s.write_s or 0.0 for s in saves]
    scale, unit = (1e-3, "ms") if max(times) < 1 else (1.0, "s")
    xs = range(len(saves))
    width = 0.4
    ax.bar(
        [x - width / 2 for x in xs],
        [(s.stall_s or 0.0) / scale for s in saves],
        width,
        color=STALL_COLOR,
        label="training stalled",
    )
    ax.bar(
        [x + width / 2 for x in xs],
        [(s.write_s or 0.0) / scale for s in saves],
        width,
        color=WRITE_COLOR,
        label="write + commit",
    )
    for x, s in zip(xs, saves, strict=True):
        if s.result != "committed":
            ax.annotate(s.result, (x, 0), ha="center", va="bottom", fontsize=7, color="#c53030")
    every = max(1, len(saves) // 24)
    ax.set_xticks(list(xs)[::every])
    ax.set_xticklabels(
        [f"{s.step}{'!' if 'emergency' in s.reason.lower() else ''}" for s in saves][::every]
    )
    ax.set_xlabel("save (step; ! = emergency)", color="#4a5568")
    ax.set_ylabel(unit, color="#4a5568")
    _legend(ax, ncol=2)


def draw_disk(ax: Axes, data: ReportData) -> None:
    """Bytes of all checkpoints over the run's wall-clock time, against the budget."""
    _style(ax, "Disk used by checkpoints")
    if not data.disk:
        _empty(ax, "no disk history recorded" + (" (stock Trainer)" if data.notes else ""))
        return
    ts = [t for t, _ in data.disk]
    tscale, tunit = _time_unit(ts)
    values = [b for _, b in data.disk] + ([data.budget] if data.budget else [])
    bscale, bunit = _size_unit([float(v) for v in values])
    xs = [t / tscale for t in ts]
    ys = [b / bscale for _, b in data.disk]
    ax.step(xs, ys, where="post", color=DISK_COLOR, linewidth=1.6, label="checkpoints on disk")
    ax.fill_between(xs, ys, step="post", color=DISK_COLOR, alpha=0.15)
    if data.budget:
        ax.axhline(
            data.budget / bscale,
            color="#c53030",
            linestyle="--",
            linewidth=1.2,
            label=f"budget {format_size(data.budget)}",
        )
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"wall-clock time since the run began ({tunit})", color="#4a5568")
    ax.set_ylabel(bunit, color="#4a5568")
    _legend(ax, ncol=2)


PANELS: dict[str, tuple[Callable[[Axes, ReportData], None], float]] = {
    "loss": (draw_loss, 4.2),
    "saves": (draw_saves, 2.4),
    "disk": (draw_disk, 2.4),
}


# ----------------------------------------------------------------------------- output


def figure(data: ReportData, panels: tuple[str, ...] = tuple(PANELS)) -> Figure:
    """A figure with ``panels`` stacked, sharing nothing but the width."""
    plt = _pyplot()
    heights = [PANELS[p][1] for p in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(11, sum(heights) + 0.3 * len(panels)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, name in zip(axes[:, 0], panels, strict=True):
        PANELS[name][0](ax, data)
    fig.tight_layout(h_pad=1.6)
    return fig


def png_bytes(data: ReportData, panels: tuple[str, ...] = tuple(PANELS), dpi: int = 110) -> bytes:
    plt = _pyplot()
    fig = figure(data, panels)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    finally:
        plt.close(fig)
    return buf.getvalue()


def panels_for(data: ReportData) -> tuple[str, ...]:
    """The panels worth drawing: a stock Trainer directory has no save timings or disk
    history, so its picture is the loss panel alone (the page says why)."""
    if data.source == "trainer_state" and not data.saves and not data.disk:
        return ("loss",)
    return tuple(PANELS)


def write_report(data: ReportData, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.png`` and ``report.html`` into ``out``; return their paths."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        panels = panels_for(data)
        png = out / PNG_NAME
        png.write_bytes(png_bytes(data, panels))
        images = {name: png_bytes(data, (name,)) for name in panels}
        page = out / HTML_NAME
        page.write_text(html_page(data, images), encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            f"cannot write the report into {out} ({e.strerror}); choose another --out"
        ) from e
    return {"png": png, "html": page}
