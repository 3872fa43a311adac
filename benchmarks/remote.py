"""Remote mirror cost: save stall with and without a mirror, upload and verified download.

usage: python benchmarks/remote.py [--sizes-mb 10,100] [--repeats 3]

The S3 server is moto's standalone server on loopback (in-memory, single Python
process): its throughput says how fast moto is, not S3. What the table shows that holds
anywhere: the training loop's stall is the local commit alone (the upload runs in the
background), and how long a checkpoint takes to become "mirrored" and to be fetched
onto a fresh machine with every checksum verified.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from _common import table, write_results

import s3_server  # moto from a tool venv of its own: see tests/s3_server.py
from safepoint import Checkpointer
from safepoint.remote import upload_states


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = s3_server.free_port()
    proc = s3_server.start(port)
    s3_server.make_bucket(port, "bench")
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return proc, url


def one(root: Path, mb: int, remote: str | None, step: int) -> dict[str, float | None]:
    n = int((mb * 1e6 / 4) ** 0.5)
    state = {"w": torch.randn(n, n)}
    local = root / f"local-{step}"
    ckpt = Checkpointer(local, remote=remote)
    t0 = time.perf_counter()
    ckpt.save(step, state)
    stall = time.perf_counter() - t0
    mirrored = None
    if remote is not None:
        while upload_states(local).get(f"checkpoint-{step}") != "mirrored":
            time.sleep(0.01)
        mirrored = time.perf_counter() - t0
    ckpt.close()
    fetch = None
    if remote is not None:
        fresh = root / f"fresh-{step}"
        with Checkpointer(fresh, remote=remote) as c2:
            t1 = time.perf_counter()
            assert c2.restore({"w": torch.empty(n, n)}) == step
            fetch = time.perf_counter() - t1
        shutil.rmtree(fresh)
    shutil.rmtree(local)
    return {"stall_s": stall, "mirrored_s": mirrored, "fetch_s": fetch}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes-mb", default="10,100")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    proc, _ = start_moto()
    rows, data = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            step = 0
            for mb in (int(s) for s in args.sizes_mb.split(",")):
                targets = {
                    "none": None,
                    "file://": f"file://{root}/mirror",
                    "s3 (moto)": f"s3://bench/run-{mb}",
                }
                for label, remote in targets.items():
                    runs = []
                    for _ in range(args.repeats):
                        step += 1
                        runs.append(one(root, mb, remote, step))

                    def med(key: str, runs: list[dict[str, float | None]] = runs) -> float | None:
                        vals = sorted(v for r in runs if (v := r[key]) is not None)
                        return vals[len(vals) // 2] if vals else None

                    row = {
                        "mb": mb,
                        "remote": label,
                        **{k: med(k) for k in ("stall_s", "mirrored_s", "fetch_s")},
                    }
                    data.append(row)
                    rows.append(list(row.values()))
    finally:
        proc.kill()
    body = table(
        ["checkpoint MB", "remote", "save stall s", "until mirrored s", "fresh-machine fetch s"],
        rows,
    )
    body += (
        "\n\nMedians of the repeats. *save stall*: `save()` in the training loop (sync "
        "save: local commit only; the upload is queued). *until mirrored*: from the "
        "start of the save to the `mirrored` upload event (remote manifest and `latest` "
        "written, sizes verified). *fetch*: `restore()` into an empty directory: list, "
        "download, checksum every file, commit locally, load."
    )
    write_results("remote", "Remote mirror: stall, upload, fetch", body, {"rows": data})


if __name__ == "__main__":
    main()
