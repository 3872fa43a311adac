"""Pre-flight size estimate: accuracy against the real checkpoint, and its cost.

usage: python benchmarks/preflight.py [--max-params 25e6]

For each state, estimates one checkpoint's size before the first optimizer step (as the
pre-flight check does: Adam-style state does not exist yet), then trains one step,
saves with a real Checkpointer and compares with the bytes on disk (every file, the
manifest included). The estimate must stay within 10% and copy no tensor.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results

from safepoint import Checkpointer
from safepoint.disk import estimate_checkpoint_bytes
from safepoint.snapshot import TensorFile, capture


def mlp(params: float, optimizer: str) -> tuple[dict[str, Any], Callable[[], None], dict]:
    width = int((params / 2) ** 0.5)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, width))
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-4)
        if optimizer == "adamw"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )

    def step() -> None:
        model(torch.randn(2, width)).sum().backward()
        opt.step()

    return {"model": model, "optimizer": opt}, step, {}


def wrapped(params: float) -> tuple[dict[str, Any], Callable[[], None], dict]:
    """AdamW inside accelerate's AcceleratedOptimizer, as a Trainer hands it over (issue
    #12: the wrapper hid AdamW's lazily created state, and the estimate was 2-3x low)."""
    from accelerate import Accelerator

    state, step, extra = mlp(params, "adamw")
    state["optimizer"] = Accelerator(cpu=True).prepare_optimizer(state["optimizer"])
    return state, step, extra


def lora() -> tuple[dict[str, Any], Callable[[], None], dict]:
    import peft
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4,
    )  # fmt: skip
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(config),
        peft.LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        ids = torch.randint(0, 4096, (2, 16))
        model(ids, labels=ids).loss.backward()
        opt.step()

    def files() -> dict[str, TensorFile | bytes]:
        return {"adapter_model.safetensors": TensorFile(peft.get_peft_model_state_dict(model))}

    return {"optimizer": opt}, step, {"files": files}


def measure(name: str, build: Callable[[], tuple]) -> list[Any]:
    state, train_step, extra = build()
    files = extra.get("files")
    t0 = time.perf_counter()
    estimate = estimate_checkpoint_bytes(state, extra_files=files() if files else None)
    cost = time.perf_counter() - t0
    train_step()
    with tempfile.TemporaryDirectory() as tmp, Checkpointer(tmp, check_disk=False) as ckpt:
        snapshot = capture(state, step=1, copy=False)
        if files:
            snapshot.files.update(files())
        info = ckpt.commit(snapshot).wait()
        real = sum(p.stat().st_size for p in info.path.iterdir())
    error = (estimate - real) / real
    return [name, real / 1e6, estimate / 1e6, f"{error:+.2%}", cost * 1e3]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-params", type=float, default=25e6)
    args = p.parse_args()
    cases: list[tuple[str, Callable[[], tuple]]] = []
    for n in (1e6, 5e6, args.max_params):
        cases.append((f"MLP {n / 1e6:g}M params, AdamW", lambda n=n: mlp(n, "adamw")))
    cases.append(("MLP 5M params, SGD momentum", lambda: mlp(5e6, "sgd")))
    cases.append(("MLP 5M params, AdamW in accelerate's wrapper", lambda: wrapped(5e6)))
    cases.append(("Llama 4x256 + LoRA r=16, AdamW", lora))
    rows = [measure(name, build) for name, build in cases]
    headers = ["state", "real MB", "estimate MB", "error", "estimate ms"]
    write_results(
        "preflight",
        "Pre-flight checkpoint size estimate vs the real checkpoint",
        table(headers, rows),
        {"headers": headers, "rows": rows},
    )


if __name__ == "__main__":
    main()
