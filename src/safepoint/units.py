"""Parsing of the human units in options: durations ("15m") and sizes ("20GB")."""

from __future__ import annotations

import re

from safepoint.errors import ConfigError

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", re.IGNORECASE)
_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_duration(text: str | float, *, what: str = "duration") -> float:
    """Seconds in ``"30s"``, ``"15m"``, ``"2h"``, ``"1.5d"``, ``"250ms"`` or a number."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION.fullmatch(str(text))
        if not m:
            raise ConfigError(f"{what} {text!r} is not a duration; write e.g. 30s, 15m, 2h")
        seconds = float(m.group(1)) * _SECONDS[(m.group(2) or "s").lower()]
    if seconds <= 0:
        raise ConfigError(f"{what} {text!r} must be longer than zero")
    return seconds


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Bytes in ``"20GB"`` (10^9), ``"20GiB"`` (2^30), ``"500M"``, ``"1024"``."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = _SIZE.fullmatch(str(text))
        if not m:
            raise ConfigError(f"{what} {text!r} is not a size; write e.g. 500MB, 20GB, 1.5TiB")
        unit = (m.group(2) or "").lower()
        base = 1024 if "i" in unit else 1000
        size = int(float(m.group(1)) * base ** _POWERS[unit.rstrip("ib")[:1]])
    if size <= 0:
        raise ConfigError(f"{what} {text!r} must be larger than zero")
    return size


def format_size(n: float) -> str:
    """``1.23 GB`` style (decimal units, as disks are sold and ``df -H`` shows)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Plain-text table lines: columns padded to their widest cell, two spaces apart (the
    chaos reports, which go to logs and CI output as well as to terminals)."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]


# Where a long line breaks, best first: after a clause ("; "), between two fields ("  "),
# before a parenthesis, after a colon; then at any space. Never inside a word: a number,
# a path or a value is never cut.
_BREAKS = tuple(
    re.compile(r) for r in (r"(?<=; )", r"(?<=\S  )(?=\S)", r"(?<= )(?=\()", r"(?<=: )")
)


def wrap_text(text: str, width: int, *, indent: str = "  ") -> list[str]:
    """``text`` as lines of at most ``width`` characters, later lines indented by
    ``indent``, each broken at the best place (see ``_BREAKS``) in the last 40% of its
    room, else at its last space. A word longer than the room (a long path) stays
    whole on a line of its own."""
    lines: list[str] = []
    for part in text.split("\n"):
        rest, room = part, width
        while len(rest) > room:
            cut = _break(rest, room)
            if cut is None:
                break
            lines.append(rest[:cut].rstrip())
            rest, room = indent + rest[cut:].lstrip(), width
        lines.append(rest)
    return lines


def _break(text: str, room: int) -> int | None:
    """Where the line ``text`` ends when it may hold ``room`` characters, or None."""
    body = len(text) - len(text.lstrip())  # an indent is no place to break
    for rule in _BREAKS:
        ends = [m.start() for m in rule.finditer(text, body)]
        fits = [e for e in ends if len(text[:e].rstrip()) <= room and e >= room * 0.6]
        if fits:
            return fits[-1]
    spaces = [m.start() for m in re.finditer(" ", text) if m.start() > body]
    inside = [s for s in spaces if s <= room]
    if inside:
        return inside[-1]
    return spaces[0] if spaces else None
