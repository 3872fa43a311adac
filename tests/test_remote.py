"""Remote mirrors: file:// and a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from safepoint import Checkpointer, remote_dir
from safepoint.cli import main
from safepoint.errors import RemoteUnavailableError
from safepoint.manifest import MANIFEST_NAME
from safepoint.records import read_events
from safepoint.remote import upload_states
from safepoint.remote_dir import LATEST_NAME, RemoteDir
from safepoint.store import Store
from tests import s3_server
from tests.conftest import same_tensors
from tests.fault_proxy import FaultProxy

SCRIPT = Path(__file__).parent / "programs" / "dist_train.py"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def _bounded_close(monkeypatch: pytest.MonkeyPatch) -> None:
    # A broken mirror must fail the test quickly, not wait out the 10-minute default.
    monkeypatch.setenv("SAFEPOINT_UPLOAD_TIMEOUT", "60")


class S3Server:
    """moto's standalone S3 server on 127.0.0.1, stoppable and restartable on its port."""

    def __init__(self, log_dir: Path) -> None:
        self.port = s3_server.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, bucket: str = "runs") -> None:
        self.proc = s3_server.start(self.port, self.log)
        s3_server.make_bucket(self.port, bucket)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def _moto() -> None:
    """Build (once per machine) the moto tool venv; see tests/s3_server.py for why."""
    try:
        s3_server.moto_python()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"moto's S3 server is not available here: {e}")


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _moto: None) -> Iterator[S3Server]:
    pytest.importorskip("s3fs")
    server = S3Server(tmp_path)
    server.start()
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    yield server
    server.stop()


def model_state(width: int = 64) -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}


def train(ckpt: Checkpointer, state: dict[str, object], steps: range) -> None:
    model = state["model"]
    opt = state["optimizer"]
    assert isinstance(model, torch.nn.Linear) and isinstance(opt, torch.optim.Optimizer)
    for step in steps:
        loss = model(torch.randn(4, model.in_features)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.step(step + 1, state, metrics={"loss": loss.item()})


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_file_remote_mirrors_with_retention_and_pointer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    remote = tmp_path / "remote"
    local = tmp_path / "local"
    state = model_state()
    with Checkpointer(
        local, save_every=2, keep_last=2, total_steps=8, remote=f"file://{remote}"
    ) as ckpt:
        train(ckpt, state, range(8))
    rdir = RemoteDir(f"file://{remote}")
    assert rdir.steps() == [6, 8]  # remote retention: keep_last=2 as locally
    assert all(rdir.check(s).valid for s in (6, 8))
    assert json.loads((remote / LATEST_NAME).read_text())["checkpoint"] == "checkpoint-8"
    local_manifest = (local / "checkpoint-8" / MANIFEST_NAME).read_bytes()
    assert (remote / "checkpoint-8" / MANIFEST_NAME).read_bytes() == local_manifest
    states = upload_states(local)
    assert states["checkpoint-8"] == "mirrored" and states["checkpoint-6"] == "mirrored"
    assert main(["ls", str(local), "--json"]) == 0
    listed = {c["name"]: c["remote"] for c in json.loads(capsys.readouterr().out)}
    assert listed == {"checkpoint-6": "mirrored", "checkpoint-8": "mirrored"}


def test_remote_folder_without_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    (remote / "checkpoint-9").mkdir(parents=True)
    (remote / "checkpoint-9" / "model.safetensors").write_bytes(b"partial")
    rdir = RemoteDir(f"file://{remote}")
    assert not rdir.check(9).valid
    assert list(rdir.newest_first()) == []


def test_fresh_machine_resumes_from_s3_identically(tmp_path: Path, s3: S3Server) -> None:
    env = {**os.environ, **s3.env}

    def run(out: Path, steps: int, *remote: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, str(SCRIPT), str(out), "--steps", str(steps), *remote]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run(tmp_path / "reference", 20)
    url = "s3://runs/exp1"
    run(tmp_path / "machine-a", 10, "--remote", url)  # close() waits for the upload
    assert RemoteDir(url).check(10).valid
    fresh = tmp_path / "machine-b"  # does not exist: a new machine
    proc = run(fresh, 20, "--remote", url)
    assert "start 10" in proc.stdout
    assert "downloaded checkpoint-10" in proc.stderr
    assert same_tensors(tmp_path / "reference" / "final.safetensors", fresh / "final.safetensors")
    assert RemoteDir(url).latest_step() == 20
    assert any(e["event"] == "download" for e in read_events(fresh))


def test_damaged_remote_checkpoint_falls_back_to_older(tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    state = model_state()
    with Checkpointer(tmp_path / "a", save_every=2, total_steps=4, remote=f"file://{remote}") as c:
        train(c, state, range(4))
    blob = remote / "checkpoint-4" / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, wrong checksum: only the download's verification sees it
    blob.write_bytes(bytes(data))
    with Checkpointer(tmp_path / "b", remote=f"file://{remote}") as c:
        assert c.restore(model_state()) == 2
    assert not (tmp_path / "b" / "checkpoint-4").exists()
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".staging")]


def test_s3_server_down_mid_run_uploads_resume_training_never_stops(
    tmp_path: Path, s3: S3Server
) -> None:
    url = "s3://runs/fault"
    local = tmp_path / "local"
    state = model_state(width=256)  # ~0.5 MB per checkpoint: uploads take a moment
    ckpt = Checkpointer(local, save_every=1, keep_last=3, remote=url)
    ckpt.saver.replica.backoff = (0.1, 0.5)  # type: ignore[union-attr]
    train(ckpt, state, range(2))
    wait_for(lambda: upload_states(local).get("checkpoint-2") == "mirrored", "first uploads")
    train(ckpt, state, range(2, 3))
    s3.stop()  # the upload of checkpoint-3 is queued or in flight
    train(ckpt, state, range(3, 10))  # training goes on while the server is down
    assert ckpt.latest().step == 10  # type: ignore[union-attr]
    wait_for(lambda: any(e.get("state") == "retry" for e in read_events(local)), "a failed upload")
    assert upload_states(local)["checkpoint-10"] == "uploading"
    assert main(["ls", str(local)]) == 0  # shows it, with the older ones mirrored
    s3.start()  # back, empty (moto keeps nothing): everything must be uploaded again
    train(ckpt, state, range(10, 12))
    ckpt.close()
    rdir = RemoteDir(url)
    assert rdir.latest_step() == 12
    assert rdir.check(12).valid
    assert upload_states(local)["checkpoint-12"] == "mirrored"

    # And the mirror is usable: a fresh machine restores step 12, verified.
    with Checkpointer(tmp_path / "fresh", remote=url) as fresh:
        assert fresh.restore(model_state(width=256)) == 12


def test_close_times_out_with_clear_message(
    tmp_path: Path, s3: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    s3.stop()
    ckpt = Checkpointer(tmp_path / "local", save_every=1, remote="s3://runs/down")
    ckpt.saver.replica.close_timeout = 1.0  # type: ignore[union-attr]
    train(ckpt, model_state(), range(1))
    ckpt.close()
    assert "did not finish within 1 s; checkpoint-1 stay local only" in caplog.text
    assert upload_states(tmp_path / "local")["checkpoint-1"] == "local only"
    assert Store(tmp_path / "local").scan()[-1].valid


def test_fresh_machine_with_unreachable_remote_refuses_to_start_over(
    tmp_path: Path, s3: S3Server
) -> None:
    s3.stop()
    ckpt = Checkpointer(tmp_path / "fresh", remote="s3://runs/gone")
    ckpt.saver.replica.close_timeout = 0  # type: ignore[union-attr]
    with pytest.raises(RemoteUnavailableError, match="cannot be read"):
        ckpt.restore(model_state())
    ckpt.close()


@pytest.mark.slow
def test_safepoint_train_on_a_fresh_machine_resumes_from_the_remote(
    tmp_path: Path, s3: S3Server
) -> None:
    env = {**os.environ, **s3.env, "SAFEPOINT_HOME": str(tmp_path / "home")}
    url = "s3://runs/train"

    def train_cli(out: Path, steps: int) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "safepoint", "train", "--max-steps", str(steps)]
        cmd += ["--save-every", "2", "--output-dir", str(out), "--remote", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    train_cli(tmp_path / "a", 4)
    fresh = train_cli(tmp_path / "b", 6)
    assert "resuming from" in fresh.stdout and "(step 4)" in fresh.stdout
    assert RemoteDir(url).latest_step() == 6


# ------------------------------------------------------------ a remote answering 500


@pytest.fixture
def failing_remote(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[Callable[[str], bool]], FaultProxy]]:
    """checkpoint-2 and checkpoint-4 on the S3 server, then a function that puts a proxy
    answering 500 to the ``.safetensors`` GETs its rule picks in front of it."""
    with Checkpointer(tmp_path / "a", save_every=2, total_steps=4, remote="s3://runs/x") as c:
        train(c, model_state(), range(4))
    assert RemoteDir("s3://runs/x").steps() == [2, 4]
    # botocore retries a 500 itself (4 more GETs, ~7 s); off, so that the tries the test
    # counts are safepoint's. Pauses short: the test waits on them.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(remote_dir, "FETCH_BACKOFF_S", (0.05, 0.2))
    proxies: list[FaultProxy] = []

    def start(rule: Callable[[str], bool]) -> FaultProxy:
        proxy = FaultProxy(
            s3.port, lambda method, path: method == "GET" and ".safetensors" in path and rule(path)
        )
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()


def test_remote_500s_for_a_while_are_retried_and_the_fetch_succeeds(
    tmp_path: Path, failing_remote: Callable[[Callable[[str], bool]], FaultProxy]
) -> None:
    left = [remote_dir.FETCH_TRIES - 1]  # the first reads fail, the last try passes

    def first_ones(path: str) -> bool:
        left[0] -= 1
        return left[0] >= 0

    proxy = failing_remote(first_ones)
    with Checkpointer(tmp_path / "b", remote="s3://runs/x") as c:
        assert c.restore(model_state()) == 4
    assert len(proxy.failed) == remote_dir.FETCH_TRIES - 1
    assert Store(tmp_path / "b").scan()[-1].valid


def test_remote_500s_on_the_newest_checkpoint_fall_back_to_the_older_one(
    tmp_path: Path,
    failing_remote: Callable[[Callable[[str], bool]], FaultProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = failing_remote(lambda path: "/checkpoint-4/" in path)
    with Checkpointer(tmp_path / "b", remote="s3://runs/x") as c:
        assert c.restore(model_state()) == 2
    assert len(proxy.failed) == remote_dir.FETCH_TRIES  # one file, all its tries
    assert "checkpoint-4 could not be downloaded" in caplog.text
    assert "trying an older one" in caplog.text
    failed = [e for e in read_events(tmp_path / "b") if e["event"] == "download_failed"]
    assert [e["checkpoint"] for e in failed] == ["checkpoint-4"]
    assert [i.name for i in Store(tmp_path / "b").scan()] == ["checkpoint-2"]
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".staging")]


def test_remote_500s_on_every_checkpoint_are_one_clean_error(
    tmp_path: Path, failing_remote: Callable[[Callable[[str], bool]], FaultProxy]
) -> None:
    proxy = failing_remote(lambda path: True)
    ckpt = Checkpointer(tmp_path / "b", remote="s3://runs/x")
    with pytest.raises(RemoteUnavailableError) as caught:
        ckpt.restore(model_state())
    ckpt.close()
    message = str(caught.value)
    assert "\n" not in message
    assert "no checkpoint of the remote s3://runs/x could be downloaded" in message
    assert "checkpoint-4: OSError" in message and "and 1 older" in message
    assert "rerun when the remote answers again" in message
    assert len(proxy.failed) == 2 * remote_dir.FETCH_TRIES
    assert not [i for i in Store(tmp_path / "b").scan() if i.valid]


@pytest.mark.slow  # ~45 s: builds the tiny model in a fresh SAFEPOINT_HOME
def test_safepoint_train_says_the_remote_is_unavailable_in_one_line(
    tmp_path: Path, failing_remote: Callable[[Callable[[str], bool]], FaultProxy]
) -> None:
    failing_remote(lambda path: True)
    env = {**os.environ, "SAFEPOINT_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "safepoint", "train", "--max-steps", "4"]
    cmd += ["--output-dir", str(tmp_path / "fresh"), "--remote", "s3://runs/x"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == RemoteUnavailableError.exit_code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "could be downloaded" in errors[0] and "rerun when the remote" in errors[0]


def test_a_fresh_machine_never_resumes_the_line_a_rollback_replaced(tmp_path: Path) -> None:
    remote = f"file://{tmp_path / 'remote'}"
    opts = {"save_every": 1, "keep_last": 10, "keep_full": 0, "remote": remote}
    with Checkpointer(tmp_path / "a", total_steps=4, **opts) as c:
        train(c, model_state(), range(4))  # 1, 2, 3, 4 mirrored
    state = model_state(64)
    with Checkpointer(tmp_path / "a", total_steps=4, **opts) as c:
        assert c.restore(state, checkpoint=2) == 2  # a rollback; the new line reaches 3 only
        train(c, state, range(2, 3))
        c.flush()
    new3 = (tmp_path / "a" / "checkpoint-3" / "model.safetensors").read_bytes()
    rdir = RemoteDir(remote)
    assert rdir.steps() == [1, 2, 3, 4] and rdir.latest_step() == 3  # the old 4 is there
    with Checkpointer(tmp_path / "b", **opts) as c:  # a fresh machine
        assert c.restore(model_state()) == 3
    assert (tmp_path / "b" / "checkpoint-3" / "model.safetensors").read_bytes() == new3
    # A newer checkpoint of the current line is taken even if the pointer lags behind it.
    (tmp_path / "remote" / LATEST_NAME).write_text(json.dumps({"step": 2}))
    assert [rc.step for rc in rdir.newest_first()] == [3, 2, 1]
