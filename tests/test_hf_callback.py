"""SafepointCallback in a user's own TRL script (tests/programs/hf_user_train.py), run for real.

Also pins the Trainer internals the callback relies on, so that a transformers upgrade
that changes them fails here loudly rather than resuming a run wrongly.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from safepoint.records import read_events
from tests.conftest import same_tensors

SCRIPT = Path(__file__).parent / "programs" / "hf_user_train.py"
# 8 examples, batch 4: 2 steps per epoch, so 8 steps cross 4 epochs; saving every 3
# gives a checkpoint mid-epoch (3) and one at an epoch end (6).
ARGS = ("--limit", "8", "--steps", "8", "--save-every", "3")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from safepoint.app.tiny import tiny_model_path

    with pytest.MonkeyPatch.context() as mp:
        # shared by the session's test modules: the tiny model is built once
        mp.setenv("SAFEPOINT_HOME", str(tmp_path_factory.getbasetemp() / "safepoint-home"))
        yield tiny_model_path()


def run_user(out: Path, model: Path, *args: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(model), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    ok(run_user(out, model_dir, *ARGS))
    return out


@pytest.mark.crash
def test_user_script_killed_twice_resumes_bit_identical(
    reference: Path, model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    kill = {"SAFEPOINT_CRASH_AT": "after_rename@1"}  # dies right after its first commit
    assert run_user(out, model_dir, *ARGS, env=kill).returncode == -signal.SIGKILL
    assert run_user(out, model_dir, *ARGS, env=kill).returncode == -signal.SIGKILL
    assert "done 8" in ok(run_user(out, model_dir, *ARGS)).stdout
    resumed = [e["step"] for e in read_events(out) if e["event"] == "resume"]
    assert resumed == [3, 6]  # mid-epoch, then at an epoch end
    assert same_tensors(reference / "final.safetensors", out / "final.safetensors")


def test_rerun_of_a_finished_run_leaves_the_trained_model_in_the_trainer(
    model_dir: Path, tmp_path: Path
) -> None:
    """Found by the power-cut sweep: killed after its last checkpoint but before the
    script's own final save, the rerun's train() returned at once ("already ends this
    run") with the untrained adapter in trainer.model, so the script saved that. The
    rerun must leave the trained weights and the run's state, as a finished train() does."""
    out = tmp_path / "run"
    ok(run_user(out, model_dir, *ARGS))
    trained = (out / "final.safetensors").read_bytes()
    (out / "final.safetensors").unlink()
    again = ok(run_user(out, model_dir, *ARGS))
    assert "already ends this run" in again.stderr and "done 8" in again.stdout
    assert (out / "final.safetensors").read_bytes() == trained


def test_resume_with_another_batch_layout_warns_where_the_data_order_lands(
    model_dir: Path, tmp_path: Path
) -> None:
    """16 examples, batch 4: a checkpoint at step 3 is 12 samples into epoch 0. Resumed
    with batch 2 the Trainer skips 3 of its batches (6 samples): 6 samples trained again.
    The callback says so, and the setting that continues exactly."""
    out = tmp_path / "run"
    ok(run_user(out, model_dir, "--limit", "16", "--steps", "3", "--save-every", "3"))
    resumed = ok(run_user(out, model_dir, "--limit", "16", "--steps", "5", "--batch", "2"))
    lines = (out / "safepoint.log.jsonl").read_text().splitlines()
    notes = [e["message"] for e in map(json.loads, lines) if e["event"] == "warning"]
    (note,) = [n for n in notes if n.startswith("data order:")]
    assert "12 samples into epoch 0" in note and "6 samples are trained a second time" in note
    assert "gradient_accumulation_steps=2" in note and note in resumed.stderr


def test_peft_loads_a_checkpoint_folder_as_is(reference: Path, model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = reference / "checkpoint-8"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in ckpt.iterdir()}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), ckpt)
    final = load_file(str(reference / "final.safetensors"))
    state = model.state_dict()
    lora = [k for k in final if "lora_" in k]
    assert lora and all(torch.equal(state[k], final[k]) for k in lora)


def test_full_finetune_checkpoint_loads_with_auto_model(model_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    ok(run_user(out, model_dir, "--full", "--limit", "8", "--steps", "2", "--save-every", "2"))
    ckpt = out / "checkpoint-2"
    assert "lm_head.weight" not in load_file(str(ckpt / "model.safetensors"))  # tied: once
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    final = load_file(str(out / "final.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in final.items())


def _args(out: Path) -> SimpleNamespace:
    return SimpleNamespace(output_dir=str(out), save_strategy="no", save_steps=500)


def test_explicit_missing_checkpoint_lists_the_valid_ones(reference: Path, tmp_path: Path):
    from safepoint import CheckpointNotFoundError, SafepointCallback

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    cb = SafepointCallback(save_every="3")
    with pytest.raises(CheckpointNotFoundError, match="checkpoint-6, checkpoint-8"):
        cb.begin(_args(out), str(out / "checkpoint-99"))
    assert cb.checkpointer is None  # closed again: the run lock is released


def test_resume_true_takes_newest_valid_not_newest_folder(reference: Path, tmp_path: Path):
    from safepoint import SafepointCallback

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "checkpoint-99").mkdir()  # the Trainer's get_last_checkpoint would pick this
    for resume in (True, None):
        cb = SafepointCallback(save_every="3")
        cb.begin(_args(out), resume)  # (a Trainer would get a verified view of it)
        assert cb.resumed_from is not None and cb.resumed_from.path == out / "checkpoint-8"
        cb.end()
    cb = SafepointCallback(save_every="3", resume=False)
    assert cb.begin(_args(out), None) is None
    cb.end()


# ------------------------------------------------------- pinned Trainer internals


def test_trainer_internals_the_callback_relies_on(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from safepoint import ConfigError, SafepointCallback

    # 1. on_init_end runs inside Trainer.__init__, where the callback finds its Trainer.
    cb = SafepointCallback(save_every="5")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, callbacks=[cb]
    )
    assert cb.trainer is trainer and trainer.train.__wrapped__  # type: ignore[attr-defined]
    # 2. Resume skips consumed batches and loads the RNG file itself; the callback
    #    restores RNG at the same points, so both must still be where it expects them.
    #    (transformers 5.25 moved the skipping into an overridable get_resumed_dataloader.)
    run_epoch = inspect.getsource(Trainer._run_epoch)
    skipper = getattr(Trainer, "get_resumed_dataloader", None)
    assert "skip_first_batches" in run_epoch or (
        "self.get_resumed_dataloader(" in run_epoch
        and "skip_first_batches" in inspect.getsource(skipper)  # type: ignore[arg-type]
    )
    assert "_load_rng_state" in run_epoch
    assert run_epoch.index("if rng_to_sync:") < run_epoch.index("on_step_begin")
    # 3. A Trainer that would save too (load_best_model_at_end) is refused clearly.
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        eval_strategy="steps",
        save_strategy="steps",
        load_best_model_at_end=True,
    )
    with pytest.raises(ConfigError, match="load_best_model_at_end"):
        Trainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir),
            args=args,
            eval_dataset=[{"input_ids": [1, 2]}],
            callbacks=[SafepointCallback()],
        )


@pytest.mark.parametrize(
    ("losses", "patience", "stop"),
    [
        ([3.0, 2.0, 1.0], 1, False),
        ([3.0, 2.0, 2.5], 1, True),
        ([3.0, 2.0, 2.5], 2, False),
        ([3.0, 2.0, 2.5, 2.0], 2, True),  # equal is not better
    ],
)
def test_early_stopping_patience(losses: list[float], patience: int, stop: bool) -> None:
    from safepoint.integrations.hf_trainer import patience_spent

    state = SimpleNamespace(log_history=[{"eval_loss": v, "step": i} for i, v in enumerate(losses)])
    assert patience_spent(state, "eval_loss", "min", patience) is stop


def test_unknown_option_is_refused() -> None:
    from safepoint import ConfigError, SafepointCallback

    with pytest.raises(ConfigError, match="keep_lats"):
        SafepointCallback(keep_lats=3)
    with pytest.raises(ConfigError):
        SafepointCallback(save_every="0")


def test_missing_ranking_metric_warning_names_what_a_trainer_user_sets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # keep_best without an eval set: the hint must name Trainer settings and the
    # callback's own `metric=`, not the plain loop's `metrics=` nor a CLI flag.
    from safepoint import SafepointCallback

    cb = SafepointCallback(keep_best=1)
    cb.begin(_args(tmp_path / "run"), None)
    try:
        assert cb.checkpointer is not None
        with caplog.at_level("WARNING", logger="safepoint"):
            cb.checkpointer.save(1, {"w": torch.zeros(2)}, metrics={"loss": 1.0})
    finally:
        cb.end()
    (note,) = [r.getMessage() for r in caplog.records if "no such metric" in r.getMessage()]
    assert "eval_dataset" in note and "eval_strategy" in note and "metric=" in note, note
    assert "metrics=" not in note and "--metric" not in note, note


def test_a_non_finite_logged_value_leaves_the_checkpoints_valid(
    model_dir: Path, tmp_path: Path
) -> None:
    """fp16 runs log grad_norm inf (or nan) while the loss scale settles; the Trainer
    writes it into trainer_state.json as Python's json does (``Infinity``). Every
    checkpoint after it was ``corrupt`` ("NaN is not a JSON number"): resume skipped them
    all. A checkpoint holding one is complete, verifies, and is resumed from."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from safepoint import SafepointCallback
    from safepoint.validity import inspect as inspect_checkpoint

    class Overflow(TrainerCallback):
        def on_step_end(self, args: object, state: object, control: object, **kw: object):
            if state.global_step == 1:  # type: ignore[attr-defined]
                trainer.log({"grad_norm": float("inf"), "learning_rate": float("nan")})

    def build(cb: SafepointCallback) -> Trainer:
        args = TrainingArguments(
            output_dir=str(tmp_path / "hf"), report_to="none", use_cpu=True, max_steps=4,
            per_device_train_batch_size=2, logging_steps=1,
        )  # fmt: skip
        data = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 8
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        return Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])

    out = tmp_path / "run"
    trainer = build(SafepointCallback(output_dir=out, save_every="2"))
    trainer.add_callback(Overflow())
    trainer.train()
    for step in (2, 4):
        info = inspect_checkpoint(out / f"checkpoint-{step}", deep=True)
        assert info.status == "valid", info.problems
        assert "Infinity" in (out / f"checkpoint-{step}" / "trainer_state.json").read_text()
    again = SafepointCallback(output_dir=out, save_every="2")
    build(again).train()
    assert again.resumed_from is not None and again.resumed_from.step == 4
