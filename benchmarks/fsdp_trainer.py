"""A Trainer fine-tune of a model sharded over 2 processes (FSDP2, transformers'
``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2))``; torchrun,
gloo on CPU, OMP_NUM_THREADS=1): what saving costs with SafepointCallback and with the
stock Trainer, side by side, in one run of this script.

usage: python benchmarks/fsdp_trainer.py [--steps 9] [--save-every 3] [--layers 12]
                                         [--quick]

The stock Trainer refuses to checkpoint such a model ("Resuming is not supported"); the
most it saves is the weights alone (``save_only_model=True``), gathered whole and
written by rank 0 (``save_pretrained``). SafepointCallback saves the resumable state
(weights, AdamW state, scheduler, RNG, trainer state): every rank writes its own
pieces. The model: GPT-2 style, n_embd 768, ``--layers`` layers, vocabulary 1024 (86 M
parameters with 12 layers: 344 MB of float32 weights), batches of 2 x 64 random
tokens. Per configuration, a fresh torchrun; each rank times every save call
(``Trainer._save_checkpoint`` for stock, ``SafepointCallback._save`` for safepoint:
what the training loop waits for), and reports the bytes of the files it wrote and its
peak RSS (``ru_maxrss``, training included). Writes ``results/fsdp_trainer.md``.
``--quick``: 2 layers, to check that the script works (numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import leave_process_group, table, write_results

MODES = ("stock", "safepoint")
MODE_NAMES = {
    "stock": "stock Trainer (save_only_model: weights only, gathered to rank 0)",
    "safepoint": "SafepointCallback (resumable state, sharded)",
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def build_model(folder: Path, layers: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1024, n_positions=128, n_embd=768, n_layer=layers, n_head=12)
    config.bos_token_id = config.eos_token_id = 0  # GPT-2's 50256 is past this vocabulary
    GPT2LMHeadModel(config).save_pretrained(folder)


def _written(out: Path, since: float, rank: int) -> int:
    """Bytes of the files under ``out`` this rank wrote (safepoint: its pieces, named by
    rank; stock: rank 0 writes every file)."""
    total = 0
    for path in out.rglob("*"):
        if not path.is_file() or path.stat().st_mtime < since or path.suffix == ".jsonl":
            continue
        name = path.name
        if ".shard-" in name:
            mine = name.split(".shard-")[1].startswith(f"{rank + 1:05d}-")
        else:
            mine = rank == 0
        total += path.stat().st_size if mine else 0
    return total


def child(mode: str, model_dir: str, out: str, steps: int, save_every: int) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.distributed.configuration_utils import DistributedConfig

    from safepoint import SafepointCallback

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(fsdp_size=world)
    )
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, 1024, (steps * 2 * world, 64), generator=g)
    ]
    stock = mode == "stock"
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        logging_steps=steps + 1,
        save_strategy="steps" if stock else "no",
        save_steps=save_every,
        save_only_model=stock,  # the only saving the Trainer allows here
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    callbacks = [] if stock else [SafepointCallback(save_every=str(save_every))]
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    seconds: list[float] = []
    target: Any = trainer if stock else callbacks[0]
    name = "_save_checkpoint" if stock else "_save"
    inner = getattr(target, name)

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        result = inner(*a, **k)
        seconds.append(time.perf_counter() - t0)
        return result

    setattr(target, name, timed)
    started = time.time()
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    report = {
        "rank": rank,
        "saves": seconds,
        "train_s": train_s,
        "written": _written(Path(out), started, rank),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("REPORT " + json.dumps(report), flush=True)
    leave_process_group()


def run_mode(mode: str, model_dir: Path, base: Path, steps: int, save_every: int) -> list[dict]:
    out = base / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [__file__, "--child", mode, "--model-dir", str(model_dir), "--out", str(out)]
    cmd += ["--steps", str(steps), "--save-every", str(save_every)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1800)
    reports = [
        json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("REPORT ")
    ]
    if proc.returncode != 0 or len(reports) != 2:
        raise SystemExit(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return sorted(reports, key=lambda r: r["rank"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", choices=MODES)
    p.add_argument("--model-dir")
    p.add_argument("--out")
    a = p.parse_args()
    if a.child:
        child(a.child, a.model_dir, a.out, a.steps, a.save_every)
        return
    layers = 2 if a.quick else a.layers
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        base = Path(tmp)
        model_dir = base / "model"
        build_model(model_dir, layers)
        weights_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
        results = {m: run_mode(m, model_dir, base, a.steps, a.save_every) for m in MODES}
    rows, data = [], {"layers": layers, "weights_mb": weights_mb, "modes": results}
    for mode in MODES:
        ranks = results[mode]
        rows.append(
            [
                MODE_NAMES[mode],
                "yes" if mode == "safepoint" else "no",
                " / ".join(f"{statistics.median(r['saves']):.2f}" for r in ranks),
                " / ".join(f"{r['written'] / len(r['saves']) / 1e6:.0f}" for r in ranks),
                f"{ranks[0]['peak_rss_mb'] / 1e3:.2f}",
                " / ".join(f"{r['train_s']:.1f}" for r in ranks),
            ]
        )
    body = (
        f"GPT-2 style, {layers} layers, {weights_mb:.0f} MB of weights, 2 processes "
        f"(FSDP2 by DistributedConfig), {a.steps} steps, a save every {a.save_every}.\n\n"
        + table(
            [
                "saving",
                "resumable",
                "save call per rank, median (s)",
                "MB written per save, per rank",
                "rank 0 peak RSS (GB)",
                "train() per rank (s)",
            ],
            rows,
        )
    )
    write_results("fsdp_trainer", "Trainer + FSDP2: stock saving vs SafepointCallback", body, data)


if __name__ == "__main__":
    main()
