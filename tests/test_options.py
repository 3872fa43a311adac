"""``Options``: every option validated once, one stored form, one error for a typo."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from safepoint import ConfigError, Options
from safepoint.retention import RetentionPolicy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"save_every": "5x"}, "cannot read"),
        ({"keep_last": 0}, "keep at least 1"),
        ({"keep_best": -1}, "keep_best=-1"),
        ({"keep_every": 0}, "keep_every=0"),
        ({"keep_after_step": -5}, "keep_after_step=-5"),
        ({"keep_last": 2.5}, "whole number"),
        ({"mode": "best"}, "'min' or 'max'"),
        ({"on_busy": "later"}, "'wait' or 'skip'"),
        ({"on_busy": "skip", "async_save": False}, "async_save=True"),
        ({"copy_free": True, "async_save": False}, "async_save=True"),
        ({"async_save": "yes"}, "True, False or 'auto'"),
        ({"on_save_error": "retry"}, "'stop' or 'continue'"),
        ({"max_disk": "lots"}, "not a size"),
        ({"max_disk": 0}, "larger than zero"),
        ({"mtbf": "soon"}, "not a duration"),
        ({"grace": "-1s"}, "not a duration"),
        ({"max_overhead": 1.5}, "share in (0, 1)"),
        ({"signals": "KILL"}, "cannot be caught"),
        ({"signals": "HUP,NOPE"}, "unknown signal"),
        ({"metric": ""}, "name of a metric"),
    ],
)
def test_bad_values_say_which_option_and_what_to_write(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Options(**kwargs)


def test_a_typo_names_the_option_it_meant() -> None:
    with pytest.raises(ConfigError, match=r"keep_lst.*did you mean 'keep_last'"):
        Options.from_kwargs({"keep_lst": 3})


def test_every_option_is_documented() -> None:
    for name in Options.names():
        assert len(Options.help(name)) > 20, name


def test_the_stored_form_round_trips_and_normalizes_units() -> None:
    o = Options(save_every="10,15m", max_disk="2GB", mtbf="2h", grace="90s", keep_last=3)
    doc = o.to_json()
    assert doc["max_disk"] == 2_000_000_000 and doc["mtbf"] == 7200.0 and doc["grace"] == 90.0
    assert "remote" not in doc and "fingerprint" not in doc  # credentials, stored apart
    again = Options.from_json(doc)
    assert again.to_json() == doc
    assert RetentionPolicy.from_options(again) == RetentionPolicy(keep_last=3, max_bytes=2 * 10**9)


def test_the_policy_of_older_manifests_still_reads() -> None:
    """Manifests written before Options stored max_bytes, save_every_spec and mtbf_s."""
    old = {"keep_last": 2, "keep_best": 1, "max_bytes": 1000, "save_every_spec": "10"}
    o = Options.from_json({**old, "save_every": "every 10 steps", "mtbf_s": 3600.0})
    assert (o.keep_last, o.max_bytes, o.save_every, o.mtbf_s) == (2, 1000, "10", 3600.0)


def test_retention_fields_are_options_fields() -> None:
    """A retention rule is configured through Options only: every field of the policy
    (but the parsed byte budget) is an option of the same name."""
    names = {f.name for f in dataclasses.fields(RetentionPolicy)} - {"max_bytes"}
    assert names <= set(Options.names())


def test_safepoint_train_hands_every_option_to_the_engine(tmp_path: Path) -> None:
    """An option added to Options reaches the run with no edit in the job: flags and
    YAML keys are made from Options, and so is what the job hands its callback (the
    job once passed a list of 20 names, and --keep-after-step was silently dropped)."""
    from safepoint.app.config import TrainConfig
    from safepoint.app.training import job_callback

    flags = {"keep_after_step": 4, "keep_last": 1, "on_busy": "skip", "async_save": True}
    cfg = TrainConfig.resolve(None, {**flags, "output_dir": str(tmp_path / "run")})
    callback = job_callback(cfg, tty=False)
    assert callback.options == cfg.options()
    assert (callback.options.keep_after_step, callback.options.on_busy) == (4, "skip")


def test_help_speaks_to_a_command_line_user(capsys: pytest.CaptureFixture[str]) -> None:
    """#29 item 5: the flag help came from the Python docs: "None keeps all.; 0 keeps
    all", "None", and `"auto", the old default`, which no flag takes. The Python docs
    keep their words."""
    from safepoint.cli import main

    for command in ("prune", "plan", "train"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "None" not in text and "old default" not in text, command
        assert ".;" not in text, command
    assert "Keep the newest N checkpoints; 0 keeps all (default 3)." in text  # train's
    assert "None keeps all" in Options.help("keep_last")
    assert "the old default" in Options.help("async_save")
    assert Options.help("keep_last", flag=True) == "Keep the newest N checkpoints; 0 keeps all."


def test_plan_names_the_bad_value_before_a_missing_one(capsys) -> None:
    """#29 item 5: `plan --step-time abc` said "pass --save-time"."""
    from safepoint.cli import main

    assert main(["plan", "--step-time", "abc"]) == 2
    assert capsys.readouterr().err.strip() == (
        "Error: --step-time 'abc' is not a duration; write e.g. 30s, 15m, 2h"
    )


def test_a_plain_checkpointer_says_it_resumed(tmp_path: Path, capsys) -> None:
    """#29 item 5: the callback says "resuming from"; the plain Checkpointer said
    nothing (its INFO line is hidden by Python's default logging)."""
    import torch

    from safepoint import Checkpointer

    model = torch.nn.Linear(2, 2)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(3, {"model": model})
    capsys.readouterr()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore({"model": model}) == 3
    assert capsys.readouterr().err.splitlines() == [
        f"safepoint: resumed from {tmp_path}/checkpoint-3 (step 3)"
    ]
