"""The HTML page of ``safepoint report``: one self-contained document, nothing loaded."""

from __future__ import annotations

import base64
import html
import time
from typing import Any

from safepoint.report import ReportData
from safepoint.units import format_duration, format_size

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1a202c;
margin:0;background:#f7fafc}
main{max-width:1160px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.sub{color:#718096;margin-bottom:16px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:18px}.card span{color:#718096;font-size:12px}
figure{background:#fff;border:1px solid #e2e8f0;border-radius:8px;margin:12px 0;padding:8px}
figure img{width:100%;height:auto;display:block}
table{border-collapse:collapse;background:#fff;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e2e8f0;padding:6px 10px;text-align:left}
th{background:#edf2f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#744210;background:#fefcbf;padding:8px 12px;border-radius:6px}
"""

# Counts the plots that decoded, so a headless browser can tell the page rendered.
_SCRIPT = """
window.addEventListener('error',function(e){document.body.setAttribute('data-error',e.message);});
window.addEventListener('load',function(){var ok=0;
document.querySelectorAll('img.plot').forEach(function(i){if(i.naturalWidth>0)ok++;});
document.body.setAttribute('data-plots-loaded',String(ok));});
"""


_MAX_ROWS = 200


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=n' if i in numeric else ''}>{_esc(c)}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kept_table(data: ReportData) -> str:
    if not data.kept:
        return "<p>No checkpoint on disk.</p>"
    logged = sorted({k for row in data.kept for k in row.metrics})
    # The metrics that choose and judge a checkpoint; the rest (a stock Trainer logs a
    # dozen) go below, else the table scrolled sideways at 1200 px and hid "write".
    names = [k for k in logged if k in ("loss", "eval_loss", data.metric)]
    rest = [k for k in logged if k not in names]
    rows = [
        [
            r.name,
            str(r.step),
            format_size(r.bytes),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created)) if r.created else "-",
            *(f"{r.metrics[k]:.4g}" if k in r.metrics else "-" for k in names),
            ", ".join(r.kept_because) or "-",
            format_duration(r.stall_s) if r.stall_s is not None else "-",
            format_duration(r.write_s) if r.write_s is not None else "-",
        ]
        for r in data.kept
    ]
    headers = ["checkpoint", "step", "size", "saved", *names, "kept because", "stall", "write"]
    table = _table(
        headers, rows, {1, 2, *range(4, 4 + len(names)), len(headers) - 2, len(headers) - 1}
    )
    return table + _other_metrics(data, rest)


def _other_metrics(data: ReportData, names: list[str]) -> str:
    """The other metrics of each checkpoint: a folded section, one row per metric."""
    if not names:
        return ""
    rows = [
        [k, *(f"{r.metrics[k]:.4g}" if k in r.metrics else "-" for r in data.kept)] for k in names
    ]
    headers = ["metric", *(r.name for r in data.kept)]
    return (
        f"<details><summary>Other logged metrics ({len(names)})</summary>"
        + _table(headers, rows, set(range(1, len(headers))))
        + "</details>"
    )


def _cards(data: ReportData) -> str:
    committed = [s for s in data.saves if s.result == "committed"]
    stalls = [s.stall_s for s in committed if s.stall_s is not None]
    last = max((p.step for p in data.train_loss), default=None)
    cards = [
        ("processes", str(data.attempts)),
        ("last step logged", "-" if last is None else str(last)),
        ("restarts", str(len(data.resumes))),
        ("steps lost", str(sum(r.steps_lost or 0 for r in data.resumes))),
        # A stock Trainer's folder has no record of its saves: its checkpoints, not "0".
        ("saves", str(len(committed)))
        if data.source != "trainer_state"
        else ("checkpoints (save times not recorded)", str(len(data.checkpoints))),
        ("training stall, total", format_duration(sum(stalls)) if stalls else "-"),
        ("deleted by retention", str(sum(1 for m in data.checkpoints if m.deleted_by))),
        ("disk now", format_size(data.disk[-1][1]) if data.disk else "-"),
        ("budget", format_size(data.budget) if data.budget else "none"),
    ]
    if data.skipped_saves:
        cards.insert(5, ("saves skipped (writer busy)", str(len(data.skipped_saves))))
    return "".join(
        f"<div class=card><b>{_esc(v)}</b><span>{_esc(k)}</span></div>" for k, v in cards
    )


def _restarts(data: ReportData) -> str:
    if not data.resumes:
        return ""
    rows = [
        [
            str(i + 1),
            r.checkpoint,
            "-" if r.reached is None else str(r.reached),
            "-" if r.steps_lost is None else str(r.steps_lost),
            "; ".join(f"{s.get('checkpoint')}: {s.get('problem')}" for s in r.skipped) or "-",
        ]
        for i, r in enumerate(data.resumes)
    ]
    headers = ["restart", "resumed from", "step reached before", "steps lost", "newer skipped"]
    return "<h2>Restarts</h2>" + _table(headers, rows, {2, 3})


def _events(data: ReportData) -> str:
    rows = [
        [m.name, f"deleted: {m.deleted_by}"] for m in data.checkpoints if m.deleted_by is not None
    ]
    rows += [[str(e.get("signal") or e["event"]), _fields(e)] for e in data.signals]
    rows += [[str(e.get("where", "error")), str(e.get("error", ""))] for e in data.errors]
    if not rows:
        return ""
    if len(rows) > _MAX_ROWS:  # a long run deletes thousands: the newest tell the story
        rows = [[f"... {len(rows) - _MAX_ROWS} earlier", ""], *rows[-_MAX_ROWS:]]
    return "<h2>Deletions, signals and errors</h2>" + _table(["what", "detail"], rows, set())


def _fields(event: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("t", "event"))


def _img(name: str, png: bytes, alt: str) -> str:
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<figure><img class=plot id="plot-{name}" alt="{_esc(alt)}" src="{src}"></figure>'


def _best_by(data: ReportData) -> str:
    """How the best checkpoint is chosen, or that none can be: no metric logged."""
    if any(m.kind == "best" for m in data.checkpoints):
        return f"best by {data.metric} ({data.mode})"
    return f"no best checkpoint: none has {data.metric}"


def html_page(data: ReportData, images: dict[str, bytes]) -> str:
    """One HTML document with everything inline: styles, images as data URIs, tables."""
    alts = {
        "loss": "train and eval loss over steps with checkpoint marks and restarts",
        "saves": "training stall and write time of every save",
        "disk": "disk used by checkpoints over time against the budget",
    }
    notes = "".join(f"<p class=note>{_esc(n)}</p>" for n in data.notes)
    plots = "".join(_img(n, png, alts.get(n, n)) for n, png in images.items())
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width,initial-scale=1">
<title>safepoint report: {_esc(data.directory)}</title><style>{_CSS}</style></head>
<body data-plots-loaded=0><main>
<h1>safepoint report</h1>
<div class=sub>{_esc(data.directory)} &middot; source: {_esc(data.source)} &middot;
{_esc(_best_by(data))} &middot; generated
{_esc(time.strftime("%Y-%m-%d %H:%M:%S"))}</div>
{notes}<div class=cards>{_cards(data)}</div>
{plots}
<h2>Checkpoints on disk</h2>{_kept_table(data)}
{_restarts(data)}{_events(data)}
</main><script>{_SCRIPT}</script></body></html>
"""
