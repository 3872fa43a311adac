"""The Hugging Face on-disk layout of a checkpoint's model files and trainer state.

Written so that the Hugging Face tools load a safepoint checkpoint folder as they are:
``PeftModel.from_pretrained`` (LoRA), ``AutoModelForCausalLM.from_pretrained`` (full
fine-tune) and the Trainer's own resume path (``trainer_state.json``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from transformers import Trainer
from transformers.trainer_callback import ExportableState

from safepoint.sharding import is_sharded
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
    name = model.active_adapter
    tensors = {k: v.contiguous() for k, v in adapter_tensors(model, name).items()}
    return {
        "adapter_model.safetensors": TensorFile(
            copy_tensors(tensors) if copy_data else tensors, dict(_SAFETENSORS_META)
        ),
        "adapter_config.json": _adapter_config(model, name),
    }


# What PEFT's get_peft_model_state_dict returns is, for an adapter of plain modules, some
# parameters of the model under other names; finding them walks the whole model's
# state_dict (0.6 ms of a 1.8 ms LoRA save stall). They are found once per model and
# adapter (their module and attribute: a moved model's new tensors are seen) and looked
# up at each save. A tensor PEFT made (a state_dict hook, a quantized layer) is not a
# parameter: that adapter is asked of PEFT at every save.
_Source = tuple[str, Any, str]  # (name in the file, module, attribute)
_adapter_sources: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], list[_Source] | None]] = (
    weakref.WeakKeyDictionary()
)


def adapter_tensors(model: Any, name: str) -> dict[str, Any]:
    """``get_peft_model_state_dict(model, name)``, from the found parameters when it can."""
    from peft import get_peft_model_state_dict

    embeddings = _save_embedding_layers.get(model, {}).get(name)
    if embeddings is None:
        embeddings = _embedding_decision(model, name)
    key = (name, id(model.peft_config[name]))
    cache = _adapter_sources.setdefault(model, {})
    sources = cache.get(key)
    if sources:
        found = {}
        for file_key, module, attr in sources:
            tensor = module._parameters.get(attr)
            if tensor is None:
                tensor = module._buffers.get(attr)
            if tensor is None:
                break
            found[file_key] = tensor.detach()
        else:
            return found
    tensors = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=embeddings)
    cache[key] = _sources_of(model, tensors)
    return tensors


def _sources_of(model: Any, tensors: dict[str, Any]) -> list[_Source] | None:
    """Where each of ``tensors`` lies in ``model`` (a parameter or buffer viewed whole), or
    None if one is not found there."""
    owners = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for attr, t in table.items():
                if t is not None:
                    owners.setdefault(_identity(t), (module, attr))
    sources = []
    for file_key, t in tensors.items():
        owner = owners.get(_identity(t))
        if owner is None:
            return None
        sources.append((file_key, *owner))
    return sources


def _identity(t: Any) -> tuple[Any, ...]:
    return (t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride(), t.storage_offset())


# adapter_config.json of (model, adapter, config object): the deep copy and JSON of the
# config are 0.15 ms of every save; a config object does not change during a run.
_adapter_configs: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], bytes]] = (
    weakref.WeakKeyDictionary()
)


def _adapter_config(model: Any, name: str) -> bytes:
    key = (name, id(model.peft_config[name]))
    cached = _adapter_configs.get(model, {}).get(key)
    if cached is not None:
        return cached
    config = copy.deepcopy(model.peft_config[name])
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = model.base_model.model.__dict__.get("name_or_path")
    config.inference_mode = True
    doc = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    data = json.dumps(doc, indent=2, sort_keys=True, default=str).encode()
    _adapter_configs.setdefault(model, {})[key] = data
    return data


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


def storage_of(t: Any) -> int:
    """What tied tensors share: their storage (a DTensor's: its local piece's)."""
    local = t.to_local() if is_sharded(t) else t
    return local.untyped_storage().data_ptr() if local.numel() else id(t)


def model_files(model: Any, *, copy_data: bool) -> dict[str, TensorFile | bytes]:
    """``model.safetensors`` (tied weights stored once) + ``config.json``, loadable with
    ``AutoModelForCausalLM.from_pretrained(folder)``."""
    seen: set[int] = set()
    tensors = {}
    for key, t in model.state_dict().items():
        # Tied weights (lm_head = embeddings) share storage; keep the first name, as
        # save_pretrained does, and from_pretrained ties them again.
        ptr = storage_of(t)
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


def weight_files(model: Any, *, copy_data: bool) -> dict[str, TensorFile | bytes]:
    """The adapter's files for a PEFT model, else the whole model's."""
    weights = adapter_files(model, copy_data=copy_data) if is_peft(model) else None
    return weights or model_files(model, copy_data=copy_data)


def trainer_state_json(trainer: Trainer) -> bytes:
    """``trainer_state.json`` as ``Trainer._save_checkpoint`` writes it (JSON, no pickle)."""
    return trainer_state_later(trainer)()


def trainer_state_later(trainer: Trainer) -> Callable[[], bytes]:
    """``trainer_state_json`` of the state as it is now, encoded when called (by a
    background save's writer, while training goes on: a long log history took 0.4 ms of
    a LoRA save's stall). Its lists and dicts are copied now; the log entries themselves
    are never changed once logged, so each is encoded once per run (``_EncodedLog``)."""
    state = trainer.state
    for cb in [*trainer.callback_handler.callbacks, trainer.control]:
        if isinstance(cb, ExportableState):
            state.stateful_callbacks[cb.__class__.__name__] = cb.state()
    # The fields as they are, not dataclasses.asdict(state): that deep-copies the whole
    # log history first (most of this function's time, growing with the run).
    fields = {f.name: _frozen(getattr(state, f.name)) for f in dataclasses.fields(state)}
    log = _encoded_logs.setdefault(trainer, _EncodedLog())

    def encode() -> bytes:
        # No indent: json's C encoder works only without one; with indent=2 the
        # pure-Python encoder took 51 ms for a 2,000-step log history (19 ms without,
        # 0.2 ms once only the entries logged since the last save are encoded).
        history = fields.get("log_history")
        if not isinstance(history, list):
            return (_dumps(fields) + "\n").encode()
        # {..., "log_history": [...], ...} with sorted keys, cut where it goes: the same
        # bytes as json.dumps of the whole (tested).
        left = _dumps({k: v for k, v in fields.items() if k < "log_history"})
        right = _dumps({k: v for k, v in fields.items() if k > "log_history"})
        doc = (
            left[:-1]
            + ("," if len(left) > 2 else "")
            + f'"log_history":[{log.encode(history)}]'
            + ("," + right[1:] if len(right) > 2 else "}")
        )
        return (doc + "\n").encode()

    return encode


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_as_dict)


class _EncodedLog:
    """The JSON of a run's log history, entry by entry: the entries still in the same
    places (the same objects) since the last save are not encoded again."""

    def __init__(self) -> None:
        self.entries: list[Any] = []
        self.texts: list[str] = []

    def encode(self, history: list[Any]) -> str:
        same = 0
        for old, new in zip(self.entries, history, strict=False):
            if old is not new:
                break
            same += 1
        self.texts = self.texts[:same] + [_dumps(e) for e in history[same:]]
        self.entries = list(history)
        return ",".join(self.texts)


_encoded_logs: weakref.WeakKeyDictionary[Trainer, _EncodedLog] = weakref.WeakKeyDictionary()


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def _as_dict(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} in the trainer state is not JSON")


# One log_history entry of each kind as TRL's SFTTrainer writes them (the plain Trainer
# logs fewer keys): trainer_state.json grows by one per log and per evaluation.
_LOG_ENTRY = dict.fromkeys(
    ("entropy", "epoch", "grad_norm", "learning_rate", "loss", "mean_token_accuracy"), 1 / 3
) | {"num_tokens": 123456.0, "step": 12345}
_EVAL_ENTRY = {
    **dict.fromkeys(("epoch", "eval_entropy", "eval_loss", "eval_mean_token_accuracy"), 1 / 3),
    **dict.fromkeys(("eval_runtime", "eval_samples_per_second", "eval_steps_per_second"), 12.345),
    **{"eval_num_tokens": 123456.0, "step": 12345},
}


def _entry_bytes(entry: dict[str, Any]) -> int:
    one, two = ({"log_history": [entry] * n} for n in (1, 2))
    compact = {"sort_keys": True, "separators": (",", ":")}  # as trainer_state_json
    return len(json.dumps(two, **compact)) - len(json.dumps(one, **compact))


def trainer_state_bytes(trainer: Any, args: Any, state: Any) -> int:
    """``trainer_state.json`` at the end of the run: now, plus one entry per log and per
    evaluation still to come. The last checkpoints are the largest; sizing every kept one
    like them is what makes the pre-flight hold to the end of a long run (logging every
    step adds ~300 bytes a step: 3 MB at step 10,000)."""
    done, total = state.global_step, state.max_steps

    def count(strategy: Any, every: Any, final: bool) -> int:
        kind = str(getattr(strategy, "value", strategy))
        if kind == "epoch":
            return max(1, math.ceil(float(args.num_train_epochs)))
        if kind != "steps" or not every:
            return 0
        every = int(every)
        return total // every - done // every + int(final and total % every != 0)

    logs = count(args.logging_strategy, state.logging_steps, False) + int(
        bool(args.logging_first_step) and done == 0
    )
    evals = count(args.eval_strategy, state.eval_steps, True)
    return (
        len(trainer_state_json(trainer))
        + logs * _entry_bytes(_LOG_ENTRY)
        + evals * _entry_bytes(_EVAL_ENTRY)
    )


def trainer_schedule(args: Any) -> str | None:
    """The Trainer's own save schedule, in safepoint's terms, for when save_every is unset."""
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if strategy == "steps":
        steps = args.save_steps
        return f"{steps * 100:g}%" if 0 < steps < 1 else str(int(steps))
    if strategy == "epoch":
        return "epoch"
    return None
