"""Staging: the host copy a background save writes from, laid out as its files.

A background save copies the state first (the stall: the only time training waits),
then a thread writes that copy while training goes on. Each tensor file of CPU tensors
is staged into a *file image*: one page-aligned buffer holding the safetensors header
and every tensor's bytes exactly where they lie in the file. The staging copy puts each
byte in its place, and the writer hashes the image and hands it to ``O_DIRECT`` as it
lies: no second copy through a bounce buffer, which cost the training cores a memcpy of
every byte (``benchmarks/save_overhead.py``, rows "bounce buffer" and "file images").

Files holding CUDA tensors keep one pinned buffer per tensor (a ``non_blocking`` DMA
target) and go through ``directio.FileStream``'s bounce buffer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch

from safepoint.directio import ALIGN
from safepoint.fence import can_stay_live
from safepoint.format import safetensors_layout
from safepoint.snapshot import Snapshot, TensorFile

IMAGES = os.environ.get("SAFEPOINT_FILE_IMAGES", "1") != "0"
"""Stage CPU tensor files into file images (``SAFEPOINT_FILE_IMAGES=0``: one buffer per
tensor, written through the bounce buffer, as before; kept for the benchmark)."""


class FileImage:
    """A safetensors file in page-aligned host memory, byte for byte as on disk.

    ``views`` are the tensors, as views into the image at their file offsets; the block
    after the last byte is zeros (``O_DIRECT`` writes whole blocks; the writer truncates).
    Built for one layout (``head``: names, dtypes, shapes, metadata) and refilled by
    every save with the same layout.
    """

    def __init__(self, head: bytes, order: list[str], tensors: Mapping[str, torch.Tensor]) -> None:
        self.head = head
        self.size = len(head) + sum(tensors[n].numel() * tensors[n].element_size() for n in order)
        blocks = max(-(-self.size // ALIGN), 1) * ALIGN
        base = torch.empty(blocks + ALIGN, dtype=torch.uint8)
        skip = -base.data_ptr() % ALIGN
        self.buffer = base[skip : skip + blocks]
        self.buffer[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        self.buffer[self.size :] = 0
        self.views: dict[str, torch.Tensor] = {}
        offset = len(head)
        for name in order:
            t = tensors[name]
            end = offset + t.numel() * t.element_size()
            self.views[name] = self.buffer[offset:end].view(t.dtype).view(t.shape)
            offset = end

    @classmethod
    def build(
        cls, head: bytes, order: list[str], tensors: Mapping[str, torch.Tensor]
    ) -> FileImage | None:
        """An image for this layout, or None where a dtype cannot be viewed at its
        offset (an element wider than the 8-byte alignment safetensors keeps)."""
        try:
            return cls(head, order, tensors)
        except RuntimeError:
            return None

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def data(self) -> memoryview:
        """The whole image (``size`` bytes, then zeros up to the block boundary)."""
        return memoryview(self.buffer.numpy()).cast("B")


class StagingBuffers:
    """Reusable host-memory copies of a snapshot's tensors, for background saves.

    CPU tensor files are staged into ``FileImage``s, reused while a file keeps its layout;
    files with CUDA tensors into one pinned buffer per tensor (so that the copy is a
    ``non_blocking`` DMA), reused while a tensor keeps its shape and dtype. What the latest
    ``stage`` did not use is released, so the memory held is one checkpoint's worth. Not
    thread-safe: the caller must not stage while a writer still reads the last snapshot.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._images: dict[str, FileImage] = {}
        self.pending: list[Any] = []  # CUDA events the writer must wait for
        # the layout of each TensorFile asked by missing_bytes, reused by the stage that
        # follows it (the same objects; 50 us of a LoRA save's stall)
        self._layouts: dict[int, tuple[TensorFile, tuple[bytes, list[str]]]] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values()) + sum(
            image.nbytes for image in self._images.values()
        )

    def missing_bytes(self, snapshot: Snapshot, *, live: set[int] | None = None) -> int:
        """Bytes ``stage(snapshot, live=live)`` would have to allocate (no reuse)."""
        total = 0
        for fname, content in _tensor_files(snapshot):
            if live and all(can_stay_live(t, live) for t in content.tensors.values()):
                continue
            if _imaged(content):
                image = self._images.get(fname)
                head, _ = self._layout(content)
                if image is None or image.head != head:
                    total += len(head) + content.nbytes
                continue
            for name, t in _unique(content):
                buf = self._buffers.get((fname, name))
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    total += t.numel() * t.element_size()
        return total

    def stage(self, snapshot: Snapshot, *, live: set[int] | None = None) -> Snapshot:
        """A copy of ``snapshot`` whose tensors live in these buffers (a true copy).

        CUDA copies are queued ``non_blocking`` on the current stream, so they are ordered
        before the next step's kernels; ``ready()`` waits for them (the writer calls it).
        ``live``: storages that may be written as they are (``fence.owned_storages``); a
        file whose every tensor is in it is not copied.
        """
        files: dict[str, TensorFile | bytes] = dict(snapshot.files)
        used: set[tuple[str, str]] = set()
        images: dict[str, FileImage] = {}
        self.pending = []
        cuda = False
        for fname, content in _tensor_files(snapshot):
            if live and all(can_stay_live(t, live) for t in content.tensors.values()):
                continue  # written as it is, under the fence
            image = self._image(fname, content) if _imaged(content) else None
            if image is not None:
                with torch.no_grad():
                    for name, view in image.views.items():
                        view.copy_(content.tensors[name].detach())
                images[fname] = image
                files[fname] = TensorFile(dict(image.views), content.metadata, image=image)
                continue
            copies: dict[int, torch.Tensor] = {}
            for name, t in _unique(content):
                buf = self._buffer((fname, name), t)
                used.add((fname, name))
                non_blocking = t.device.type == "cuda"
                cuda = cuda or non_blocking
                with torch.no_grad():
                    buf.copy_(t.detach(), non_blocking=non_blocking)
                copies[id(t)] = buf
            out = {name: copies[id(t)] for name, t in content.tensors.items()}
            files[fname] = TensorFile(out, content.metadata)
        self._images = images
        self._layouts.clear()
        for key in set(self._buffers) - used:
            del self._buffers[key]
        if cuda:
            event = torch.cuda.Event()
            event.record()
            self.pending.append(event)
        # A new Snapshot, sharing ``deferred`` with the original: ``resolve`` rebinds its
        # own ``deferred`` (never changes the dict), so resolving the staged copy on the
        # writer leaves the original's untouched, and it is never encoded.
        return replace(snapshot, files=files)

    def _layout(self, content: TensorFile) -> tuple[bytes, list[str]]:
        known = self._layouts.get(id(content))
        if known is not None and known[0] is content:
            return known[1]
        layout = safetensors_layout(content.tensors, content.metadata)
        self._layouts[id(content)] = (content, layout)
        return layout

    def _image(self, fname: str, content: TensorFile) -> FileImage | None:
        head, order = self._layout(content)
        image = self._images.get(fname)
        if image is not None and image.head == head:
            return image
        self._images.pop(fname, None)  # its memory goes before the new image's comes
        return FileImage.build(head, order, content.tensors)

    def _buffer(self, key: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.device.type == "cuda" and torch.cuda.is_available()
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        return buf

    def ready(self) -> None:
        """Block until the queued device-to-host copies of the last ``stage`` are done."""
        for event in self.pending:
            event.synchronize()
        self.pending = []

    def release(self) -> None:
        """Drop every buffer (memory goes back once the last snapshot using it is gone)."""
        self._buffers.clear()
        self._images.clear()
        self._layouts.clear()


def _tensor_files(snapshot: Snapshot) -> Iterator[tuple[str, TensorFile]]:
    for fname, content in snapshot.files.items():
        if isinstance(content, TensorFile):
            yield fname, content


def _imaged(content: TensorFile) -> bool:
    return IMAGES and all(t.device.type == "cpu" for t in content.tensors.values())


def _unique(content: TensorFile) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) once per tensor object: aliases share one buffer."""
    seen: set[int] = set()
    for name, t in content.tensors.items():
        if id(t) not in seen:
            seen.add(id(t))
            yield name, t


__all__ = ["FileImage", "StagingBuffers"]
