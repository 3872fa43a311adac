"""A power-loss simulator: a FUSE file system that forgets what was not made durable.

A ``kill -9`` keeps the page cache: only a power cut tests the fsyncs. ``PowerCutFS``
mounts a backing directory through a pass-through file system that journals every
change (``fs.py``); a cut freezes it and writes what the disk would hold after the power
came back into a fresh directory (``journal.py`` says exactly what survives):

>>> with PowerCutFS(backing, mountpoint) as fs:                    # doctest: +SKIP
...     run_something_on(mountpoint)
...     survivor = fs.cut("strict")                  # only what was fsync'ed
...     maybe = fs.cut("reordered", seed=3)          # plus some of the rest

Because the journal keeps every event, ``fs.journal().materialise(dest, before=k)``
gives the state of a cut before any event ``k`` of the recorded run, without rerunning
it. Needs ``/dev/fuse``, ``fusermount3`` (Debian: ``fuse3``) and the ``mfusepy``
package (``pip install safepoint[chaos]``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from safepoint.errors import ConfigError
from safepoint.powercut.journal import MODES, Event, Journal, tree_digest

__all__ = ["MODES", "Event", "Journal", "PowerCutFS", "available", "tree_digest"]


def available() -> str | None:
    """None if power cuts can be simulated here, else why not (and what to install)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (a container needs --device /dev/fuse)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing: apt-get install fuse3 libfuse3-dev"
    try:
        import mfusepy  # noqa: F401  (loads libfuse3)
    except ImportError:
        return "the mfusepy package is missing: pip install 'safepoint[chaos]'"
    except OSError as e:
        return f"libfuse3 cannot be loaded ({e}): apt-get install fuse3 libfuse3-dev"
    return None


class PowerCutFS:
    """Mount ``backing`` at ``mountpoint`` through the simulator (a daemon process).

    ``cut_at=k`` cuts the power at the k-th file event by itself (the program gets EIO
    from then on; kill it). The journal goes to ``journal`` (default: a new temporary
    folder, kept: ``cut()`` results go there too). Raises ``ConfigError`` when FUSE is
    not usable here (``available()`` says why).
    """

    def __init__(
        self,
        backing: str | os.PathLike[str],
        mountpoint: str | os.PathLike[str],
        *,
        journal: str | os.PathLike[str] | None = None,
        cut_at: int | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.backing = Path(backing)
        self.mountpoint = Path(mountpoint)
        self.journal_dir = Path(journal or tempfile.mkdtemp(prefix="safepoint-powercut-"))
        self.cut_at = cut_at
        self.timeout = timeout
        self._proc: subprocess.Popen[str] | None = None
        self._replies: queue.Queue[str] = queue.Queue()
        self._ready = threading.Event()
        self._cut = threading.Event()
        self._cut_events: int | None = None
        self._cuts = 0

    # ------------------------------------------------------------- mounting

    def mount(self) -> PowerCutFS:
        why = available()
        if why is not None:
            raise ConfigError(f"cannot simulate power cuts: {why}")
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "safepoint.powercut",
            str(self.backing),
            str(self.mountpoint),
            str(self.journal_dir),
        ]
        if self.cut_at is not None:
            argv += ["--cut-at", str(self.cut_at)]
        with open(self.journal_dir / "daemon.log", "ab") as err:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,  # a Ctrl-C of the test run reaches us, not the daemon
            )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while not (self._ready.is_set() and os.path.ismount(self.mountpoint)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._stop()
                log = (self.journal_dir / "daemon.log").read_text(errors="replace")
                raise ConfigError(
                    f"the power-cut file system did not mount on {self.mountpoint}: "
                    f"{log.strip().splitlines()[-1] if log.strip() else 'no output'}"
                )
            time.sleep(0.01)
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "ready":
                self._ready.set()
            elif word == "cut":
                self._cut_events = int(rest)
                self._cut.set()
            else:
                self._replies.put(line.strip())

    def _send(self, command: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()

    def unmount(self) -> None:
        """Unmount and stop the daemon (the journal stays). Safe to call twice."""
        if self._proc is None:
            return
        for attempt in range(50):
            if not os.path.ismount(self.mountpoint):
                break
            lazy = ["-z"] if attempt >= 40 else []  # something still holds it: detach
            subprocess.run(
                ["fusermount3", "-u", *lazy, str(self.mountpoint)], capture_output=True, check=False
            )
            time.sleep(0.05 if attempt else 0)
        self._stop()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> PowerCutFS:
        return self.mount()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unmount()

    # ------------------------------------------------------------------ cuts

    @property
    def events(self) -> int:
        """File events so far (asks the daemon; after unmount: from the journal)."""
        if self._proc is None:
            return self.journal().count
        self._send("count")
        return int(self._replies.get(timeout=self.timeout).split()[1])

    @property
    def frozen(self) -> bool:
        return self._cut.is_set()

    def wait_cut(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the armed cut; True once it happened."""
        return self._cut.wait(timeout)

    def freeze(self) -> int:
        """Cut the power now: nothing more reaches the disk. Returns the events applied."""
        if not self._cut.is_set() and self._proc is not None:
            self._send("cut")
            if not self._cut.wait(self.timeout):
                raise RuntimeError("the power-cut daemon did not answer 'cut'")
        if self._cut_events is None:
            return self.journal().count
        return self._cut_events

    def journal(self) -> Journal:
        return Journal(self.journal_dir)

    def cut(
        self,
        mode: str = "strict",
        seed: int = 0,
        *,
        dest: str | os.PathLike[str] | None = None,
        before: int | None = None,
    ) -> Path:
        """Freeze (if still running) and write what survives into a fresh directory.

        ``before=k``: a cut before event k of the recorded run instead of at the freeze.
        Returns ``dest`` (default: a new folder in the journal directory)."""
        self.freeze()
        self._cuts += 1
        if dest is None:
            dest = self.journal_dir / f"cut-{self._cuts}-{mode}-{seed}"
        return self.journal().materialise(dest, before=before, mode=mode, seed=seed)
