"""O_DIRECT tensor-file writes: the bytes, the size, the checksum, and the fallback.

Real file systems only: the test directory (ext4 or overlay here: takes O_DIRECT), a
tmpfs (takes it since Linux 6.6) and a ramfs (refuses it at open: the fallback). The
mounts need root; without it those cases are skipped.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safepoint import directio
from safepoint.directio import ALIGN, BUFFER_BYTES, FileStream
from safepoint.fileio import hash_file, new_hasher
from safepoint.format import write_safetensors
from safepoint.snapshot import TensorFile, capture
from safepoint.staging import StagingBuffers
from safepoint.store import Store
from safepoint.validity import inspect

PT = {"format": "pt"}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        # > one buffer, and an odd size: the last block is padded, then truncated
        "big": torch.randn(BUFFER_BYTES // 4 + 12_345, generator=g),
        "small": torch.randn(7, 3, generator=g),
        "half": torch.randn(5, generator=g).half(),
        "empty": torch.zeros(0),
    }


def _write(
    path: Path,
    tensors: dict[str, torch.Tensor],
    *,
    direct: bool | None,
    metadata: dict[str, str] | None = PT,
) -> tuple:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        size, digest = write_safetensors(fd, tensors, metadata, direct=direct)
        os.fsync(fd)
        o_direct = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert not o_direct, "O_DIRECT must be cleared once the file is written"
    return size, digest


def _mount(kind: str, where: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip(f"mounting a {kind} needs root")
    where.mkdir()
    opts = ["-o", "size=64m"] if kind == "tmpfs" else []
    proc = subprocess.run(["mount", "-t", kind, *opts, kind, str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a {kind}: {proc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    yield from _mount("ramfs", tmp_path / "ramfs")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    yield from _mount("tmpfs", tmp_path / "tmpfs")


def _takes_o_direct(directory: Path) -> bool:
    try:
        fd = os.open(directory / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.unlink(directory / ".probe")
    return True


def _check_file(path: Path, tensors: dict[str, torch.Tensor], size: int, digest: str) -> None:
    assert path.stat().st_size == size  # the tail padding is gone
    assert hash_file(path) == (size, digest)  # checksum of the write pass == read back
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t), k


@pytest.fixture(autouse=True)
def _fresh_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    # file systems that refused O_DIRECT are remembered per device: start each test blank
    monkeypatch.setattr(directio, "_refused", set())


def test_o_direct_bytes_equal_page_cache_bytes(tmp_path: Path) -> None:
    if not _takes_o_direct(tmp_path):
        pytest.skip("the test directory's file system refuses O_DIRECT")
    tensors = _tensors()
    direct = _write(tmp_path / "direct.safetensors", tensors, direct=True)
    cached = _write(tmp_path / "cached.safetensors", tensors, direct=False)
    assert direct == cached
    assert direct[0] % ALIGN != 0  # the case with a padded, truncated tail
    assert (tmp_path / "direct.safetensors").read_bytes() == (
        tmp_path / "cached.safetensors"
    ).read_bytes()
    _check_file(tmp_path / "direct.safetensors", tensors, *direct)


def test_stream_uses_o_direct_where_it_can(tmp_path: Path) -> None:
    if not _takes_o_direct(tmp_path):
        pytest.skip("the test directory's file system refuses O_DIRECT")
    data = os.urandom(3 * ALIGN + 5)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        hasher = new_hasher()
        stream = FileStream(fd, hasher, direct=True)
        assert stream.direct
        stream.write(memoryview(data)[:100])
        stream.write(memoryview(data)[100:])
        assert stream.close() == len(data)
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(data)  # left at the end, as a write does
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data
    reference = new_hasher()
    reference.update(data)
    assert hasher.hexdigest() == reference.hexdigest()


def test_unaligned_start_goes_through_the_page_cache(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"abc")
        stream = FileStream(fd, new_hasher(), direct=True)
        assert not stream.direct  # O_DIRECT needs an aligned file offset
        stream.write(memoryview(b"x" * 10_000))
        stream.close()
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"abc" + b"x" * 10_000


def test_ramfs_refuses_o_direct_and_the_write_falls_back(
    ramfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not _takes_o_direct(ramfs)
    tensors = _tensors()
    with caplog.at_level(logging.INFO, logger="safepoint"):
        fd = os.open(ramfs / "a", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            stream = FileStream(fd, new_hasher(), direct=True)
            assert not stream.direct
            stream.close()
        finally:
            os.close(fd)
        first = _write(ramfs / "one.safetensors", tensors, direct=True)
        second = _write(ramfs / "two.safetensors", tensors, direct=None)
    assert first == second
    _check_file(ramfs / "one.safetensors", tensors, *first)
    said = [r for r in caplog.records if "refuses O_DIRECT" in r.getMessage()]
    assert len(said) == 1  # once, not per file


def test_tmpfs_write_is_exact(tmpfs: Path) -> None:
    # Linux >= 6.6 takes O_DIRECT on tmpfs; older kernels refuse it (EINVAL): both paths
    # must give the same file.
    tensors = _tensors()
    size, digest = _write(tmpfs / "t.safetensors", tensors, direct=True)
    _check_file(tmpfs / "t.safetensors", tensors, size, digest)


@pytest.mark.parametrize("where", ["disk", "ramfs"])
def test_commit_is_valid_on_either_path(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    directory = request.getfixturevalue("ramfs") if where == "ramfs" else tmp_path / "out"
    directory.mkdir(exist_ok=True)
    tensors = _tensors()
    info = Store(directory).commit(capture({"model": tensors}, step=3, copy=False))
    deep = inspect(info.path, deep=True)
    assert deep.valid, deep.problems
    assert torch.equal(load_file(str(info.path / "model.safetensors"))["big"], tensors["big"])


def _staged(tensors: dict[str, torch.Tensor]) -> TensorFile:
    """``tensors`` staged the way a background save stages them: into a file image."""
    staged = StagingBuffers().stage(capture({"model": tensors}, step=1, copy=False))
    content = staged.files["model.safetensors"]
    assert isinstance(content, TensorFile) and content.image is not None
    return content


def _write_staged(path: Path, content: TensorFile, *, direct: bool | None) -> tuple:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        chunks: list[int] = []
        size, digest = write_safetensors(
            fd, content.tensors, content.metadata, image=content.image, direct=direct,
            on_chunk=chunks.append,
        )  # fmt: skip
        os.fsync(fd)
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        assert os.lseek(fd, 0, os.SEEK_CUR) == size
    finally:
        os.close(fd)
    assert chunks[-1] == size and len(chunks) == -(-size // BUFFER_BYTES)
    return size, digest


def test_a_file_image_is_the_file_byte_for_byte(tmp_path: Path) -> None:
    tensors = _tensors()
    content = _staged(tensors)
    image = content.image
    assert image.data().nbytes % ALIGN == 0 and image.size % ALIGN != 0
    assert directio._address(image.data()) % ALIGN == 0  # O_DIRECT straight from it
    for name, t in tensors.items():
        assert torch.equal(content.tensors[name], t)
    _write(tmp_path / "reference.safetensors", tensors, direct=False, metadata=content.metadata)
    reference = (tmp_path / "reference.safetensors").read_bytes()
    assert bytes(image.data()[: image.size]) == reference
    assert not any(image.data()[image.size :])  # the padding O_DIRECT writes is zeros


@pytest.mark.parametrize("direct", [True, False])
def test_an_image_writes_the_same_file_with_or_without_o_direct(
    tmp_path: Path, direct: bool
) -> None:
    if direct and not _takes_o_direct(tmp_path):
        pytest.skip("the test directory's file system refuses O_DIRECT")
    tensors = _tensors()
    content = _staged(tensors)
    written = _write_staged(tmp_path / "image.safetensors", content, direct=direct)
    streamed = _write(
        tmp_path / "stream.safetensors", tensors, direct=False, metadata=content.metadata
    )
    assert written == streamed  # size and the checksum of the write pass
    _check_file(tmp_path / "image.safetensors", tensors, *written)


def test_ramfs_refuses_o_direct_for_an_image_and_it_falls_back(ramfs: Path) -> None:
    tensors = _tensors()
    written = _write_staged(ramfs / "image.safetensors", _staged(tensors), direct=True)
    _check_file(ramfs / "image.safetensors", tensors, *written)


def test_tmpfs_image_write_is_exact(tmpfs: Path) -> None:
    tensors = _tensors()
    written = _write_staged(tmpfs / "image.safetensors", _staged(tensors), direct=True)
    _check_file(tmpfs / "image.safetensors", tensors, *written)


def test_images_are_refilled_and_replaced_when_the_layout_changes() -> None:
    buffers = StagingBuffers()
    tensors = _tensors()
    first = buffers.stage(capture({"model": tensors}, step=1, copy=False))
    tensors["small"] += 1
    again = buffers.stage(capture({"model": tensors}, step=2, copy=False))
    one, two = (s.files["model.safetensors"] for s in (first, again))
    assert one.image is two.image  # the same memory, refilled
    assert torch.equal(two.tensors["small"], tensors["small"])
    assert buffers.missing_bytes(capture({"model": tensors}, step=3, copy=False)) == 0
    tensors["small"] = torch.zeros(4, 4)  # another shape: another layout
    grown = capture({"model": tensors}, step=3, copy=False)
    assert buffers.missing_bytes(grown) > tensors["big"].numel() * 4
    three = buffers.stage(grown).files["model.safetensors"]
    assert three.image is not one.image and torch.equal(three.tensors["small"], torch.zeros(4, 4))


def test_views_and_aliases_are_written_as_the_stream_writes_them(tmp_path: Path) -> None:
    shared = torch.arange(6.0)
    tensors = {"a": shared, "b": shared, "c": shared[:3], "t": torch.ones(3, 2).t()}
    content = _staged(tensors)
    size, digest = _write_staged(tmp_path / "f.safetensors", content, direct=None)
    assert hash_file(tmp_path / "f.safetensors") == (size, digest)
    streamed = tmp_path / "stream.safetensors"
    capture_files = capture({"model": tensors}, step=1, copy=False).files
    plain = capture_files["model.safetensors"]
    assert isinstance(plain, TensorFile)
    _write(streamed, plain.tensors, direct=False, metadata=plain.metadata)
    assert (tmp_path / "f.safetensors").read_bytes() == streamed.read_bytes()


def _cached_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


def test_small_files_go_through_the_page_cache_large_ones_around_it(tmp_path: Path) -> None:
    """By default only a file of ``DIRECT_MIN_BYTES`` or more is written with O_DIRECT
    (its bytes never enter the page cache); a smaller one is cached, and its fsync shares
    the journal commit of the save's other files."""
    if not _takes_o_direct(tmp_path) or not directio.ENABLED:
        pytest.skip("the test directory's file system refuses O_DIRECT")
    if subprocess.run(["which", "fincore"], capture_output=True).returncode:
        pytest.skip("no fincore (util-linux) to look into the page cache")
    small = {"w": torch.ones(16 << 10)}  # 64 KiB
    large = {"w": torch.ones(directio.DIRECT_MIN_BYTES // 4)}
    for name, tensors in (("small", small), ("large", large)):
        _write(tmp_path / f"{name}.safetensors", tensors, direct=None)
    assert _cached_bytes(tmp_path / "small.safetensors") > 0
    assert _cached_bytes(tmp_path / "large.safetensors") == 0
