"""moto's S3 server for the remote tests and benchmark, from a tool venv of its own.

Why a venv of its own: moto needs a free ``boto3`` and s3fs needs aiobotocore's narrow
``botocore`` pin. In one resolution the newest boto3 (e.g. 1.44.8) and the newest
aiobotocore (botocore<1.43.118) conflict, and pip walks back through every
aiobotocore/s3fs/datasets/huggingface_hub release instead of lowering boto3: a fresh
``pip install -e ".[dev]"`` ran for 28 minutes (pip 23) and never finished (pip 26).
The server is a separate process anyway, so it gets its own environment, built once per
machine and Python version with the ordinary pip (about 30 s), then reused.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MOTO_REQUIREMENT = "moto[server]>=5.0"


def tool_home() -> Path:
    """Where test tools live: ``$SAFEPOINT_TEST_TOOLS`` or ``~/.cache/safepoint/test-tools``."""
    base = os.environ.get("SAFEPOINT_TEST_TOOLS") or Path.home() / ".cache/safepoint/test-tools"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(base) / f"moto-{tag}"


def moto_python() -> Path:
    """The interpreter of the moto tool venv, built on first use.

    Raises RuntimeError with pip's output when it cannot be built (offline machine)."""
    home = tool_home()
    python = home / "bin" / "python"
    if (home / ".ready").is_file() and python.is_file():
        return python
    shutil.rmtree(home, ignore_errors=True)
    home.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(home)],
        [str(python), "-m", "pip", "install", "--quiet", MOTO_REQUIREMENT],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(
                f"cannot build the moto tool venv in {home} ({' '.join(cmd[-2:])}): "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
    (home / ".ready").write_text(MOTO_REQUIREMENT + "\n")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(port: int, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start moto's standalone S3 server on 127.0.0.1:port and wait until it answers."""
    cmd = [str(moto_python()), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return proc
        except OSError as e:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                detail = log.read_text() if log and log.exists() else ""
                raise RuntimeError(f"moto did not start on {url}: {detail}") from e
            time.sleep(0.05)


def make_bucket(port: int, bucket: str) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{bucket}", method="PUT")
    urllib.request.urlopen(req, timeout=10).close()
