"""Training time lost to checkpointing: no saving vs stock Trainer vs safepoint sync / async.

usage: python benchmarks/save_overhead.py [--quick] [--only full,lora,writer,busy]
       [--steps N] [--save-every N] [--dir DIR] [--layers N] [--repeat N] [--seed N]
       [--variants none,floor,stock,...]

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

(a) and (b) run in rounds (``--repeat``): each round runs every variant once, each in
its own process (clean peak RSS), in a new random order (``--seed``; printed), with the
two ``dd`` baselines (``oflag=direct`` and through the page cache, both ``conv=fsync``,
of the size of the async checkpoint) at a random place in it. Every figure is paired
within a round: a variant's overhead is its ``train()`` time less that of the same
round's run without saving, and its ratios are to the stock Trainer's and the floor's
overhead in the same round; the write rate is divided by the same round's ``dd``. The
result is the median over rounds with a bootstrap 95% interval (``_common.bootstrap_ci``),
and every round's figures are printed.

The stall is the wall time of the save call (``Trainer._save_checkpoint`` for the stock
one, ``SafepointCallback._save`` for safepoint; the run record's ``stall_s``, the
capture-to-handover part, in the details). Every variant keeps the last 2 checkpoints;
the deletions made inside the save call on the training thread (the stock Trainer's
``rotate_checkpoints``; safepoint's retention, in line only: a background save deletes
on its writer thread) are timed and shown, and "stall less retention" takes them out so
that the stalls compared are the same work. The "floor" variant is the least a
background save can cost here: the copy to host memory and an ``O_DIRECT`` write and
fsync of the same bytes, nothing else. ``--quick`` shrinks everything to check that the
script works (numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import bootstrap_ci, dd_write, format_ci, load_avg, table, write_results

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


class _TrainingThreadClock:
    """Seconds the training (main) thread spends in the functions it wraps: the
    deletions of old checkpoints, wherever each saver makes them."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def timed(*a: Any, **kw: Any) -> Any:
            if threading.current_thread() is not threading.main_thread():
                return real(*a, **kw)
            t0 = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                self.total += time.perf_counter() - t0

        setattr(owner, name, timed)


def _time_calls(
    owner: Any, name: str, retention: _TrainingThreadClock
) -> tuple[list[float], list[float]]:
    """Wall seconds of each call of ``owner.<name>`` from now on (the training thread
    waits for all of it): the stock Trainer's ``_save_checkpoint``, safepoint's save;
    and of each, the seconds ``retention`` counted inside it."""
    stalls: list[float] = []
    deletes: list[float] = []
    real = getattr(owner, name)

    def timed(*a: Any, **kw: Any) -> Any:
        t0, r0 = time.perf_counter(), retention.total
        try:
            return real(*a, **kw)
        finally:
            stalls.append(time.perf_counter() - t0)
            deletes.append(retention.total - r0)

    setattr(owner, name, timed)
    return stalls, deletes


def _time_retention(variant: str) -> _TrainingThreadClock:
    """Count the deletions of old checkpoints made on the training thread: the stock
    Trainer's ``rotate_checkpoints`` (inside ``_save_checkpoint``, always), safepoint's
    ``Retention.apply`` and ``settle`` (inside the save call in line; a background save
    makes them on its writer thread, where they stall nothing)."""
    clock = _TrainingThreadClock()
    if variant == "stock":
        import transformers.trainer as hf

        if hasattr(hf, "rotate_checkpoints"):  # transformers 5
            clock.wrap(hf, "rotate_checkpoints")
        else:
            clock.wrap(hf.Trainer, "_rotate_checkpoints")
    if variant in SAFEPOINT_VARIANTS:
        from safepoint.engine.retain import Retention

        clock.wrap(Retention, "apply")
        clock.wrap(Retention, "settle")
    return clock


def _run_trainer(trainer: Any, variant: str, out: Path) -> dict[str, Any]:
    clock = _StepClock()
    trainer.add_callback(clock)
    retention = _time_retention(variant)
    stalls: list[float] = []
    deletes: list[float] = []
    if variant == "stock":
        stalls, deletes = _time_calls(trainer, "_save_checkpoint", retention)
    if variant == "floor":
        floor = next(c for c in trainer.callback_handler.callbacks if hasattr(c, "join"))
        stalls, deletes = _time_calls(floor, "save", retention)
    if variant in SAFEPOINT_VARIANTS:
        from safepoint import SafepointCallback

        cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SafepointCallback))
        # measured as the stock one: the whole call
        stalls, deletes = _time_calls(cb, "_save", retention)
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    result: dict[str, Any] = {
        "total_s": total,
        "step_s": statistics.median(clock.times) if clock.times else None,
        "step_times": clock.times,
        "peak_rss": _peak_rss(),
        "stalls": stalls,
        "retention_in_stall": deletes,
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
    from safepoint.app.job import plan

    try:
        from safepoint.app.sft import build_trainer
    except ImportError:  # before build_trainer moved out of app/job.py
        from safepoint.app.job import build_trainer  # type: ignore[attr-defined,no-redef]

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


def child_writer(out: Path, steps: int, quick: bool, seed: int = 0) -> dict:
    """Median step time of a training loop: idle, and while each write path writes 1 GB
    over and over in the background (thread or process, page cache or O_DIRECT, hash in
    the write pass or after it). Writer CPU seconds per GB from the writer thread's own
    clock (kernel writeback threads are not in it). Conditions alternate over 3 rounds,
    in a random order each (seeded by ``seed``), so that a change of machine load hits
    all alike and none always follows the same one.
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
    rng, orders = random.Random(seed), []
    for _ in range(3):
        order = rng.sample(list(times), len(times))
        orders.append(order)
        for name in order:
            if name == "idle":
                times["idle"] += step_times()
                continue
            active = writers[name][0]
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
    short = {name: str(i) for i, name in enumerate(times)}  # idle 0, then the table's rows
    order_text = "; ".join(" ".join(short[n] for n in o) for o in orders)
    return {"rows": rows, "gb": gb, "peak_rss": _peak_rss(), "orders": order_text}


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
    cmd += ["--seed", str(args.seed)]
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


# Steps around a save whose time it may lengthen: the saving step (safepoint saves in
# on_step_end), the next (the stock Trainer saves after the callbacks) and two more (a
# background write of 1 GB takes a step or two).
WINDOW = 4


def _lost_in_run(run: dict, save_every: int) -> float | None:
    """Training time lost to saving, paired inside one run: the excess of the steps
    around each save less the mean excess of the same steps around the evaluations that
    do not save (half an interval earlier: (b) evaluates every half interval). Immune to
    a run's speed and to the evaluation's cost, which the saving runs and the one that
    does not save both pay. The round's figure subtracts the value of the run that does
    not save in the same round (the two sets of evaluation steps differ a little there
    too)."""
    half = save_every // 2
    times = run.get("step_times")
    if not times or save_every % 2:
        return None
    median = statistics.median(times)

    def excess(step: int) -> float:
        return sum(t - median for t in times[step - 1 : step - 1 + WINDOW])

    saves = range(save_every, len(times) + 1, save_every)
    control = statistics.mean(excess(s - half) for s in saves)
    return sum(excess(s) - control for s in saves)


def _med(xs: list[float] | None) -> float | None:
    xs = [x for x in xs or [] if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None where ``b`` is not above zero (a round where the stock Trainer
    cost nothing measurable gives no ratio, rather than a huge or negative one)."""
    return a / b if a is not None and b is not None and b > 0 else None


def round_figures(rnd: dict, save_every: int) -> dict[str, dict[str, float | None]]:
    """Each variant's figures in one round, paired with the same round's run without
    saving (the variants of a round run back to back, in a random order, so a change of
    machine speed between rounds does not enter a difference or a ratio)."""
    runs, dd = rnd["runs"], rnd["dd"]
    none = runs["none"]
    none_lost = _lost_in_run(none, save_every)
    figs: dict[str, dict[str, float | None]] = {}
    for v, r in runs.items():
        stalls = r.get("stalls") or []
        retention = r.get("retention_in_stall") or [0.0] * len(stalls)
        nbytes, write = _med(r.get("bytes")), _med(r.get("write_s"))
        write_gb_s = nbytes / write / 1e9 if nbytes and write else None
        lost = _lost_in_run(r, save_every)
        figs[v] = {
            "total_s": r["total_s"],
            "overhead_s": r["total_s"] - none["total_s"],
            # the overhead in two parts: the steps (the stall, and training slowed by the
            # writes beside it), and after the last step (the final save's write)
            "steps_over_s": sum(r["step_times"]) - sum(none["step_times"]),
            "after_last_s": (r["total_s"] - sum(r["step_times"]))
            - (none["total_s"] - sum(none["step_times"])),
            "saves": len(stalls),
            "stall_s": _med(stalls),
            "stall_max_s": max(stalls) if stalls else None,
            # the same work for every variant: the stall less the deletions of old
            # checkpoints made inside the save call (on the training thread)
            "stall_less_retention_s": _med([s - d for s, d in zip(stalls, retention, strict=True)]),
            "retention_in_stall_s": _med(retention) if stalls else None,
            "recorded_stall_s": _med(r.get("recorded_stalls")),
            "lost_paired_s": lost - none_lost
            if lost is not None and none_lost is not None
            else None,
            "commit_s": _med(r.get("commit_s")),
            "write_gb_s": write_gb_s,
            "write_over_dd_direct": _ratio(write_gb_s, (dd.get("direct") or {}).get("gb_s")),
            "write_over_dd_cache": _ratio(write_gb_s, (dd.get("cache") or {}).get("gb_s")),
            "peak_rss_gb": r["peak_rss"] / 1e9,
            "extra_rss_x_ckpt": (r["peak_rss"] - none["peak_rss"]) / nbytes if nbytes else None,
            "ckpt_gb": nbytes / 1e9 if nbytes else None,
            "busy_waits": r.get("waits"),
            "fence_s": r.get("fence_s"),
            "memcpy_s": r.get("memcpy_s"),
        }
    stock, floor = figs.get("stock", {}), figs.get("floor", {})
    for f in figs.values():
        f["over_stock"] = _ratio(f["overhead_s"], stock.get("overhead_s"))
        f["over_floor"] = _ratio(f["overhead_s"], floor.get("overhead_s"))
        f["stall_over_stock"] = _ratio(
            f["stall_less_retention_s"], stock.get("stall_less_retention_s")
        )
        f["lost_over_stock"] = _ratio(f["lost_paired_s"], stock.get("lost_paired_s"))
    return figs


def _across(per_round: list[dict], v: str, key: str, seed: int) -> tuple[float, ...] | None:
    """Median over rounds of ``key`` for ``v`` and its bootstrap 95% interval."""
    return bootstrap_ci([r[v][key] for r in per_round if v in r], seed=seed)


def _dd_cell(dd: dict, mode: str) -> float | None:
    return (dd.get(mode) or {}).get("gb_s")


def _per_round_table(rounds: list[dict], per_round: list[dict], variants: list[str]) -> str:
    shown = [v for v in variants if v != "none"]
    headers = ["round", "order", "no saving s", "dd direct GB/s", "dd cache GB/s"]
    headers += [f"{v} s (/stock)" for v in shown]
    rows = []
    for i, (rnd, figs) in enumerate(zip(rounds, per_round, strict=True), 1):
        row: list[Any] = [i, " ".join(rnd["order"]), figs["none"]["total_s"]]
        row += [_dd_cell(rnd["dd"], "direct"), _dd_cell(rnd["dd"], "cache")]
        for v in shown:
            f = figs[v]
            ratio = "" if f["over_stock"] is None else f" ({f['over_stock']:.2f})"
            row.append(f"{f['overhead_s']:.3g}{ratio}")
        rows.append(row)
    return table(headers, rows)


def _trainer_tables(
    rounds: list[dict], variants: list[str], save_every: int, seed: int
) -> tuple[str, dict]:
    """The per-round table, the paired summary (median over rounds [bootstrap 95%
    interval]), the details and the headline ratios of part (a) or (b)."""
    per_round = [round_figures(r, save_every) for r in rounds]
    summary = {
        v: {key: _across(per_round, v, key, seed) for key in per_round[0][v]} for v in variants
    }

    def ci(v: str, key: str, digits: int = 3) -> str:
        return format_ci(summary[v][key], digits)

    lora = any(summary[v]["lost_paired_s"] for v in variants if v != "none")
    main_headers = [
        "variant", "saves", "stall s", "stall less retention s", "retention in stall s",
        "overhead s", "of it in steps s", "after the last step s", "overhead / stock",
        "overhead / floor", *(["lost, paired s", "lost, paired / stock"] if lora else []),
    ]  # fmt: skip
    main_rows, detail_rows = [], []
    for v in variants:
        saves = summary[v]["saves"]
        row: list[Any] = [VARIANT_NAMES[v], int(saves[0]) if saves else None]
        row += [ci(v, k) for k in ("stall_s", "stall_less_retention_s", "retention_in_stall_s")]
        if v == "none":
            row += ["0 (the baseline)", "-", "-", "-", "-"] + (["-", "-"] if lora else [])
        else:
            row += [ci(v, k) for k in ("overhead_s", "steps_over_s", "after_last_s")]
            row += [ci(v, "over_stock"), ci(v, "over_floor")]
            row += [ci(v, "lost_paired_s"), ci(v, "lost_over_stock")] if lora else []
        main_rows.append(row)
        med = {k: c[0] if c else None for k, c in summary[v].items()}
        detail_rows.append([
            VARIANT_NAMES[v], med["recorded_stall_s"], med["stall_max_s"], med["commit_s"],
            med["write_gb_s"], ci(v, "write_over_dd_direct", 2), med["write_over_dd_cache"],
            med["peak_rss_gb"], med["extra_rss_x_ckpt"] if v != "none" else None,
            med["ckpt_gb"], med["busy_waits"], med["fence_s"] if v == "async-free" else None,
        ])  # fmt: skip
    detail_headers = [
        "variant", "recorded stall s", "stall max s", "start->durable s", "write GB/s",
        "write / dd direct", "write / dd cache", "peak RSS GB", "extra RSS / ckpt",
        "ckpt GB", "busy waits", "step() waited s",
    ]  # fmt: skip
    n = len(rounds)
    text = (
        f"Per round (order as run; each variant's overhead = its train() time less the "
        f"same round's run without saving; in brackets its ratio to the stock Trainer's "
        f"overhead in the same round):\n\n{_per_round_table(rounds, per_round, variants)}"
        f"\n\nPaired over the {n} rounds: median [bootstrap 95% interval] of the per-round "
        "figures. Retention is the same for all (keep the last 2); 'stall less retention' "
        "takes out the deletions made inside the save call (the stock Trainer's "
        "rotate_checkpoints; safepoint's retention on the training thread, in line "
        "only), so that every stall is the same work:\n\n"
        + table(main_headers, main_rows)
        + "\n\nDetails (median over rounds):\n\n"
        + table(detail_headers, detail_rows)
        + "\n\n"
        + _headline(summary, n)
    )
    return text, {"per_round": per_round, "summary": summary}


def _headline(summary: dict[str, dict], rounds: int) -> str:
    """The ratios the README quotes, each a median over rounds with its interval."""

    def have(v: str, key: str) -> bool:
        return v in summary and summary[v][key] is not None

    lines = []
    if have("async", "over_stock"):
        lines.append(f"async overhead / stock: {format_ci(summary['async']['over_stock'])}")
    for v in ("floor", "sync", "async-free"):
        if have(v, "over_stock"):
            lines.append(f"{v} overhead / stock: {format_ci(summary[v]['over_stock'])}")
    if have("async", "over_floor"):
        lines.append(f"async overhead / floor: {format_ci(summary['async']['over_floor'])}")
    if have("async", "stall_over_stock"):
        lines.append(
            "async stall / stock stall, both less retention: "
            + format_ci(summary["async"]["stall_over_stock"])
        )
    if have("async", "lost_over_stock"):
        lines.append(
            f"async lost, paired / stock: {format_ci(summary['async']['lost_over_stock'])}"
        )
    if have("async", "write_over_dd_direct"):
        lines.append(
            "async write / dd oflag=direct: "
            + format_ci(summary["async"]["write_over_dd_direct"], 2)
            + " (dd conv=fsync through the page cache: "
            + format_ci(summary["async"]["write_over_dd_cache"], 2)
            + ")"
        )
    if have("async", "memcpy_s"):
        lines.append(f"memory-copy floor: {format_ci(summary['async']['memcpy_s'])} s")
    head = f"Headline (median over {rounds} rounds [bootstrap 95% interval]; a ratio of 1 "
    head += "inside the interval means no difference shown; a round whose stock or floor "
    head += "overhead was not above zero gives no ratio to it: see the per-round table):"
    return head + "\n\n" + "\n".join(f"- {x}" for x in lines)


def _dd_pair(base: Path, nbytes: int, rng: random.Random) -> dict[str, Any]:
    """``dd`` with ``oflag=direct`` and through the page cache, in a random order."""
    modes = rng.sample(["direct", "cache"], 2)
    return {m: dd_write(base, nbytes, direct=m == "direct") for m in modes}


def round_order(variants: list[str], rng: random.Random, first: bool) -> list[str]:
    """The variants in a random order, with "dd" (both baselines) at a random place; in
    the first round "dd" comes last, as it writes the size the async run reported."""
    order = rng.sample(variants, len(variants))
    at = len(order) if first else rng.randrange(len(order) + 1)
    return [*order[:at], "dd", *order[at:]]


def _trainer_part(
    kind: str, base: Path, args: argparse.Namespace, rng: random.Random
) -> tuple[list[dict], int]:
    """``args.repeat`` rounds of part (a) or (b): every variant once per round, each in
    its own process, in a new random order each round (printed)."""
    rounds: list[dict] = []
    nbytes = 0
    for i in range(args.repeat):
        order = round_order(args.variants, rng, first=i == 0)
        print(f"  round {i + 1}/{args.repeat} order: {' '.join(order)}", flush=True)
        rnd: dict[str, Any] = {"order": order, "runs": {}, "dd": {}, "load_before": load_avg()}
        for v in order:
            if v == "dd":
                rnd["dd"] = _dd_pair(base, nbytes or (1 << 30), rng)
                rnd["dd_bytes"] = nbytes or (1 << 30)
                continue
            rnd["runs"][v] = _child(kind, v, base, args)
            if v == "async":
                nbytes = int(_med(rnd["runs"][v].get("bytes")) or nbytes)
        rnd["load_after"] = load_avg()
        rounds.append(rnd)
    return rounds, nbytes


def _disk_line(dds: list[dict]) -> str:
    """The disk's speed as measured in this run: median GB/s of each ``dd``."""
    parts = []
    for mode, label in (("direct", "dd oflag=direct"), ("cache", "dd conv=fsync")):
        speeds = [d[mode]["gb_s"] for d in dds if d.get(mode)]
        if speeds:
            parts.append(f"{label} {statistics.median(speeds):.2f} GB/s")
        elif mode == "direct":
            parts.append(f"{label} refused by the file system")
    size = max((d[m]["bytes"] for d in dds for m in d if d[m]), default=0)
    return ", ".join(parts) + f" (median of {len(dds)}, {size / 1e9:.2g} GB each)"


def parent(args: argparse.Namespace) -> None:
    load_before = load_avg()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="sp-overhead-", dir=args.dir))
    data: dict[str, Any] = {
        "quick": args.quick,
        "steps": args.steps,
        "save_every": args.save_every,
        "seed": args.seed,
        "retention": "keep the last 2 for every variant; stalls also shown less the "
        "deletions made inside the save call",
    }
    body, dds = [f"Seed {args.seed}; variants of (a)/(b): {', '.join(args.variants)}."], []
    print(body[0], flush=True)
    t_start = time.perf_counter()
    try:
        for kind in ("full", "lora"):
            if kind not in args.only:
                continue
            print(f"{kind}:", flush=True)
            rounds, _ = _trainer_part(kind, base, args, rng)
            dds += [r["dd"] for r in rounds]
            text, summary = _trainer_tables(rounds, args.variants, args.save_every[kind], args.seed)
            params = rounds[0]["runs"]["none"].get("params", 0)
            title = {
                "full": f"(a) full fine-tune, GPT-2 style {params / 1e6:.0f}M params, "
                f"{args.steps[kind]} steps, save every {args.save_every[kind]}",
                "lora": f"(b) `safepoint train` default LoRA run, {args.steps[kind]} steps, "
                f"save every {args.save_every[kind]}",
            }[kind]
            body.append(f"## {title}\n\n{text}")
            data[kind] = {"rounds": rounds, **summary}
        if "writer" in args.only:
            print("writer:", flush=True)
            r = _child("writer", "-", base, args)
            body.append(
                "## (c) background write path: page cache or O_DIRECT, hash in pass or after, "
                "thread or process\n\nstep time of a training loop "
                f"while {r['gb']} GB is written and fsync'd over and over in the background "
                f"(3 rounds, conditions in a random order each: {r['orders']})\n\n"
                + table(
                    ["writer", "step median s", "x idle", "write GB/s", "writer CPU s/GB"],
                    r["rows"],
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
        if not dds:  # (c)/(d) only: the disk's speed still goes with the result
            dds.append(_dd_pair(base, (64 << 20) if args.quick else (1 << 30), rng))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    total = time.perf_counter() - t_start
    body.append(f"Whole benchmark: {total:.0f} s.")
    data["run_s"] = total
    data["dd"] = dds
    name = "save_overhead" + ("_quick" if args.quick else "")
    if args.only != set(ALL_PARTS):
        name += "_" + "_".join(p for p in ALL_PARTS if p in args.only)
    if args.layers:
        name += f"_{args.layers}layers"
    write_results(
        name,
        "Save overhead during training",
        "\n\n".join(body),
        data,
        load_before=load_before,
        disk=_disk_line(dds),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script only")
    p.add_argument("--only", default=",".join(ALL_PARTS))
    p.add_argument("--steps", type=int, default=None, help="steps of (a) and (b)")
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--dir", type=Path, default=None, help="where checkpoints go (temp)")
    p.add_argument("--layers", type=int, default=None, help="layers of (a)'s model (12: 86M)")
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds of (a)/(b), each variant once per round"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="of the random order of the variants in each round"
    )
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
            if kind == "writer":
                res = child_writer(out, args.steps, args.quick, args.seed)
            else:
                res = child_busy(out, args.steps, args.quick)
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
