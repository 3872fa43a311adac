"""``safepoint export``: adapter and merged model folders that load and generate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safepoint.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.getbasetemp() / "safepoint-home"  # the tiny model, built once
    out = tmp_path_factory.mktemp("run") / "run"
    args = ("--max-steps", "6", "--save-every", "3", "--batch-size", "4")
    proc = subprocess.run(
        [sys.executable, "-m", "safepoint", "train", "--output-dir", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SAFEPOINT_HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_merge_gives_a_model_that_generates(run_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--checkpoint", "best", "--out", str(out), "--merge"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("What is 2 plus 3?", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    new = gen[0, ids["input_ids"].shape[1] :]
    assert len(new) == 6 and tokenizer.decode(new).strip()
    assert not any("lora" in k for k in model.state_dict())


def test_adapter_export_loads_with_peft(run_dir: Path, tmp_path: Path) -> None:
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--checkpoint", "latest", "--out", str(out)]) == 0
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    assert any("lora_A" in k for k in model.state_dict())


def test_bad_requests(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run_dir), "--checkpoint", "77", "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint-6" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("keep me")
    assert main(["export", str(run_dir), "--checkpoint", "latest", "--out", str(busy)]) == 2
    assert (busy / "f").read_text() == "keep me"


def test_a_corrupt_best_exits_4_and_names_the_others(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """#29 item 6: the best checkpoint's weights flipped on disk (sizes unchanged, so only
    the checksums tell): exit 4, one line that names the checkpoints to export instead."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    capsys.readouterr()
    assert main(["export", str(run), "--checkpoint", "best", "--out", str(tmp_path / "o")]) == 0
    best = capsys.readouterr().out.split()[1]  # "exported <path> (adapter) to ..."
    weights = Path(best) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["export", str(run), "--checkpoint", "best", "--out", str(tmp_path / "x")]) == 4
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"Error: {best}: "), err
    others = sorted({"checkpoint-3", "checkpoint-6"} - {Path(best).name})
    assert err[0].endswith(f"export another with --checkpoint <step>: {', '.join(others)}")
    assert not (tmp_path / "x").exists()


def test_a_full_fine_tune_exports_with_its_tokenizer_and_generates(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home = tmp_path_factory.getbasetemp() / "safepoint-home"
    run = tmp_path / "full"
    train = ("train", "--full", "--max-steps", "3", "--output-dir", str(run))
    proc = subprocess.run(
        [sys.executable, "-m", "safepoint", *train],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SAFEPOINT_HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "model"
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "no tokenizer" not in said and "base model:" in said
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("What is 2 plus 3?", return_tensors="pt")
    assert ids["input_ids"].shape[1] > 1 and len(tokenizer) > 256
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4
    # Without a base to take it from, it says so, in one line, with what to do.
    bare = tmp_path / "bare"
    assert main(["export", str(run), "--out", str(bare), "--base", str(tmp_path / "x")]) == 2
