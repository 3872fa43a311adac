"""The adapter files of a LoRA save are what PEFT itself would save, save after save,
though safepoint finds the adapter's parameters once instead of asking PEFT each time."""

from __future__ import annotations

from typing import Any

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safepoint.integrations.hf_layout import _adapter_sources, adapter_files  # noqa: E402


def _model(**lora: Any) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    )  # fmt: skip
    torch.manual_seed(0)
    return peft.get_peft_model(
        transformers.LlamaForCausalLM(config),
        peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], **lora),
    )


def _train_step(model: Any, opt: torch.optim.Optimizer) -> None:
    batch = torch.randint(0, 128, (2, 8))
    model(batch, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad()


def _same_as_peft(model: Any) -> None:
    files = adapter_files(model, copy_data=False)
    ours = files["adapter_model.safetensors"].tensors  # type: ignore[union-attr]
    theirs = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
        assert ours[key].data_ptr() == tensor.data_ptr(), key  # no copy: the live tensor


@pytest.mark.parametrize("lora", [{}, {"modules_to_save": ["lm_head"]}])
def test_adapter_tensors_stay_peft_s_over_training_and_a_moved_model(lora: dict) -> None:
    model = _model(**lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _same_as_peft(model)
    sources = _adapter_sources[model]
    assert all(v for v in sources.values())  # found once: plain parameters
    for _ in range(3):
        _train_step(model, opt)
        _same_as_peft(model)  # in-place updates are seen
    model.to(torch.float64)  # every parameter's tensor replaced: found again by name
    _same_as_peft(model)
    assert _adapter_sources[model] is sources


def test_tensors_peft_makes_itself_are_asked_of_peft_at_every_save() -> None:
    model = _model()
    lora_a = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A"))
    calls = []

    def copy_out(module: Any, state: dict, prefix: str, local: Any) -> None:
        calls.append(prefix)
        for key in list(state):
            if key.startswith(prefix):
                state[key] = state[key].clone()  # not the parameter any more

    lora_a._register_state_dict_hook(copy_out)
    _same_as_peft_values(model)
    assert list(_adapter_sources[model].values()) == [None]
    before = len(calls)
    _same_as_peft_values(model)
    assert len(calls) > before  # PEFT asked again


def _same_as_peft_values(model: Any) -> None:
    ours = adapter_files(model, copy_data=False)["adapter_model.safetensors"].tensors  # type: ignore[union-attr]
    theirs = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_adapter_config_json_is_the_config_peft_saves(tmp_path: Any) -> None:
    import json

    model = _model()
    first = adapter_files(model, copy_data=False)["adapter_config.json"]
    assert adapter_files(model, copy_data=False)["adapter_config.json"] is first  # cached
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = json.loads(first)  # type: ignore[arg-type]
    assert ours["inference_mode"] is True and ours["r"] == saved["r"] == 8
    assert sorted(ours["target_modules"]) == sorted(saved["target_modules"])
