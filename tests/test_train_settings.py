"""``safepoint train``'s fine-tuning settings (issue 29 item 2): accumulation, warmup and
the scheduler, precision, loggers, eval batch size, and the ``trainer:`` block that
passes any other ``SFTConfig`` field; docs/config.md's YAML example trains as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from safepoint.cli import main
from safepoint.validity import inspect

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


@pytest.fixture(autouse=True)
def _home_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # the session's tiny-model cache, shared with the other test modules
    monkeypatch.setenv("SAFEPOINT_HOME", str(tmp_path_factory.getbasetemp() / "safepoint-home"))
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)


def doc_yaml() -> str:
    """The one ```yaml block of docs/config.md, as written there."""
    blocks = re.findall(r"^```yaml\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)
    assert len(blocks) == 1, "docs/config.md has one YAML example"
    return blocks[0]


def refused(capsys: pytest.CaptureFixture[str], out: Path, *args: str) -> str:
    """Run ``safepoint train`` in-process; it must exit 2 with one line, writing nothing."""
    code = main(["train", "--output-dir", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("Error: ") and len(err.splitlines()) == 1, err
    assert not out.exists(), "a refused run must write nothing"
    return err


def test_the_docs_example_trains_and_its_trainer_block_reaches_the_trainer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/config.md's YAML, as written (only shorter: 4 steps, saved at 2 and 4, in a
    test folder): every new key is recorded as the run's schedule, the trainer: block
    is what the real TrainingArguments held, and TensorBoard wrote its event file."""
    config = tmp_path / "run.yaml"
    config.write_text(doc_yaml())
    doc = yaml.safe_load(config.read_text())
    out = tmp_path / "exp1"
    short = ["--max-steps", "4", "--save-every", "2", "--eval-every", "2"]
    code = main(["train", "--config", str(config), "--output-dir", str(out), *short])
    captured = capsys.readouterr()
    assert code is None or code == 0, captured.err[-3000:]
    assert "done: 4 steps, 2 checkpoints committed" in captured.out
    info = inspect(out / "checkpoint-4").manifest.info
    assert info["trainer"] == doc["trainer"]
    for key in ("gradient_accumulation_steps", "lr_scheduler_type", "warmup_ratio"):
        assert info["schedule"][key] == doc[key], key
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == doc["batch_size"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard file"


def test_print_config_merges_the_trainer_block_with_trainer_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  weight_decay: 0.01\n  optim: adamw_torch\n")
    args = ["--trainer", "weight_decay=0.1", "--trainer", "adam_beta2=0.98"]
    assert main(["train", "--config", str(config), *args, "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["trainer"] == {"weight_decay": 0.1, "optim": "adamw_torch", "adam_beta2": 0.98}


@pytest.mark.parametrize(
    ("block", "needle"),
    [
        ("weight_decy: 0.1", "'weight_decy' is not a field of SFTConfig"),
        ("weight_decy: 0.1", "did you mean 'weight_decay'?"),
        ("save_strategy: steps", "trainer: save_strategy is set by safepoint; use save_every"),
        ("output_dir: x", "use output_dir (--output-dir) instead"),
        ("resume_from_checkpoint: true", "use resume (--resume) instead"),
        ("load_best_model_at_end: true", "keep_best (--keep-best)"),
        ("seed: 3", "use seed (--seed) instead"),
        ("bf16: true", "use precision (--precision) instead"),
    ],
)
def test_a_bad_trainer_key_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], block: str, needle: str
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"trainer:\n  {block}\n")
    assert needle in refused(capsys, tmp_path / "out", "--config", str(config))


def test_a_trainer_flag_is_checked_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(capsys, tmp_path / "out", "--trainer", "save_steps=5")
    assert "use save_every (--save-every) instead" in err
    assert "KEY=VALUE" in refused(capsys, tmp_path / "out", "--trainer", "weight_decay")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_fp16_without_a_gpu_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(capsys, tmp_path / "out", "--precision", "fp16")
    assert "fp16 needs a CUDA GPU and none is visible; use bf16" in err


def test_unknown_scheduler_and_logger_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(capsys, tmp_path / "out", "--lr-scheduler-type", "cosin")
    assert "'cosin' is not a schedule" in err and "cosine" in err
    assert "not one of none, tensorboard, wandb" in refused(
        capsys, tmp_path / "out", "--report-to", "tensorbaord"
    )


def test_a_logger_whose_package_is_missing_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    err = refused(capsys, tmp_path / "out", "--report-to", "tensorboard,wandb")
    assert "report_to wandb needs the wandb package: pip install wandb" in err


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--gradient-accumulation-steps", "0", "at least 1"),
        ("--eval-batch-size", "0", "at least 1"),
        ("--warmup-ratio", "1.5", "share in [0, 1)"),
        ("--warmup-steps", "-1", "0 or more"),
    ],
)
def test_bad_settings(tmp_path: Path, capsys, flag: str, value: str, needle: str) -> None:
    err = refused(capsys, tmp_path / "out", flag, value)
    assert err.startswith(f"Error: {flag}") and needle in err


def test_the_readme_example_is_a_valid_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's shorter YAML example resolves as written (and means what it says)."""
    readme = DOC.parent.parent / "README.md"
    blocks = re.findall(r"^```yaml\n(.*?)^```$", readme.read_text(), flags=re.S | re.M)
    (block,) = [b for b in blocks if b.startswith("# run.yaml")]
    config = tmp_path / "run.yaml"
    config.write_text(block)
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(block)
    assert {k: resolved[k] for k in written} == written
