"""What to keep: retention over this configuration's valid checkpoints after each save,
its deletions (their files removed off the saving thread), space freed for a retry.

Runs on the thread that commits (the training thread, or the writer for a background
save), one at a time: ``Saver`` calls it after each commit and before a retry.
"""

from __future__ import annotations

import logging
import os

from safepoint.errors import CheckpointNotFoundError
from safepoint.options import Options
from safepoint.records import RunRecord
from safepoint.retention import (
    Candidate,
    RetentionPolicy,
    free_before_commit,
    plan,
    thin_steps,
)
from safepoint.snapshot import Snapshot
from safepoint.store import Store
from safepoint.validity import CheckpointInfo, checkpoint_step, inspect

log = logging.getLogger("safepoint")


class Retention:
    """Applies ``options``' retention rules to the checkpoints of ``store``."""

    def __init__(self, store: Store, record: RunRecord, options: Options) -> None:
        self.store = store
        self.record = record
        self.options = options
        self.policy = RetentionPolicy.from_options(options)
        self.metric_hint = "pass it to step() in metrics=, or set metric= to one the saves carry"
        """How the user gets ``metric`` into the saves, in their terms (integrations adapt it)."""
        self._warned_metric = False
        self._names: set[str] | None = None
        """Every ``checkpoint-N`` name in the directory when retention last looked."""
        self._known: dict[str, CheckpointInfo] = {}
        """Of those, this configuration's valid checkpoints: kept up to date by this
        object's own commits and deletes, rescanned whenever the names on disk differ."""
        self._fresh: CheckpointInfo | None = None  # the one just committed

    def ours(self, info: CheckpointInfo) -> bool:
        """Whether ``info`` belongs to this configuration (retention never touches others)."""
        mine = self.options.fingerprint
        theirs = info.manifest.fingerprint if info.manifest else None
        return mine is None or theirs is None or theirs == mine

    def check_metric(self, snapshot: Snapshot) -> None:
        """Warn once when keep_best ranks by a metric that the scheduled saves lack. An
        emergency save has no metric by design and is never ranked best: no sign."""
        policy = self.policy
        if not policy.keep_best or policy.metric in snapshot.metrics or self._warned_metric:
            return
        if snapshot.reason == "emergency" or snapshot.reason.startswith("exception"):
            return
        self._warned_metric = True
        have = ", ".join(sorted(snapshot.metrics)) or "none"
        note = (
            f"keep_best={policy.keep_best} ranks checkpoints by {policy.metric!r}, but the save "
            f"of step {snapshot.step} has no such metric (it has: {have}); {self.metric_hint}, "
            "else only the newest checkpoints are kept"
        )
        self.record.warning(note)

    def valid(self) -> list[CheckpointInfo]:
        """This configuration's valid checkpoints, oldest first. Inspected once, then
        known from the commits and deletes told to ``saw`` (a scan re-read them all at every
        save: 0.7 ms of a small one); looked at again whenever the folder's checkpoint
        names are not the ones expected (a person or a tool removed, added or renamed one).
        The newest, which retention always keeps, is the one just committed."""
        names = {n for n in os.listdir(self.store.directory) if checkpoint_step(n) is not None}
        if names != self._names:
            scanned = [i for i in self.store.scan() if i.status != "staging"]
            self._names = {i.name for i in scanned}
            self._known = {i.name: i for i in scanned if i.valid and self.ours(i)}
        return sorted(self._known.values(), key=lambda i: i.step)

    def saw(self, info: CheckpointInfo, *, gone: bool = False) -> None:
        """Keep ``valid``'s picture true after ``info`` was committed (or deleted)."""
        if self._names is None:
            return  # not looked yet: the first look scans
        if gone:
            self._names.discard(info.name)
            self._known.pop(info.name, None)
        else:
            self._names.add(info.name)
            if info.valid and self.ours(info):
                self._known[info.name] = self._fresh = info

    def apply(self) -> list[CheckpointInfo]:
        """Delete what the policy no longer keeps; return the deleted. Before anything is
        deleted, the checkpoints kept in its place are inspected again (a shallow check):
        one damaged since it was saved sends retention back to the folder, so that it
        never deletes a good checkpoint in favour of a bad one."""
        valid = self.valid()
        decision = plan(_candidates(valid), self.policy)
        kept = [i for i in valid if i.step not in decision.delete]
        thin = thin_steps(_candidates(valid), decision, self.policy, self.options.keep_full)
        if (decision.delete or thin) and not all(
            _still_valid(i) for i in kept if i is not self._fresh
        ):
            self._names = None
            valid = self.valid()
            decision = plan(_candidates(valid), self.policy)
            thin = thin_steps(_candidates(valid), decision, self.policy, self.options.keep_full)
        if decision.over_budget:
            log.warning(
                "the checkpoints that must be kept exceed max_disk=%s bytes", self.policy.max_bytes
            )
        rule = self.policy.describe()
        deleted = [
            i for i in valid if i.step in decision.delete and self.delete(i, rule, later=True)
        ]
        for info in valid:
            if info.step in thin:
                self.thin(info)
        return deleted

    def thin(self, info: CheckpointInfo) -> CheckpointInfo | None:
        """Thin ``info`` (``Store.thin``: atomic, its full version removed off this
        thread); the thin one, or None if it stays full. Never raises ``OSError``: the new
        checkpoint is committed, so a thinning that fails (a full disk for a copy, EIO)
        is a warning and the checkpoint stays full."""
        try:
            thin = self.store.thin(info)
        except OSError as e:
            self.record.warning(
                f"could not thin {info.name} ({e.strerror or e}); it stays full and "
                "training goes on"
            )
            return None
        if thin is None:
            return None
        self._known[thin.name] = thin
        self.record.event(
            "thin",
            step=thin.step,
            checkpoint=thin.name,
            bytes=thin.size,
            freed=max(info.size - thin.size, 0),
            dropped=list(thin.manifest.thin.dropped)
            if thin.manifest and thin.manifest.thin
            else [],
        )
        return thin

    def free_for(self, snapshot: Snapshot) -> int:
        """Delete now what the policy will delete once ``snapshot`` is committed, sparing
        the newest and the best; the bytes freed."""
        self.settle()
        valid = self.valid()
        incoming = Candidate(snapshot.step, snapshot.nbytes, dict(snapshot.metrics))
        steps = free_before_commit(_candidates(valid), self.policy, incoming)
        gone = [i for i in valid if i.step in steps and self.delete(i, "free space")]
        return sum(i.size for i in gone)

    def delete(self, info: CheckpointInfo, rule: str, *, later: bool = False) -> bool:
        """Delete ``info``; True if it is gone. Never raises ``OSError``: the new checkpoint
        is committed, so a folder that will not go (an NFS ``.nfsXXXX`` file, an immutable
        file, EIO) is a warning, whatever ``on_save_error`` says. ``later``: out of the run
        now (renamed), its files removed off this thread (``settle`` says if they stay)."""
        try:
            self.store.delete(info, background=later)
        except OSError as e:
            self._cannot_delete(info.name, e)
            if os.path.lexists(info.path):
                return False
        self.saw(info, gone=True)
        self.record.event(
            "delete", step=info.step, checkpoint=info.name, bytes=info.size, rule=rule
        )
        return True

    def settle(self) -> None:
        """Wait until the files of deletions made ``later`` are removed (on the store's
        reaper thread: about 1.5 ms of a small save's stall otherwise). Their folders left
        the run at the rename already, so a failure here is a warning."""
        for name, e in self.store.settle():
            self._cannot_delete(name, e)

    def _cannot_delete(self, name: str, e: OSError) -> None:
        where = getattr(e, "filename", None) or self.store.directory / name
        if os.path.lexists(self.store.directory / name):
            state = f"{name} is kept"
        else:  # renamed out of sight, then not fully removed: the next start sweeps it
            state = f"{name} is out of the run, but files of it remain"
        self.record.warning(
            f"retention could not delete {name} ({e.strerror or e}: {where}); {state}; the "
            "new checkpoint is committed and training goes on; remove it by hand if the "
            "disk is short"
        )


def _candidates(infos: list[CheckpointInfo]) -> list[Candidate]:
    return [Candidate(i.step, i.size, i.metrics, i.thin) for i in infos]


def _still_valid(info: CheckpointInfo) -> bool:
    try:
        return inspect(info.path).valid
    except CheckpointNotFoundError:  # removed since the folder was listed
        return False
