"""The Hugging Face on-disk layout of a checkpoint's model files and trainer state.

Written so that the Hugging Face tools load a safepoint checkpoint folder as they are:
``PeftModel.from_pretrained`` (LoRA), ``AutoModelForCausalLM.from_pretrained`` (full
fine-tune) and the Trainer's own resume path (``trainer_state.json``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
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
    tensors = get_peft_model_state_dict(model, adapter_name=name)
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
    return (json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n").encode()
