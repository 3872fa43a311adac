"""Comparing the final artifacts of two runs, for every mode of ``safepoint chaos``.

By default the tensor files of each run's newest checkpoint; with ``--compare`` the last
match of a pattern (``{out}`` stands for the run's output directory), a file or every
file of a folder. Files are equal when their bytes are, or, for safetensors files, when
their tensors are.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any

from safepoint.validity import latest_checkpoint


def _natural(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def _artifacts(pattern: str | None, out: Path) -> dict[str, Path]:
    """Relative name -> file of the artifact(s) to compare in one run's output."""
    if pattern is None:
        newest = latest_checkpoint(out) if out.is_dir() else None
        if newest is None:
            return {}
        return {p.name: p for p in sorted(newest.glob("*.safetensors"))}
    matches = sorted(glob.glob(pattern.replace("{out}", str(out))), key=_natural)
    if not matches:
        return {}
    last = Path(matches[-1])
    files = sorted(p for p in last.rglob("*") if p.is_file()) if last.is_dir() else [last]
    return {_relative(f, out): f for f in files}


def _relative(path: Path, out: Path) -> str:
    # checkpoint-40/x and checkpoint-40/x of the two runs are the same artifact
    try:
        rel = path.relative_to(out)
    except ValueError:
        return path.name
    return str(Path(*rel.parts[1:]) if len(rel.parts) > 1 else rel)


def same_file(a: Path, b: Path) -> tuple[bool, str]:
    """(equal, how): bytes, else tensors for safetensors files."""
    if a.read_bytes() == b.read_bytes():
        return True, "identical bytes"
    if a.suffix == ".safetensors" and b.suffix == ".safetensors":
        import torch
        from safetensors.torch import load_file

        try:
            ta, tb = load_file(str(a)), load_file(str(b))
        except Exception as e:  # a damaged artifact is a difference, not a crash
            return False, f"unreadable ({e})"
        if ta.keys() != tb.keys():
            return False, "different tensor names"
        diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
        if not diff:
            return True, "identical tensors"
        worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in diff)
        return False, (
            f"{len(diff)} of {len(ta)} tensors differ (e.g. {diff[0]}; max abs diff {worst:.3g})"
        )
    return False, "bytes differ"


def compare(pattern: str | None, ref: Path, run: Path) -> tuple[bool, list[str]]:
    """Compare the final artifacts of the two runs; (all equal, lines to print)."""
    want, got = _artifacts(pattern, ref), _artifacts(pattern, run)
    what = pattern or "the newest checkpoint's *.safetensors"
    if not want:
        return False, [f"compare: nothing matches {what} in the uninterrupted run {ref}"]
    lines, ok = [], True
    for name, a in want.items():
        b = got.get(name)
        if b is None:
            ok = False
            lines.append(f"compare {name}: missing in the chaos run")
            continue
        equal, how = same_file(a, b)
        ok = ok and equal
        lines.append(f"compare {name}: {'same' if equal else 'DIFFERENT'} ({how})")
    return ok, lines
