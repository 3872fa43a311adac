"""The Hugging Face on-disk layout of a checkpoint's model files and trainer state.

Written so that the Hugging Face tools load a safepoint checkpoint folder as they are:
``PeftModel.from_pretrained`` (LoRA), ``AutoModelForCausalLM.from_pretrained`` (full
fine-tune) and the Trainer's own resume path (``trainer_state.json``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
import weakref
from typing import Any

from transformers import Trainer
from transformers.trainer_callback import ExportableState

from safepoint.snapshot import TensorFile, copy_tensors

TRAINER_STATE_NAME = "trainer_state.json"
_SAFETENSORS_META = {"format": "pt"}


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def adapter_files(model: Any, *, copy_data: bool) -> dict[str, TensorFile | bytes]:
    """``adapter_model.safetensors`` + ``adapter_config.json`` as ``PeftModel.save_pretrained``
    writes them, so ``PeftModel.from_pretrained(folder)`` loads the folder as is."""
    from peft import get_peft_model_state_dict

    name = model.active_adapter
    embeddings = _save_embedding_layers.get(model, {}).get(name)
    if embeddings is None:
        embeddings = _embedding_decision(model, name)
    tensors = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=embeddings)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    config = copy.deepcopy(model.peft_config[name])
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = model.base_model.model.__dict__.get("name_or_path")
    config.inference_mode = True
    doc = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    return {
        "adapter_model.safetensors": TensorFile(
            copy_tensors(tensors) if copy_data else tensors, dict(_SAFETENSORS_META)
        ),
        "adapter_config.json": json.dumps(doc, indent=2, sort_keys=True, default=str).encode(),
    }


# PEFT's save_embedding_layers="auto" looks for the base model's config.json at every
# call (on disk, or on the Hub when the name is not a folder) and loads it to compare
# vocabulary sizes: a few ms of every LoRA save's stall, or a network round trip. The
# answer cannot change during a run, so it is taken once per model and adapter.
_save_embedding_layers: weakref.WeakKeyDictionary[Any, dict[str, bool]] = (
    weakref.WeakKeyDictionary()
)


def _embedding_decision(model: Any, name: str) -> bool:
    """What ``save_embedding_layers="auto"`` decides for ``model``, worked out by PEFT once."""
    from peft import get_peft_model_state_dict

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers="auto")
    decision = any("save_embedding_layers` to `True`" in str(w.message) for w in seen)
    for w in seen:  # the caller still sees what PEFT said, once
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    _save_embedding_layers.setdefault(model, {})[name] = decision
    return decision


def model_files(model: Any, *, copy_data: bool) -> dict[str, TensorFile | bytes]:
    """``model.safetensors`` (tied weights stored once) + ``config.json``, loadable with
    ``AutoModelForCausalLM.from_pretrained(folder)``."""
    seen: set[int] = set()
    tensors = {}
    for key, t in model.state_dict().items():
        # Tied weights (lm_head = embeddings) share storage; keep the first name, as
        # save_pretrained does, and from_pretrained ties them again.
        ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if ptr in seen:
            continue
        seen.add(ptr)
        tensors[key] = t.contiguous()
    files: dict[str, TensorFile | bytes] = {
        "model.safetensors": TensorFile(
            copy_tensors(tensors) if copy_data else tensors, dict(_SAFETENSORS_META)
        ),
        "config.json": model.config.to_json_string(use_diff=True).encode(),
    }
    return files


def trainer_state_json(trainer: Trainer) -> bytes:
    """``trainer_state.json`` as ``Trainer._save_checkpoint`` writes it (JSON, no pickle)."""
    state = trainer.state
    for cb in [*trainer.callback_handler.callbacks, trainer.control]:
        if isinstance(cb, ExportableState):
            state.stateful_callbacks[cb.__class__.__name__] = cb.state()
    # No indent: json's C encoder works only without one; with indent=2 the pure-Python
    # encoder took 51 ms for a 2,000-step log history (19 ms without), in the save stall.
    doc = json.dumps(dataclasses.asdict(state), sort_keys=True, separators=(",", ":"))
    return (doc + "\n").encode()
