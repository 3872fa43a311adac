"""``SafepointCallback`` with a sharded model: FSDP2, through transformers' own
``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))`` or
accelerate's FSDP plugin (``accelerate launch`` with FSDP, on GPUs).

Such a model's parameters are DTensors: each process holds a piece of every weight. The
callback then saves the weights as the state entry ``model`` of a sharded save (every
rank writes its own pieces, rank 0 commits once all are durable: ``engine/sharded.py``)
instead of ``model.safetensors`` / ``adapter_model.safetensors``, which would need the
whole model gathered on one process. The optimizer's state is sharded with it.

On resume the weights are loaded by safepoint, not by the Trainer, whenever the
checkpoint holds them as that entry or the live model is sharded (``weights_source``):
the Trainer gets a view without weights or with weights it must not load itself
(``weights_loaded_here`` skips its loading for that view), and the callback loads them in
``on_train_begin``, with the optimizer: each rank reads the slice it holds, whatever
number of processes saved it. So a run moves between one process (whole weights, the
Hugging Face files) and N sharded processes, both ways. The stock Trainer refuses to
checkpoint a model sharded at load time ("Resuming is not supported"); ``safepoint
export`` assembles the pieces into a ``model.safetensors`` that ``from_pretrained`` loads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from safepoint.errors import ConfigError, IncompatibleCheckpointError
from safepoint.format import read_safetensors
from safepoint.integrations.hf_layout import (
    adapter_tensors,
    is_peft,
    storage_of,
    weight_files,
)
from safepoint.restore import apply, read_state_doc
from safepoint.sharding import is_sharded, like, target_box
from safepoint.snapshot import TensorFile
from safepoint.validity import CheckpointInfo

WEIGHTS_ENTRY = "model"
"""The state entry that holds a sharded model's weights (the adapter's, for PEFT)."""

STATE = "state"
"""``weights_source``: the checkpoint's state entry ``model``, loaded by safepoint."""
VIEW = "view"
"""``weights_source``: the view's Hugging Face weight file, loaded by safepoint."""


def is_sharded_model(model: Any) -> bool:
    """Whether ``model`` is sharded: FSDP2 modules in it (their parameters are DTensors,
    or plain while unsharded between an evaluation's forward and the next step; their
    ``state_dict`` is DTensors either way), or DTensor parameters (tensor parallel)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for m in model.modules():
        if isinstance(m, FSDPModule):
            return True
        if isinstance(m, FullyShardedDataParallel):
            raise ConfigError(
                "SafepointCallback saves FSDP2 models, not FSDP1 (FullyShardedDataParallel) "
                "ones; use FSDP2: fsdp_version: 2 in the accelerate config or "
                "fsdp_config={'fsdp_version': 2} in the TrainingArguments"
            )
    return any(is_sharded(p) for p in model.parameters())


def weights_in_state(info: CheckpointInfo) -> bool:
    """Whether the checkpoint ``info`` holds its weights as the state entry ``model`` (a
    sharded model saved them) rather than as Hugging Face weight files."""
    assert info.manifest is not None
    files = info.manifest.files
    if "model.safetensors" in files or "adapter_model.safetensors" in files:
        return False
    return WEIGHTS_ENTRY in read_state_doc(info.path, info.manifest)["entries"]


def weights_source(info: CheckpointInfo, trainer: Any) -> str | None:
    """Who loads the weights of ``info`` into ``trainer``'s model: None, the Trainer
    itself from the view; ``STATE`` or ``VIEW``, the callback (a sharded checkpoint, or a
    model that is or will be sharded: the Trainer's FSDP loading reads only its own
    formats and its plain loading cannot fill DTensors)."""
    if weights_in_state(info):
        return STATE
    if is_sharded_model(trainer.model) or getattr(trainer, "is_fsdp_enabled", False):
        return VIEW
    return None


class AdapterWeights:
    """A PEFT model's adapter tensors as a state entry (``state_dict`` /
    ``load_state_dict``): a sharded LoRA run saves its adapter, not the base model."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(adapter_tensors(self.model, self.model.active_adapter))

    def check_state_dict(self, saved: dict[str, Any]) -> None:
        """``IncompatibleCheckpointError`` unless ``saved`` has this adapter's tensors."""
        live = self.state_dict()
        for name in sorted(set(saved) ^ set(live)):
            raise IncompatibleCheckpointError(
                f"the checkpoint's adapter does not fit this model ({name} is in one of "
                "them only); resume with the LoRA settings it was saved with"
            )
        for name, t in live.items():
            s = saved[name]
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(t.shape):
                raise IncompatibleCheckpointError(
                    f"the checkpoint's adapter tensor {name} does not fit this model "
                    f"({list(t.shape)}); resume with the LoRA settings it was saved with"
                )

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, t in self.state_dict().items():
                t.copy_(saved[name])


def weights_entry(model: Any) -> Any:
    """What the state entry ``model`` saves and loads: the adapter of a PEFT model, else
    the model itself (its ``state_dict``: DTensors when sharded)."""
    return AdapterWeights(model) if is_peft(model) else model


def model_state(model: Any) -> tuple[dict[str, Any], dict[str, TensorFile | bytes]]:
    """(state entries, files) that hold ``model``'s weights in a checkpoint: the entry
    ``model`` and the config when they are sharded, else the Hugging Face files. A PEFT
    model's weights are its adapter's: on a sharded base they may be plain tensors,
    saved as usual (found from the same tensors: this runs at every save)."""
    if is_peft(model):
        files = weight_files(model, copy_data=False)
        adapter = files["adapter_model.safetensors"]
        assert isinstance(adapter, TensorFile)
        if not any(map(is_sharded, adapter.tensors.values())):
            return {}, files
        config = "adapter_config.json"
        return {WEIGHTS_ENTRY: AdapterWeights(model)}, {config: files[config]}
    if not is_sharded_model(model):
        return {}, weight_files(model, copy_data=False)
    config_json = model.config.to_json_string(use_diff=True).encode()
    return {WEIGHTS_ENTRY: model}, {"config.json": config_json}


def load_view_weights(model: Any, info: CheckpointInfo, view: Path) -> None:
    """Load the Hugging Face weight file of ``view`` (a view of ``info``: read again,
    checked against ``info``'s manifest) into the sharded ``model``, each rank its slice;
    tied weights, stored once, fill every name that shares them."""
    assert info.manifest is not None
    name = "adapter_model.safetensors" if is_peft(model) else "model.safetensors"
    listed = info.manifest.files[name]
    tensors, _ = read_safetensors(view / name, size=listed.size, checksum=listed.checksum)
    target = weights_entry(model)
    live = target.state_dict()
    first = {storage_of(t): n for n, t in live.items() if n in tensors}
    for n, t in live.items():
        if n not in tensors and storage_of(t) in first:
            tensors[n] = tensors[first[storage_of(t)]]
    missing = sorted(set(live) - set(tensors))
    if missing:
        raise IncompatibleCheckpointError(
            f"{info.path / name} does not fit this model: missing {', '.join(missing[:3])}"
        )
    pieces = {}
    for n, t in live.items():
        offset, shape = target_box(t, tuple(tensors[n].shape))
        box = tuple(slice(o, o + k) for o, k in zip(offset, shape, strict=True))
        pieces[n] = like(t, tensors[n][box])
    target.load_state_dict(pieces)


@contextlib.contextmanager
def weights_loaded_here(trainer: Any, view: str | None) -> Iterator[None]:
    """While the Trainer runs: its own weight loading skips ``view`` (whose weights the
    callback loads); any other folder it loads as usual. ``view`` None: no change."""
    if view is None:
        yield
        return
    own = trainer.__dict__.get("_load_from_checkpoint")
    original = trainer._load_from_checkpoint

    def load(resume_from_checkpoint: str, model: Any = None) -> None:
        if str(resume_from_checkpoint) != view:
            original(resume_from_checkpoint, model)

    trainer._load_from_checkpoint = load
    try:
        yield
    finally:
        if own is None:
            del trainer._load_from_checkpoint  # the class's own again
        else:
            trainer._load_from_checkpoint = own


def load_weights(model: Any, info: CheckpointInfo, source: str | None, view: Path) -> None:
    """Load only the weights of ``info`` into ``model`` from ``source``
    (``weights_source``): its state entry, or the file of the verified ``view``."""
    if source == STATE:
        state = {WEIGHTS_ENTRY: weights_entry(model)}
        apply(info.path, state, rng=False, manifest=info.manifest, partial=True)
    elif source == VIEW:
        load_view_weights(model, info, view)
