"""Training time lost to checkpointing: no saving vs stock Trainer vs safepoint sync / async.

usage: python benchmarks/save_overhead.py [--quick] [--only full,lora,writer,busy]
       [--steps N] [--save-every N] [--dir DIR] [--layers N] [--repeat N]

(a) full fine-tune of a GPT-2-style model built from config (n_embd 768, 12 layers,
    vocabulary 1024: ~86M parameters, ~1 GB of weights + AdamW state), saving every 5
    steps, under the plain ``transformers.Trainer``;
(b) the default LoRA run of ``safepoint train`` (TRL SFTTrainer + PEFT, built-in model
    and data), saving every 10 steps and evaluating every 5 (the evaluations that do not
    save are each run's own control: "lost, paired");
(c) writer: the background write path. Step time of a plain training loop while 1 GB
    is written and fsync'd over and over: page cache or O_DIRECT, hash in the write
    pass or after it (read back), a thread (nice 0 / 10) or a process.
(d) on_busy: a plain loop saving every step, faster than the disk can write, with
    ``on_busy="wait"`` vs ``"skip"``: total time, saves done, stall.

Each variant runs in its own process (clean peak RSS). Per variant: per-save training
stall (median, max: the wall time of the save call, ``Trainer._save_checkpoint`` for the
stock one, ``SafepointCallback._save`` for safepoint; the run record's ``stall_s``, the
capture-to-handover part, as a column of its own), total train() time and its overhead
over no saving, split into the steps' share (stalls, and steps slowed by the writes
beside them) and what comes after the last step (the final save's write); for (b) also
the time lost paired inside each run. The "floor" variant is the least a background
save can cost here: the copy to host memory and an ``O_DIRECT`` write and fsync of the
same bytes, nothing else. Also: save start -> durable commit, write throughput next to
``dd conv=fsync`` of the same size measured in the same run, peak RSS. ``--quick``
shrinks everything to check that the script works (numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import dd_seconds, table, write_results

VARIANTS = (
    "none",
    "floor",
    "stock",
    "sync",
    "async-cache",
    "async-nice",
    "async-bounce",
    "async-other",
    "async-free",
    "async",
)
# environment of a variant's child process (read by safepoint at import)
VARIANT_ENV = {
    "async-cache": {"SAFEPOINT_DIRECT_IO": "0"},  # the write path before issue #14
    "async-nice": {"SAFEPOINT_WRITER_NICE": "10"},
    "async-bounce": {"SAFEPOINT_FILE_IMAGES": "0"},  # O_DIRECT through a bounce buffer
    "async-other": {"SAFEPOINT_WRITER_BATCH": "0"},  # the writer thread before SCHED_BATCH
}
VARIANT_NAMES = {
    "none": "no saving",
    "floor": "floor: copy to host + O_DIRECT write + fsync, nothing else",
    "stock": "stock Trainer",
    "sync": "safepoint sync",
    "async-cache": "safepoint async, page cache",
    "async-nice": "safepoint async, writer nice 10",
    "async-bounce": "safepoint async, O_DIRECT via bounce buffer",
    "async-other": "safepoint async, writer SCHED_OTHER",
    "async-free": "safepoint async, copy-free (optimizer.step waits)",
    "async": "safepoint async (file images, O_DIRECT)",
}
SAFEPOINT_VARIANTS = (
    "sync",
    "async-cache",
    "async-nice",
    "async-bounce",
    "async-other",
    "async-free",
    "async",
)
ALL_PARTS = ("full", "lora", "writer", "busy")
RESULT_TAG = "RESULT "


# ------------------------------------------------------------------ child: Trainer runs


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _StepClock:
    """A TrainerCallback recording the wall time of each optimizer step."""

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class StepClock(TrainerCallback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.last = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                now = time.perf_counter()
                self.times.append(now - self.last)
                self.last = now

        return StepClock()


class _FloorSave:
    """The physical floor of a background save, as a TrainerCallback: at each save step
    copy the model and optimizer tensors into one reused page-aligned host buffer (the
    stall), then a thread writes it to one file with ``O_DIRECT`` and fsyncs it. No
    format, hash, manifest, rename or retention; the next save and the end of training
    wait for the write, as safepoint's ``on_busy="wait"`` does."""

    def __new__(cls, save_every: int, out: Path) -> Any:
        import mmap
        import threading

        import torch
        from transformers import TrainerCallback

        class FloorSave(TrainerCallback):
            def __init__(self) -> None:
                self.buffer: mmap.mmap | None = None
                self.thread: threading.Thread | None = None
                out.mkdir(parents=True, exist_ok=True)

            def tensors(self, model: Any, optimizer: Any) -> list[torch.Tensor]:
                # what a checkpoint must hold at least: the trained parameters (all of
                # them, or LoRA's adapter) and their optimizer state
                trained = [p for p in model.parameters() if p.requires_grad]
                state = [t for s in optimizer.state.values() for t in s.values()]
                return [*trained, *(t for t in state if torch.is_tensor(t) and t.dim())]

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step % save_every == 0:
                    self.save(state.global_step, kw["model"], kw["optimizer"])

            def save(self, step: int, model: Any, optimizer: Any) -> None:
                self.join()
                tensors = self.tensors(model, optimizer)
                size = sum(t.numel() * t.element_size() for t in tensors)
                size += -size % 4096  # O_DIRECT: whole blocks
                if self.buffer is None:
                    self.buffer = mmap.mmap(-1, size)
                flat = torch.frombuffer(self.buffer, dtype=torch.uint8)
                at = 0
                for t in tensors:
                    n = t.numel() * t.element_size()
                    flat[at : at + n].copy_(t.detach().reshape(-1).view(torch.uint8))
                    at += n
                self.thread = threading.Thread(target=self.write, args=(out / f"{step}.bin",))
                self.thread.start()

            def write(self, path: Path) -> None:
                assert self.buffer is not None
                view = memoryview(self.buffer)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
                try:
                    for at in range(0, len(view), 8 << 20):
                        os.write(fd, view[at : at + (8 << 20)])
                    os.fsync(fd)
                finally:
                    os.close(fd)
                for old in sorted(out.glob("*.bin"), key=lambda p: int(p.stem))[:-2]:
                    old.unlink()

            def join(self) -> None:
                if self.thread is not None:
                    self.thread.join()

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self.join()

        return FloorSave()


def _callbacks(variant: str, save_every: int, out: Path) -> list[Any]:
    if variant == "floor":
        return [_FloorSave(save_every, out)]
    if variant in SAFEPOINT_VARIANTS:
        from safepoint import SafepointCallback

        return [
            SafepointCallback(
                output_dir=out,
                save_every=str(save_every),
                keep_last=2,
                async_save=variant.startswith("async"),
                copy_free=variant == "async-free",  # no staging copy: optimizer.step() waits
                resume=False,
            )
        ]
    return []


def _time_calls(owner: Any, name: str) -> list[float]:
    """Wall seconds of each call of ``owner.<name>`` from now on (the training thread
    waits for all of it): the stock Trainer's ``_save_checkpoint``, safepoint's save."""
    stalls: list[float] = []
    real = getattr(owner, name)

    def timed(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            stalls.append(time.perf_counter() - t0)

    setattr(owner, name, timed)
    return stalls


def _run_trainer(trainer: Any, variant: str, out: Path) -> dict[str, Any]:
    clock = _StepClock()
    trainer.add_callback(clock)
    stalls = _time_calls(trainer, "_save_checkpoint") if variant == "stock" else []
    if variant == "floor":
        floor = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "join"))
        stalls = _time_calls(floor, "save")
    if variant in SAFEPOINT_VARIANTS:
        from safepoint import SafepointCallback

        cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SafepointCallback))
        stalls = _time_calls(cb, "_save")  # measured as the stock one: the whole call
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    result: dict[str, Any] = {
        "total_s": total,
        "step_s": statistics.median(clock.times) if clock.times else None,
        "step_times": clock.times,
        "peak_rss": _peak_rss(),
        "stalls": stalls,
    }
    if variant in SAFEPOINT_VARIANTS:
        from safepoint.records import read_events

        saves = [e for e in read_events(out) if e["event"] == "save" and "stall_s" in e]
        result["recorded_stalls"] = [e["stall_s"] for e in saves]  # capture to handover
        result["commit_s"] = [e.get("commit_s") for e in saves]
        result["write_s"] = [e.get("write_s") for e in saves]
        result["bytes"] = [e.get("bytes") for e in saves]
        result["waits"] = sum(1 for e in read_events(out) if e["event"] == "save_busy")
        fences = [e["wait_s"] for e in read_events(out) if e["event"] == "save_fence"]
        result["fence_s"] = sum(fences)  # copy-free: optimizer.step() waiting for the writer
        result["modes"] = sorted({e.get("mode") for e in saves})
    if variant == "floor":
        result["bytes"] = [max(f.stat().st_size for f in out.glob("*.bin"))]
    if variant == "stock":
        ck = sorted(out.glob("checkpoint-*"))
        if ck:
            result["bytes"] = [sum(f.stat().st_size for f in ck[-1].rglob("*") if f.is_file())]
    return result


def _memcpy_floor(model: Any, optimizer: Any) -> float:
    """Seconds to copy the model + optimizer state into reused host buffers."""
    from safepoint.snapshot import capture
    from safepoint.staging import StagingBuffers

    buffers = StagingBuffers()
    snap = capture({"model": model, "optimizer": optimizer}, step=0, copy=False, rng=False)
    buffers.stage(snap)  # allocates
    t0 = time.perf_counter()
    buffers.stage(snap)
    return time.perf_counter() - t0


def child_full(
    variant: str, out: Path, steps: int, save_every: int, quick: bool, layers: int | None = None
) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    layers = layers or (2 if quick else 12)
    config = GPT2Config(vocab_size=1024, n_positions=128, n_embd=768, n_layer=layers, n_head=12)
    model = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, 1024, (steps * 2, 64), generator=g)
    ]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        logging_steps=steps + 1,
        save_strategy="steps" if variant == "stock" else "no",
        save_steps=save_every,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=_callbacks(variant, save_every, out)
    )
    result = _run_trainer(trainer, variant, out)
    result["params"] = sum(p.numel() for p in model.parameters())
    if variant == "async":
        result["memcpy_s"] = _memcpy_floor(model, trainer.optimizer)
    return result


def child_lora(variant: str, out: Path, steps: int, save_every: int, quick: bool) -> dict:
    from transformers.trainer_utils import SaveStrategy

    from safepoint.app.config import TrainConfig
    from safepoint.app.job import build_trainer, plan

    # Evaluation every half interval: the steps that evaluate without saving are each
    # run's own control for the ones that evaluate and save (``_paired``).
    half = save_every // 2 if save_every % 2 == 0 else None
    cfg = TrainConfig(
        output_dir=str(out), save_every=str(save_every), max_steps=steps, eval_every=half
    )
    p = plan(cfg)
    callbacks = _callbacks(variant, save_every, out)
    if callbacks:
        trainer = build_trainer(p, callbacks[0])
    else:
        from transformers import TrainerCallback

        trainer = build_trainer(p, TrainerCallback())
        if variant == "stock":
            trainer.args.save_strategy = SaveStrategy.STEPS
            trainer.args.save_steps = save_every
            trainer.args.save_total_limit = 2
    result = _run_trainer(trainer, variant, out)
    if variant == "async":
        result["memcpy_s"] = _memcpy_floor(trainer.model, trainer.optimizer)
    return result


# ------------------------------------------------------------ child: thread vs process


WRITE_PATHS = {
    # name: (direct, hash after, nice, in a process, from a file image)
    "thread, page cache, hash in pass": (False, False, 0, False, False),
    "thread, page cache, hash after": (False, True, 0, False, False),
    "thread, O_DIRECT via bounce buffer, hash in pass": (True, False, 0, False, False),
    "thread, O_DIRECT from file image, hash in pass": (True, False, 0, False, True),
    "thread nice 10, O_DIRECT via bounce buffer": (True, False, 10, False, False),
    "process, O_DIRECT via bounce buffer": (True, False, 0, True, False),
}


def _write_once(tensors: dict, path: Path, direct: bool, hash_after: bool, image: Any) -> None:
    """One tensor file written and fsync'd the way a save does, by ``direct``/``hash_after``
    (``image``: a staged ``FileImage`` of ``tensors``, written as it lies)."""
    from safepoint.fileio import hash_file, write_all
    from safepoint.format import write_safetensors

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if hash_after:  # the old two-pass way: write, then read the file back to hash it
            for t in tensors.values():
                write_all(fd, memoryview(t.numpy()).cast("B"))
        else:
            write_safetensors(fd, tensors, direct=direct, image=image)
        os.fsync(fd)
    finally:
        os.close(fd)
    if hash_after:
        hash_file(path)
    path.unlink()


def _write_loop(
    tensors: dict, directory: str, mode: str, active: Any, quit_: Any, done: Any
) -> None:
    """Write ``tensors`` to a file over and over while ``active`` is set; CPU time used."""
    import threading

    direct, hash_after, nice, _, imaged = WRITE_PATHS[mode]
    image = None
    if imaged:  # staged once, as a background save stages it (that copy is the stall)
        from safepoint.format import safetensors_layout
        from safepoint.staging import FileImage

        image = FileImage(*safetensors_layout(tensors), tensors)
        for name, view in image.views.items():
            view.copy_(tensors[name])
    if nice:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    n, busy, cpu = 0, 0.0, 0.0
    while not quit_.is_set():
        if not active.wait(0.01):
            continue
        t0, c0 = time.perf_counter(), time.thread_time()
        n += 1
        _write_once(tensors, Path(directory) / f"{n}.bin", direct, hash_after, image)
        busy += time.perf_counter() - t0
        cpu += time.thread_time() - c0
    done.put((n, busy, cpu))


def child_writer(out: Path, steps: int, quick: bool) -> dict:
    """Median step time of a training loop: idle, and while each write path writes 1 GB
    over and over in the background (thread or process, page cache or O_DIRECT, hash in
    the write pass or after it). Writer CPU seconds per GB from the writer thread's own
    clock (kernel writeback threads are not in it). Conditions alternate over 3 rounds
    so that a change of machine load hits all alike.
    """
    import queue
    import threading

    import torch
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    width = 512 if quick else 2048
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters())
    gb = 0.1 if quick else 1.0
    blob = {"x": torch.ones(int(gb * (1 << 30)) // 4)}

    def step_times() -> list[float]:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = model(torch.randn(64, width)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return times

    t_quit = threading.Event()
    ctx = mp.get_context("spawn")
    blob["x"].share_memory_()
    writers, stops, procs = {}, [], []
    for name, (_, _, _, in_process, _) in WRITE_PATHS.items():
        d = out / name.replace(" ", "_").replace(",", "")
        d.mkdir(parents=True)
        if in_process:  # the staged tensors in shared memory, written by a spawned process
            active, quit_, done = ctx.Event(), ctx.Event(), ctx.Queue()
            w = ctx.Process(target=_write_loop, args=(blob, str(d), name, active, quit_, done))
            procs.append(w)
        else:
            active, quit_, done = threading.Event(), t_quit, queue.Queue()
            w = threading.Thread(target=_write_loop, args=(blob, str(d), name, active, quit_, done))
        w.start()
        stops.append((w, quit_))
        writers[name] = (active, done)
    time.sleep(5.0)  # a child process imports torch
    step_times()  # warm-up
    times: dict[str, list[float]] = {"idle": [], **{name: [] for name in writers}}
    for _ in range(3):
        times["idle"] += step_times()
        for name, (active, _) in writers.items():
            active.set()
            time.sleep(0.2)
            times[name] += step_times()
            active.clear()
    for _, quit_ in stops:
        quit_.set()
    rows = []
    idle = statistics.median(times["idle"])
    rows.append(["idle", idle, 1.0, None, None])
    for name, (_, done) in writers.items():
        n, busy, cpu = done.get()
        step = statistics.median(times[name])
        rows.append([name, step, step / idle, n * gb / busy if busy else None, cpu / (n * gb)])
    for w, _ in stops:
        w.join()
    return {"rows": rows, "gb": gb, "peak_rss": _peak_rss()}


def child_busy(out: Path, steps: int, quick: bool) -> dict:
    """on_busy: a plain loop saving every step (faster than the disk) with wait vs skip."""
    import torch

    from safepoint import Checkpointer
    from safepoint.records import read_events

    width = 512 if quick else 2048
    rows = []
    for policy in ("wait", "skip"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(8)])
        opt = torch.optim.AdamW(model.parameters())
        d = out / policy
        t0 = time.perf_counter()
        with Checkpointer(d, save_every=1, keep_last=2, async_save=True, on_busy=policy) as ck:
            for step in range(1, steps + 1):
                loss = model(torch.randn(64, width)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                ck.step(step, {"model": model, "optimizer": opt})
        total = time.perf_counter() - t0
        events = list(read_events(d))
        saves = [e for e in events if e["event"] == "save"]
        skipped = sum(1 for e in events if e["event"] == "save_skipped")
        rows.append(
            [policy, total, len(saves), skipped, statistics.median(e["stall_s"] for e in saves)]
        )
    return {"rows": rows, "steps": steps}


# ------------------------------------------------------------------------- parent


def _child(kind: str, variant: str, base: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = base / f"{kind}-{variant}"
    cmd = [sys.executable, __file__, "--child", kind, "--variant", variant, "--out", str(out)]
    cmd += ["--steps", str(args.steps[kind]), "--save-every", str(args.save_every[kind])]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--layers", str(args.layers)] if args.layers else []
    t0 = time.perf_counter()
    env = {**os.environ, **VARIANT_ENV.get(variant, {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind}/{variant} failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT_TAG))
    result = json.loads(line[len(RESULT_TAG) :])
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {kind}/{variant}: {time.perf_counter() - t0:.0f} s", flush=True)
    return result


def _median_run(runs: list[dict]) -> dict:
    """The run of median total time (the lower middle one of an even count)."""
    total = statistics.median_low(r["total_s"] for r in runs)
    run = next(r for r in runs if r["total_s"] == total)
    return {**run, "all_total_s": [r["total_s"] for r in runs], "all_runs": runs}


# Steps around a save whose time it may lengthen: the saving step (safepoint saves in
# on_step_end), the next (the stock Trainer saves after the callbacks) and two more (a
# background write of 1 GB takes a step or two).
WINDOW = 4


def _by_round(res: dict[str, dict], v: str) -> list[float] | None:
    """``v``'s overhead over no saving as a share of the stock Trainer's, one per round:
    the variants of a round run one after the other, so a change of machine speed
    between rounds (the run without saving took 15.0 to 16.2 s in one benchmark) hits
    the three alike."""
    if v not in res or "stock" not in res:
        return None
    rounds = zip(res[v]["all_runs"], res["stock"]["all_runs"], res["none"]["all_runs"], strict=True)
    return [(r["total_s"] - n["total_s"]) / (s["total_s"] - n["total_s"]) for r, s, n in rounds]


def _paired(runs: list[dict], save_every: int) -> float | None:
    """Training time lost to saving, paired inside each run: the excess of the steps
    around each save less the mean excess of the same steps around the evaluations that
    do not save (half an interval earlier: (b) evaluates every half interval); median of
    runs. Immune to a run's speed and to the evaluation's cost, which the saving runs
    and the one that does not save both pay (their difference drifts with the load as
    much as a small save costs). The table subtracts the value of the run that does not
    save (the two sets of evaluation steps differ a little there too)."""
    half = save_every // 2
    if not runs or save_every % 2 or not all(r.get("step_times") for r in runs):
        return None
    lost = []
    for r in runs:
        times = r["step_times"]
        median = statistics.median(times)

        def excess(step: int, times: list[float] = times, median: float = median) -> float:
            return sum(t - median for t in times[step - 1 : step - 1 + WINDOW])

        saves = range(save_every, len(times) + 1, save_every)
        control = statistics.mean(excess(s - half) for s in saves)
        lost.append(sum(excess(s) - control for s in saves))
    return statistics.median(lost)


def _med(xs: list[float] | None) -> float | None:
    xs = [x for x in xs or [] if x is not None]
    return statistics.median(xs) if xs else None


def _trainer_table(res: dict[str, dict], dd_gb_s: float, save_every: int) -> tuple[str, dict]:
    base = res["none"]
    rows, summary = [], {}
    base_paired = _paired(base.get("all_runs", []), save_every)
    paired = base_paired is not None
    for v in res:
        r = res[v]
        stalls = r.get("stalls") or []
        nbytes = _med(r.get("bytes"))
        write = _med(r.get("write_s"))
        overhead = r["total_s"] - base["total_s"]
        extra_rss = r["peak_rss"] - base["peak_rss"]
        row = {
            "variant": VARIANT_NAMES[v],
            "saves": len(stalls),
            "stall_med_s": _med(stalls),
            "stall_max_s": max(stalls) if stalls else None,
            "recorded_stall_s": _med(r.get("recorded_stalls")),
            "total_s": r["total_s"],
            "overhead_s": overhead if v != "none" else None,
            "overhead_by_round": _by_round(res, v) if v not in ("none", "stock") else None,
            # the overhead in two parts: the steps (the stall, and training slowed by the
            # writes beside it), and after the last step (the final save's write)
            "steps_over_s": sum(r["step_times"]) - sum(base["step_times"]) if v != "none" else None,
            "after_last_s": (r["total_s"] - sum(r["step_times"]))
            - (base["total_s"] - sum(base["step_times"]))
            if v != "none"
            else None,
            # less the same measure of the run that does not save: its steps around the
            # evaluations of the saving steps and of the others differ a little already
            "paired_s": _paired(r.get("all_runs", []), save_every) - base_paired
            if paired and v != "none"
            else base_paired,
            "commit_s": _med(r.get("commit_s")),
            "write_gb_s": nbytes / write / 1e9 if nbytes and write else None,
            "dd_gb_s": dd_gb_s if v in SAFEPOINT_VARIANTS else None,
            "peak_rss_gb": r["peak_rss"] / 1e9,
            "extra_rss_x_ckpt": extra_rss / nbytes if nbytes and v != "none" else None,
            "ckpt_gb": nbytes / 1e9 if nbytes else None,
            "busy_waits": r.get("waits"),
            "fence_s": r.get("fence_s") if v == "async-free" else None,
        }
        summary[v] = row
        rows.append([x for k, x in row.items() if k != "overhead_by_round"])
    headers = [
        "variant", "saves", "stall median s", "stall max s", "recorded stall s", "train s",
        "overhead s", "of it in steps s", "after the last step s", "lost, paired s",
        "start->durable s", "write GB/s", "dd GB/s", "peak RSS GB", "extra RSS / ckpt",
        "ckpt GB", "busy waits", "step() waited s",
    ]  # fmt: skip
    text = table(headers, rows)
    stock, asy = summary["stock"], summary["async"]
    if stock["stall_med_s"] and asy["stall_med_s"] is not None:
        text += (
            f"\n\nasync stall / stock stall = {asy['stall_med_s'] / stock['stall_med_s']:.3f} "
            f"(target <= 0.05); memory-copy floor {res['async'].get('memcpy_s', 0):.3f} s; "
        )
    if stock["overhead_s"] and asy["overhead_s"] is not None:
        text += f"async overhead / stock overhead = {asy['overhead_s'] / stock['overhead_s']:.3f}"
        text += " (target <= 0.2)"
        floor = summary.get("floor")
        if floor and floor["overhead_s"]:
            text += (
                f"; the floor's overhead / stock = {floor['overhead_s'] / stock['overhead_s']:.3f}"
                f", async / floor = {asy['overhead_s'] / floor['overhead_s']:.2f}"
            )
        for v, row in summary.items():
            ratios = row.get("overhead_by_round")
            if ratios and len(ratios) > 1:
                text += (
                    f"; {v} overhead / stock by round: median {statistics.median(ratios):.3f} "
                    f"({', '.join(f'{x:.2f}' for x in ratios)})"
                )
    if paired and stock["paired_s"]:
        text += (
            f"; lost to saving paired in each run (saving steps vs evaluation-only steps), "
            f"async / stock = {asy['paired_s'] / stock['paired_s']:.3f}"
        )
        for v in ("sync", "floor"):
            if v in summary:
                text += f", {v} / stock = {summary[v]['paired_s'] / stock['paired_s']:.3f}"
        text += f" (target <= 0.2; the run that does not save, subtracted: {base_paired:.3f} s)"
    if asy["write_gb_s"]:
        text += f"; async write / dd = {asy['write_gb_s'] / dd_gb_s:.2f} (target >= 0.8)"
    free = summary.get("async-free")
    if free and stock["stall_med_s"] and stock["overhead_s"]:
        text += (
            f"\n\ncopy-free / stock: stall {free['stall_med_s'] / stock['stall_med_s']:.3f}, "
            f"overhead {free['overhead_s'] / stock['overhead_s']:.3f}; optimizer.step() waited "
            f"{free['fence_s']:.3f} s in all"
        )
    return text, summary


def parent(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="sp-overhead-", dir=args.dir))
    body, data = [], {"quick": args.quick, "steps": args.steps, "save_every": args.save_every}
    t_start = time.perf_counter()
    try:
        for kind in ("full", "lora"):
            if kind not in args.only:
                continue
            print(f"{kind}:", flush=True)
            runs: dict[str, list[dict]] = {v: [] for v in args.variants}
            dds = []
            for _ in range(args.repeat):  # rounds interleave variants: load drifts hit all
                for v in args.variants:
                    runs[v].append(_child(kind, v, base, args))
                nbytes = int(_med(runs["async"][-1].get("bytes")) or (1 << 30))
                dds.append(dd_seconds(base, nbytes))
            res = {v: _median_run(rs) for v, rs in runs.items()}
            dd_s = statistics.median(dds)
            text, summary = _trainer_table(res, nbytes / dd_s / 1e9, args.save_every[kind])
            title = {
                "full": f"(a) full fine-tune, GPT-2 style {res['none'].get('params', 0) / 1e6:.0f}M"
                f" params, {args.steps[kind]} steps, save every {args.save_every[kind]}",
                "lora": f"(b) `safepoint train` default LoRA run, {args.steps[kind]} steps, "
                f"save every {args.save_every[kind]}",
            }[kind]
            body.append(f"## {title}\n\n{text}")
            data[kind] = {"raw": res, "summary": summary, "dd_s": dd_s, "dd_bytes": nbytes}
        if "writer" in args.only:
            print("writer:", flush=True)
            r = _child("writer", "-", base, args)
            rows = r["rows"]
            body.append(
                "## (c) background write path: page cache or O_DIRECT, hash in pass or after, "
                "thread or process\n\nstep time of a training loop "
                f"while {r['gb']} GB is written and fsync'd over and over in the background "
                "(3 alternating rounds)\n\n"
                + table(
                    ["writer", "step median s", "x idle", "write GB/s", "writer CPU s/GB"],
                    rows,
                )
            )
            data["writer"] = r
        if "busy" in args.only:
            print("busy:", flush=True)
            r = _child("busy", "-", base, args)
            body.append(
                f"## (d) on_busy: save every step for {r['steps']} steps (the disk is slower "
                "than a step)\n\n"
                + table(["on_busy", "total s", "saves", "skipped", "stall median s"], r["rows"])
            )
            data["busy"] = r
    finally:
        shutil.rmtree(base, ignore_errors=True)
    total = time.perf_counter() - t_start
    body.append(f"Whole benchmark: {total:.0f} s.")
    data["run_s"] = total
    name = "save_overhead" + ("_quick" if args.quick else "")
    if args.only != set(ALL_PARTS):
        name += "_" + "_".join(p for p in ALL_PARTS if p in args.only)
    if args.layers:
        name += f"_{args.layers}layers"
    write_results(name, "Save overhead during training", "\n\n".join(body), data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script only")
    p.add_argument("--only", default=",".join(ALL_PARTS))
    p.add_argument("--steps", type=int, default=None, help="steps of (a) and (b)")
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--dir", type=Path, default=None, help="where checkpoints go (temp)")
    p.add_argument("--layers", type=int, default=None, help="layers of (a)'s model (12: 86M)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of (a)/(b); median run kept")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="of (a)/(b): some of " + ",".join(VARIANTS) + " (none, stock and async always)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, out = args.child, args.out
        if kind in ("writer", "busy"):
            res = (child_writer if kind == "writer" else child_busy)(out, args.steps, args.quick)
        else:
            if kind == "full":
                res = child_full(
                    args.variant, out, args.steps, args.save_every, args.quick, args.layers
                )
            else:
                res = child_lora(args.variant, out, args.steps, args.save_every, args.quick)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return
    args.only = set(args.only.split(","))
    wanted = set(args.variants.split(",")) | {"none", "stock", "async"}
    if wanted - set(VARIANTS):
        p.error(f"--variants: unknown {','.join(sorted(wanted - set(VARIANTS)))}")
    args.variants = [v for v in VARIANTS if v in wanted]
    quick = args.quick
    args.steps = {
        "full": args.steps or (6 if quick else 20),
        "lora": args.steps or (10 if quick else 200),
        "writer": 5 if quick else 8,
        "busy": 6 if quick else 12,
    }
    args.save_every = {
        "full": args.save_every or (3 if quick else 5),
        "lora": args.save_every or (5 if quick else 10),
        "writer": 0,
        "busy": 1,
    }
    parent(args)


if __name__ == "__main__":
    main()
