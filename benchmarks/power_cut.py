"""Power cuts under four checkpoint writers of the same small LoRA run (issue #15).

usage: python benchmarks/power_cut.py [--k 6] [--samples 2] [--writers trainer,dcp,...]

Each writer trains the built-in tiny model with LoRA (8 steps, a save every 2, constant
LR, no dropout, so a resume is bit-exact) and checkpoints it its own way:

* ``trainer``: the stock transformers ``Trainer`` (``save_steps``), rerun with
  ``resume_from_checkpoint=True`` when a ``checkpoint-N`` folder exists;
* ``dcp``: ``torch.distributed.checkpoint.save`` in a plain loop, resumed from the newest
  folder holding a ``.metadata``;
* ``torch.save``: ``ckpt-N.pt`` in a plain loop, resumed from the newest file;
* ``safepoint``: ``Checkpointer`` in the same plain loop.

The run is recorded once on the power-cut file system (``safepoint.powercut``); then a
cut before each of K file events spread evenly over the run (first and after-the-end
included) leaves a *strict* state (only what was fsync'ed) and S *reordered* ones (plus a
seeded random part of the rest). The writer reruns on each state; verdicts:

* crashed/garbage: non-zero exit, traceback or timeout, or final weights that differ
  from the fault-free run's;
* lost > 1 interval: finished, but started further back than the newest checkpoint
  whose save had returned before the cut (or from scratch while one had);
* resumed intact: the rest (including a start from scratch when no save had returned).

This file is also the writers' script: ``power_cut.py --writer NAME OUT``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STEPS, SAVE_EVERY, BATCH = 8, 2, 4
WRITERS = ("trainer", "dcp", "torch.save", "safepoint")

# ------------------------------------------------------------------ the writers


def _setup() -> tuple[Any, list[dict[str, Any]]]:
    """The LoRA model (seeded) and the STEPS * BATCH tokenized rows, padded to 48."""
    import torch
    from peft import LoraConfig, get_peft_model

    from safepoint.app.tiny import load_tiny

    model, tok, data = load_tiny()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0))
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    texts = [p + c for p, c in zip(data["prompt"], data["completion"], strict=True)]
    enc = tok(texts[: STEPS * BATCH], padding="max_length", max_length=48, truncation=True)
    rows = []
    for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True):
        labels = [i if m else -100 for i, m in zip(ids, mask, strict=True)]
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return model, rows


def _batch(rows: list[dict[str, Any]], step: int) -> dict[str, Any]:
    import torch

    part = rows[step * BATCH : (step + 1) * BATCH]
    return {k: torch.tensor([r[k] for r in part]) for k in part[0]}


def _trainable(model: Any) -> dict[str, Any]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _final(model: Any) -> None:
    h = hashlib.sha256()
    for name, p in sorted(_trainable(model).items()):
        h.update(name.encode() + p.detach().contiguous().numpy().tobytes())
    print(f"final {h.hexdigest()}", flush=True)


def _saved(step: int) -> None:
    """After a save returned: the benchmark compares this clock with the journal's."""
    print(f"saved {step} {time.time():.4f}", flush=True)


def _newest(out: Path, pattern: str, ok: Any = lambda p: True) -> tuple[int, Path | None]:
    found = [(int(p.name.split("-")[1].split(".")[0]), p) for p in out.glob(pattern) if ok(p)]
    return max(found, default=(0, None))


def _loop(model: Any, rows: list[dict[str, Any]], opt: Any, start: int, save: Any) -> None:
    model.train()
    for step in range(start, STEPS):
        loss = model(**_batch(rows, step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        save(step + 1)


def run_trainer(out: Path) -> None:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, rows = _setup()
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        save_steps=SAVE_EVERY,
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )

    class Saved(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            print(f"start {state.global_step}", flush=True)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _saved(state.global_step)

    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[Saved()]
    )
    # what a user does: resume (from the newest checkpoint-N) when there is one
    trainer.train(resume_from_checkpoint=True if any(out.glob("checkpoint-*")) else None)
    _final(model)


def run_dcp(out: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    model, rows = _setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    start, path = _newest(out, "step-*", lambda p: (p / ".metadata").exists())
    if path is not None:
        # the optimizer's state tensors must exist before an in-place load: one zero step
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        lr = opt.param_groups[0]["lr"]
        opt.param_groups[0]["lr"] = 0.0
        opt.step()
        opt.param_groups[0]["lr"] = lr
        sd = state()
        dcp.load(sd, checkpoint_id=str(path))
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
    print(f"start {start}", flush=True)

    def save(step: int) -> None:
        if step % SAVE_EVERY == 0:
            dcp.save(state(), checkpoint_id=str(out / f"step-{step}"))
            _saved(step)

    _loop(model, rows, opt, start, save)
    _final(model)


def run_torch_save(out: Path) -> None:
    import torch

    model, rows = _setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start, path = _newest(out, "ckpt-*.pt")
    if path is not None:
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
    print(f"start {start}", flush=True)

    def save(step: int) -> None:
        if step % SAVE_EVERY == 0:
            sd = {"model": model.state_dict(), "optim": opt.state_dict()}
            torch.save(sd, out / f"ckpt-{step}.pt")
            _saved(step)

    _loop(model, rows, opt, start, save)
    _final(model)


def run_safepoint(out: Path) -> None:
    import torch

    from safepoint import Checkpointer

    model, rows = _setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": model, "optimizer": opt}
    with Checkpointer(out, save_every=SAVE_EVERY, total_steps=STEPS, keep_last=STEPS) as ckpt:
        start = ckpt.restore(state) or 0
        print(f"start {start}", flush=True)

        pending: list = []  # background saves (the default) return before they are durable

        def save(step: int) -> None:
            if (handle := ckpt.step(step, state)) is not None:
                pending.append(handle)
            while pending and pending[0].done:  # landed: now it counts as returned
                _saved(pending.pop(0).step)

        _loop(model, rows, opt, start, save)
    for handle in pending:  # close() waited for them
        _saved(handle.step)
    _final(model)


RUNNERS = {
    "trainer": run_trainer,
    "dcp": run_dcp,
    "torch.save": run_torch_save,
    "safepoint": run_safepoint,
}

# ------------------------------------------------------------------ the benchmark


def _parse(log: Path) -> tuple[int | None, dict[int, float], str | None]:
    start, saves, final = None, {}, None
    for line in log.read_text(errors="replace").splitlines():
        word, _, rest = line.partition(" ")
        if word == "start" and start is None:
            start = int(rest)
        elif word == "saved":
            step, t = rest.split()
            saves.setdefault(int(step), float(t))
        elif word == "final":
            final = rest.strip()
    return start, saves, final


def bench_writer(name: str, work: Path, k: int, samples: int) -> dict[str, Any]:
    from safepoint.app.chaos_powercut import record, spread
    from safepoint.app.chaos_process import Runner, last_line
    from safepoint.powercut import tree_digest

    safe = name.replace(".", "_")
    command = [sys.executable, str(Path(__file__).resolve()), "--writer", name, "{out}"]
    run = Runner(command, work / safe, 600)
    _, journal, seconds = record(run, "reference")
    _, saves, ref_final = _parse(run.logs / "reference.log")
    run.timeout = 3 * seconds + 60
    events = journal.numbered()
    print(f"{name}: {len(events)} file events, {len(saves)} saves, {seconds:.1f} s", flush=True)
    cases: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    for before in (i + 1 for i in spread(len(events) + 1, k)):
        t_cut = events[before - 1].rec["t"] if before <= len(events) else float("inf")
        expected = max((s for s, t in saves.items() if t < t_cut), default=0)
        modes = [("strict", 0)] + [("reordered", s) for s in range(samples)]
        for mode, seed in modes:
            label = f"k-{before}-{mode}-{seed}"
            state = journal.materialise(
                run.work / "states" / label, before=before, mode=mode, seed=seed
            )
            case = {"before": before, "mode": mode, "seed": seed, "expected": expected}
            digest = tree_digest(state)
            if digest in seen:  # the writer is deterministic: same state, same rerun
                case.update(start=seen[digest]["start"], outcome=seen[digest]["outcome"])
                case["same_as"] = seen[digest]["label"]
            else:
                log = run.logs / f"{label}.log"
                rc = run.wait(run.start(state, log), run.timeout)
                start, _, final = _parse(log)
                text = log.read_text(errors="replace")
                if rc != 0 or "Traceback (most recent call last)" in text:
                    why = "timeout" if rc is None else f"exit {rc}"
                    outcome = f"{why}: {last_line(log)}"
                elif final != ref_final:
                    outcome = "final weights differ"
                else:
                    outcome = ""
                case.update(start=start, outcome=outcome, label=label)
                seen[digest] = case
            if case["outcome"]:
                case["verdict"], case["why"] = "crashed", case["outcome"]
            elif case["start"] is not None and case["start"] < expected:
                case["verdict"] = "lost"
                case["why"] = f"started at {case['start']}, not {expected}"
            else:
                case["verdict"], case["why"] = "intact", ""
            if case["verdict"] == "intact" or "same_as" in case:
                shutil.rmtree(state)
            print(
                f"  {name} {label}: expected {expected}, started {case['start']}: "
                f"{case['verdict']} {case['why']}"[:200]
                + (f" (same state as {case['same_as']})" if "same_as" in case else ""),
                flush=True,
            )
            cases.append(case)
    count = {v: sum(c["verdict"] == v for c in cases) for v in ("intact", "lost", "crashed")}
    return {
        "writer": name,
        "file_events": len(events),
        "points": len({c["before"] for c in cases}),
        "states": len(cases),
        "distinct_states": len(seen),
        "after_save": sum(c["expected"] > 0 for c in cases),
        "fault_free_s": round(seconds, 1),
        **count,
        "cases": cases,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writer", choices=WRITERS, help="run one writer on OUT (internal)")
    p.add_argument("out", nargs="?")
    p.add_argument("--k", type=int, default=6, help="cut points per writer, spread evenly")
    p.add_argument("--samples", type=int, default=2, help="reordered samples per point")
    p.add_argument("--writers", default=",".join(WRITERS))
    p.add_argument("--workdir", help="keep the states here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.writer:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        RUNNERS[args.writer](out)
        return 0

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import table, write_results

    from safepoint.powercut import available

    why = available()
    if why is not None:
        print(f"power_cut: {why}", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="safepoint-power-cut-"))
    t0 = time.monotonic()
    results = [bench_writer(name, work, args.k, args.samples) for name in args.writers.split(",")]
    elapsed = time.monotonic() - t0
    headers = [
        "writer",
        "power-cut points",
        "states tested",
        "resumed intact",
        "lost > 1 interval",
        "crashed/garbage",
    ]
    rows = [
        [
            r["writer"],
            f"{r['points']} of {r['file_events'] + 1}",
            f"{r['states']} ({r['after_save']} after a save returned)",
            *(r[key] for key in ("intact", "lost", "crashed")),
        ]
        for r in results
    ]
    body = (
        f"{table(headers, rows)}\n\nLoRA on the built-in tiny model, {STEPS} steps, a save "
        f"every {SAVE_EVERY}; per point 1 strict + {args.samples} reordered states; "
        f"{elapsed / 60:.1f} min in all. Power-cut points: cuts before K of the run's N "
        "file events and after its end, spread evenly. The states that failed are kept "
        "in the `--workdir`."
    )
    write_results(
        "power_cut",
        "Power cuts under four checkpoint writers",
        body,
        {"k": args.k, "samples": args.samples, "seconds": round(elapsed), "writers": results},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
