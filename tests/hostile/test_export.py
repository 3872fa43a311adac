"""#17 defect 3: ``safepoint export`` reads only the files a checkpoint's manifest lists,
and loads a base model only from ``--base`` or the run's own config."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest

from safepoint.app.tiny import tiny_model_path

from .helpers import body, cli, make_run, no_traceback, sign

pytestmark = pytest.mark.timeout(600)
sys.path.insert(0, str(Path(__file__).parent.parent / "programs"))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's script (stock SFTTrainer + SafepointCallback): no run config in it."""
    import hf_user_train

    out = tmp_path_factory.mktemp("export") / "run"
    assert hf_user_train.main([str(out), str(tiny_model_path()), "--steps", "2",
                               "--save-every", "2"]) == 0  # fmt: skip
    return out


@pytest.fixture
def attacker(tmp_path: Path) -> Path:
    """A folder an adapter config may name: a FIFO tokenizer (a read would hang) and
    pickled weights whose unpickling creates a marker."""
    folder = tmp_path / "attacker"
    folder.mkdir()
    os.mkfifo(folder / "tokenizer.json")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))

    class Sentinel:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(tmp_path / "UNPICKLED"), "w"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Sentinel()))
    return folder


def _copy(base_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run, out, symlinks=True)
    return out


def _rewrite_adapter_config(ck: Path, data: bytes) -> None:
    (ck / "adapter_config.json").write_bytes(data)
    sign(ck, body(ck))


@pytest.mark.parametrize("merge", [False, True])
def test_an_adapter_config_naming_another_base(
    base_run: Path, tmp_path: Path, attacker: Path, merge: bool
) -> None:
    out = _copy(base_run, tmp_path)
    ck = out / "checkpoint-2"
    doc = json.loads((ck / "adapter_config.json").read_bytes())
    doc["base_model_name_or_path"] = str(attacker)
    _rewrite_adapter_config(ck, json.dumps(doc).encode())
    dest = tmp_path / "model"
    proc = cli("export", out, "--checkpoint", "latest", "--out", dest, *(["--merge"] * merge))
    text = no_traceback(proc)
    if merge:  # no base it was given: refused, naming what the adapter claims
        assert proc.returncode == 2, text
        assert "--base" in text and str(attacker) in text
        assert not dest.exists()
    else:
        assert proc.returncode == 0, text
        assert "no tokenizer copied" in text
        assert sorted(os.listdir(dest)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (tmp_path / "UNPICKLED").exists()


def test_merge_onto_the_base_given(base_run: Path, tmp_path: Path, attacker: Path) -> None:
    out = _copy(base_run, tmp_path)
    ck = out / "checkpoint-2"
    doc = json.loads((ck / "adapter_config.json").read_bytes())
    doc["base_model_name_or_path"] = str(attacker)
    _rewrite_adapter_config(ck, json.dumps(doc).encode())
    dest = tmp_path / "model"
    base = tiny_model_path()
    proc = cli("export", out, "--out", dest, "--checkpoint", "2", "--merge", "--base", base)
    text = no_traceback(proc)
    assert proc.returncode == 0, text
    assert f"base model: {base} (--base)" in text
    assert (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file()
    assert not (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("data", [b"not json {", b"[1, 2, 3]", b"[" * 5000 + b"]" * 5000])
def test_an_adapter_config_that_is_not_an_object(
    base_run: Path, tmp_path: Path, data: bytes
) -> None:
    out = _copy(base_run, tmp_path)
    _rewrite_adapter_config(out / "checkpoint-2", data)
    proc = cli("export", out, "--checkpoint", "latest", "--out", tmp_path / "model")
    text = no_traceback(proc)
    assert proc.returncode != 0 and text.startswith("Error: "), text
    assert "adapter_config.json" in text


def test_an_unlisted_adapter_config_is_never_read(tmp_path: Path) -> None:
    """A plain-loop checkpoint with a planted adapter config (a FIFO: a read hangs)."""
    out = tmp_path / "run"
    make_run(out)
    os.mkfifo(out / "checkpoint-9" / "adapter_config.json")
    (out / "checkpoint-5" / "adapter_config.json").write_text('{"base_model_name_or_path": "/"}')
    for which in ("9", "5"):
        proc = cli("export", out, "--checkpoint", which, "--out", tmp_path / f"m{which}")
        text = no_traceback(proc)
        assert proc.returncode != 0 and text.startswith("Error: "), text
        assert not (tmp_path / f"m{which}").exists()
    assert "plain training loop" in text
