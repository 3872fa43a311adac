"""A sharded save: every rank writes its own pieces into one staging folder, rank 0
writes the index and the manifest once all of them are durable, then commits.

The commit protocol is unchanged; only step 2 is shared::

    rank 0                        every rank                       rank 0
    1. mkdir staging  ──name──▶   2. write + fsync own pieces ──▶  3. shards.json,
                                     report sizes, checksums,         state.json,
                                     pieces (or the error)            manifest, fsync,
                                                                      rename, fsync
    ◀────────────────────────── outcome (committed, or why not) ─────────────────

A full disk (or EIO) on any rank fails the attempt on every rank alike; the saver then
frees what retention would delete anyway, on rank 0, and all ranks retry once together.
A rank that dies inside the save never reports: the others wait in the collective
until the launcher (torchrun) takes the job down, and the staging folder was never
renamed, so the checkpoints before it are what a rerun resumes from. A rank whose write
fails reports its error: rank 0 removes the staging folder and every rank raises the
same ``SaveFailedError``, so that ``on_save_error`` decides the same everywhere.
Only JSON crosses between the processes (``Ranks.broadcast_json``/``gather_json``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safepoint.disk import is_recoverable
from safepoint.distributed import Ranks
from safepoint.engine.saver import PendingSave, Saver
from safepoint.errors import SaveFailedError
from safepoint.fileio import dumps_json
from safepoint.manifest import FileEntry, Parent
from safepoint.sharding import SHARDS_NAME, build_index, shard_file
from safepoint.snapshot import Snapshot
from safepoint.store import Store
from safepoint.validity import CheckpointInfo

Finish = Callable[[Path, dict[str, FileEntry]], CheckpointInfo]


def save_sharded(saver: Saver, ranks: Ranks, snapshot: Snapshot, *, started: float) -> PendingSave:
    """Commit a sharded ``snapshot`` with every rank, in line, through ``saver`` (rank 0
    records, prunes and replicates as for any save); a full disk is retried once, by
    all ranks together, after rank 0 freed what retention will delete anyway.
    Raises ``SaveFailedError`` on every rank alike."""
    step, store = snapshot.step, saver.store
    handle = PendingSave(step, store.path_for(step), snapshot.reason, dict(snapshot.metrics))
    if not ranks.is_writer:
        try:
            handle._info = commit_sharded(store, ranks, snapshot)
        except SaveFailedError as e:
            if not is_recoverable(e):
                raise
            handle._info = commit_sharded(store, ranks, snapshot)  # rank 0 retries with us
    else:
        saver.flush()  # a background save of a replicated state before: one at a time

        def commit(snap: Snapshot, **kwargs: Any) -> CheckpointInfo:
            kwargs.pop("abort", None)
            try:
                return commit_sharded(store, ranks, snap, **kwargs)
            except SaveFailedError as e:
                if not is_recoverable(e):
                    raise
                return saver.retry(snap, e, lambda: commit_sharded(store, ranks, snap, **kwargs))

        handle._info = saver.commit_now(snapshot, started, mode="sharded", store_commit=commit)
    handle.stall_s = time.perf_counter() - started
    return handle


def own_files(snapshot: Snapshot, ranks: Ranks) -> dict[str, Any]:
    """The files this rank writes: rank 0 all of its snapshot, the others their pieces."""
    if ranks.is_writer:
        return dict(snapshot.files)
    mine = {shard_file(key, ranks.rank, ranks.world_size) for key in snapshot.shards}
    return {name: content for name, content in snapshot.files.items() if name in mine}


def commit_sharded(
    store: Store,
    ranks: Ranks,
    snapshot: Snapshot,
    *,
    versions: dict[str, str] | None = None,
    info: dict[str, object] | None = None,
    parent: Parent | None = None,
) -> CheckpointInfo:
    """Commit ``snapshot`` (this rank's part of a sharded state) with every rank.

    Collective: every rank calls it for the same step. Returns the committed checkpoint
    (on ranks other than 0, without its manifest); raises ``SaveFailedError`` on every
    rank when any rank failed."""
    t0 = time.perf_counter()
    step = snapshot.step
    snapshot.resolve()
    opened: dict[str, str] = {}
    if ranks.is_writer:
        try:
            opened = {"staging": store.begin(step).name}
        except OSError as e:
            opened = {"error": str(store.failure(step, e)), "errno": e.errno}
    opened = ranks.broadcast_json(opened)
    if "error" in opened:
        raise _failed(opened)
    staging = store.directory / opened["staging"]

    report: dict[str, Any]
    try:
        t_write = time.perf_counter()
        written = store.write_files(staging, own_files(snapshot, ranks))
        report = {
            "files": {name: [e.size, e.checksum] for name, e in written.items()},
            "pieces": snapshot.shards,
            "pid": os.getpid(),
            "write_s": round(time.perf_counter() - t_write, 6),
        }
    except OSError as e:
        report = {"error": str(store.failure(step, e)), "errno": e.errno}
    except Exception as e:  # a rank that cannot write must still answer, or all wait
        report = {"error": f"saving {store.path_for(step)} failed on rank {ranks.rank}: {e}"}
    reports = ranks.gather_json(report)

    outcome: dict[str, Any] = {}
    committed: CheckpointInfo | None = None
    if reports is not None:  # rank 0
        committed, outcome = _finish(
            store, ranks, snapshot, staging, reports, t0, versions, info, parent
        )
    outcome = ranks.broadcast_json(outcome)
    if "error" in outcome:
        raise _failed(outcome)
    return committed or CheckpointInfo(store.path_for(step), step, "valid")


def _finish(
    store: Store,
    ranks: Ranks,
    snapshot: Snapshot,
    staging: Path,
    reports: list[Any],
    t0: float,
    versions: dict[str, str] | None,
    info: dict[str, object] | None,
    parent: Parent | None,
) -> tuple[CheckpointInfo | None, dict[str, Any]]:
    """Rank 0, once every rank reported: the index, the manifest, the rename."""
    failed = [(r, rep["error"]) for r, rep in enumerate(reports) if "error" in rep]
    if failed:
        store.discard(staging)
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        code = next((reports[r].get("errno") for r, _ in failed if reports[r].get("errno")), None)
        return None, {"error": f"{failed[0][1]}{more}", "errno": code}
    files: dict[str, FileEntry] = {}
    for rep in reports:
        files |= {name: FileEntry(*entry) for name, entry in rep["files"].items()}
    index = build_index(ranks.world_size, [rep["pieces"] for rep in reports])
    try:
        files |= store.write_files(staging, {SHARDS_NAME: dumps_json(index)})
        committed = store.finish(
            staging,
            snapshot,
            files,
            t0=t0,
            versions=versions,
            info={**(info or {}), "world_size": ranks.world_size, "writers": _writers(reports)},
            parent=parent,
        )
    except OSError as e:
        store.discard(staging)
        return None, {"error": str(store.failure(snapshot.step, e)), "errno": e.errno}
    except BaseException:
        store.discard(staging)
        raise
    return committed, {"committed": committed.name}


def _failed(outcome: dict[str, Any]) -> SaveFailedError:
    """The same ``SaveFailedError`` on every rank, caused by the first rank's ``OSError``
    (its errno crossed as JSON), so that every rank sees a full disk as recoverable."""
    error = SaveFailedError(outcome["error"])
    code = outcome.get("errno")
    if isinstance(code, int):
        error.__cause__ = OSError(code, os.strerror(code))
    return error


def _writers(reports: list[Any]) -> list[dict[str, Any]]:
    """Who wrote what: per rank its process, files, bytes and write time (the record)."""
    return [
        {
            "rank": rank,
            "pid": rep["pid"],
            "files": sorted(rep["files"]),
            "bytes": sum(size for size, _ in rep["files"].values()),
            "write_s": rep["write_s"],
        }
        for rank, rep in enumerate(reports)
    ]
