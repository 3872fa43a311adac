"""Shared pieces of the hostile-checkpoint tests: a small run on disk, re-signing a
manifest as an attacker can, and every entry point (ls, verify, prune, restore)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from safepoint import Checkpointer
from safepoint.fileio import hash_file
from safepoint.manifest import MANIFEST_NAME, _self_checksum

CLI_TIMEOUT = 120  # seconds: a hang fails the test instead of blocking the suite


def small_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return {"model": model, "optimizer": opt}


def train_step(state: dict[str, Any]) -> None:
    state["model"](torch.randn(2, 4)).sum().backward()
    state["optimizer"].step()
    state["optimizer"].zero_grad()


def make_run(out: Path | bytes, steps: tuple[int, ...] = (5, 9)) -> dict[int, dict[str, Any]]:
    """Checkpoints at ``steps`` with one training step between them; returns the model
    weights saved at each step."""
    state = small_state()
    saved = {}
    # keep_full=0: every checkpoint stays full, so a fallback can reach the oldest
    with Checkpointer(os.fsdecode(out), save_every="1000", signals=None, keep_full=0) as ckpt:
        for step in steps:
            train_step(state)
            ckpt.save(step, state)
            saved[step] = {k: v.clone() for k, v in state["model"].state_dict().items()}
    return saved


def body(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_NAME).read_bytes())


def sign(folder: Path, doc: dict[str, Any], *, rehash: bool = True) -> None:
    """Write ``doc`` as the manifest of ``folder`` the way an attacker can: the sizes and
    checksums of the listed files as they now are, and a correct self-checksum."""
    doc = dict(doc)
    doc.pop("manifest_checksum", None)
    if rehash:
        for name, entry in doc["files"].items():
            path = folder / name
            if path.is_file():  # follows a link: an attacker signs what it points to
                size, digest = hash_file(os.path.realpath(path))
                entry.update({"size": size, "xxh3_128": digest})
    doc["manifest_checksum"] = _self_checksum(doc)
    (folder / MANIFEST_NAME).write_text(json.dumps(doc, indent=1))


def edit_state(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Change ``state.json`` with ``change(doc)`` (or write what it returns, if bytes),
    then re-sign the manifest."""
    doc = json.loads((folder / "state.json").read_bytes())
    result = change(doc)
    data = result if isinstance(result, bytes) else json.dumps(doc).encode()
    (folder / "state.json").write_bytes(data)
    sign(folder, body(folder))


def cli(*args: str | os.PathLike[str] | bytes) -> subprocess.CompletedProcess[bytes]:
    """Run ``safepoint ARGS`` as a real process, with a deadline."""
    return subprocess.run(
        [sys.executable, "-m", "safepoint", *map(os.fsencode, args)],
        capture_output=True,
        timeout=CLI_TIMEOUT,
    )


def no_traceback(proc: subprocess.CompletedProcess[bytes]) -> str:
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert "Traceback" not in out, out
    return out


def ls_json(out: Path | bytes) -> dict[str, dict[str, Any]]:
    proc = cli("ls", out, "--json")
    text = no_traceback(proc)
    assert proc.returncode == 0, text
    return {i["name"]: i for i in json.loads(proc.stdout)}


def check_entry_points(
    out: Path, bad: str, reason: str, *, good: int = 5, caplog: Any = None
) -> None:
    """The hostile checkpoint ``bad`` is corrupt in ``ls --json`` (saying ``reason``),
    ``verify`` exits 1 saying it, ``restore`` falls back to ``checkpoint-<good>`` and says
    which and why, and ``prune`` neither crashes nor touches it."""
    infos = ls_json(out)
    assert infos[bad]["status"] == "corrupt", infos[bad]
    assert any(reason in p for p in infos[bad]["problems"]), infos[bad]["problems"]
    assert infos[f"checkpoint-{good}"]["status"] in ("valid", "complete")

    proc = cli("verify", out)
    text = no_traceback(proc)
    assert proc.returncode == 1, text
    assert reason in text, text

    restore_falls_back(out, bad, good, reason, caplog)

    proc = cli("prune", out, "--keep-last", "1")
    no_traceback(proc)
    assert os.path.lexists(out / bad)  # a corrupt folder is never retention's to delete


def restore_falls_back(out: Path, bad: str, good: int, reason: str, caplog: Any) -> None:
    state = small_state(seed=123)
    with (
        caplog.at_level(logging.WARNING, logger="safepoint"),
        Checkpointer(out, signals=None) as ckpt,
    ):
        assert ckpt.restore(state) == good
    said = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert any(reason in m for m in said), said
    caplog.clear()
