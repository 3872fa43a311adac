"""``safepoint report``: the data behind each plot of a real run, the files, the CLI.

The run (tests/programs/report_train.py, real processes): saves every 5 steps, keep_last=2 and
keep_best=1 by an eval loss that bottoms out at step 10; killed by SIGKILL at step 17
(resumes from 15: 2 steps lost), then an emergency save at 22 and SIGKILL (resumes from
22: nothing lost), then it finishes at 30.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from safepoint.cli import main
from safepoint.report import extract
from safepoint.report_render import figure, write_report

TESTS = Path(__file__).parent
REPORT_TRAIN = TESTS / "programs" / "report_train.py"
STOCK_TRAINER = TESTS / "programs" / "stock_trainer_run.py"


def train(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPORT_TRAIN), str(out), "--max-disk", "150KB", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def eval_loss(step: int) -> float:
    return round(0.6 + 0.04 * abs(step - 10), 4)  # as tests/programs/report_train.py logs it


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    first = train(out, "--die-at", "17")
    assert first.returncode == -9, first.stderr
    second = train(out, "--emergency-at", "22", "--die-at", "22")
    assert second.returncode == -9, second.stderr
    assert "start 15" in second.stdout
    third = train(out)
    assert third.returncode == 0, third.stderr
    assert "start 22" in third.stdout
    return out


@pytest.mark.crash
def test_loss_points_follow_every_process(run_dir: Path) -> None:
    data = extract(run_dir)
    assert data.source == "record" and data.attempts == 3
    by_attempt = {
        a: [p.step for p in data.train_loss if p.attempt == a] for a in range(data.attempts)
    }
    assert by_attempt == {
        0: list(range(1, 18)),
        1: list(range(16, 23)),  # steps 16 and 17 redone
        2: list(range(23, 31)),
    }
    # A resumed run is exact: the redone steps log the same loss as the first time.
    first = {p.step: p.value for p in data.train_loss if p.attempt == 0}
    redo = {p.step: p.value for p in data.train_loss if p.attempt == 1}
    assert redo[16] == first[16] and redo[17] == first[17]
    assert [(p.step, p.value) for p in data.eval_loss] == [
        (s, eval_loss(s)) for s in (5, 10, 15, 20, 25, 30)
    ]


@pytest.mark.crash
def test_checkpoint_marks_and_kept_table(run_dir: Path) -> None:
    data = extract(run_dir)
    marks = {m.step: m for m in data.checkpoints}
    assert {s: m.kind for s, m in marks.items()} == {
        5: "deleted",
        10: "best",
        15: "deleted",
        20: "deleted",
        22: "emergency",
        25: "kept",
        30: "kept",
    }
    # Marks sit on the eval curve where an eval loss was logged, else on the train curve.
    loss_at = {p.step: p.value for p in data.train_loss}
    assert {s: m.y for s, m in marks.items()} == {
        **{s: eval_loss(s) for s in (5, 10, 15, 20, 25, 30)},
        22: loss_at[22],
    }
    assert marks[5].deleted_by == "keep_last=2, keep_best=1 by eval_loss (min), max_disk=150000"
    assert marks[22].deleted_by is not None  # emergency, later deleted by retention
    assert marks[10].deleted_by is None and marks[10].metrics["eval_loss"] == eval_loss(10)
    assert [(r.name, r.kept_because) for r in data.kept] == [
        ("checkpoint-10", ("best",)),
        ("checkpoint-25", ("last-2",)),
        ("checkpoint-30", ("latest", "last-2")),
    ]
    assert all(r.bytes == m.bytes > 0 for r in data.kept for m in [marks[r.step]])


@pytest.mark.crash
def test_resume_points_and_redone_steps(run_dir: Path) -> None:
    data = extract(run_dir)
    assert [(r.step, r.checkpoint, r.reached, r.steps_lost, r.attempt) for r in data.resumes] == [
        (15, "checkpoint-15", 17, 2, 1),
        (22, "checkpoint-22", 22, 0, 2),
    ]


@pytest.mark.crash
def test_save_timings_and_disk_use(run_dir: Path) -> None:
    data = extract(run_dir)
    assert [(s.step, s.result) for s in data.saves] == [
        (s, "committed") for s in (5, 10, 15, 20, 22, 25, 30)
    ]
    assert all(s.stall_s and s.stall_s > 0 and s.write_s and s.write_s > 0 for s in data.saves)
    assert "emergency" in data.saves[4].reason
    # Disk: starts empty, ends at what is on disk now, and the budget is the run's.
    assert data.budget == 150_000
    times = [t for t, _ in data.disk]
    assert times == sorted(times) and data.disk[0] == (0.0, 0)
    assert data.disk[-1][1] == sum(r.bytes for r in data.kept)
    assert max(b for _, b in data.disk) > data.disk[-1][1]  # before retention deleted
    one = data.kept[0].bytes
    # Each process starts from what it found on disk: 2 checkpoints, then 3.
    starts = [b for (t, b) in data.disk if t > 0 and b in (2 * one, 3 * one)]
    assert starts


@pytest.mark.crash
def test_drawing_plots_exactly_the_extracted_data(run_dir: Path) -> None:
    import matplotlib.pyplot as plt

    data = extract(run_dir)
    fig = figure(data)
    try:
        loss_ax, saves_ax, disk_ax = fig.axes
        lines = {ln.get_label(): ln for ln in loss_ax.lines}
        eval_line = lines["eval loss"]
        assert list(eval_line.get_xdata()) == [p.step for p in data.eval_loss]
        train_steps = {
            int(x) for ln in loss_ax.lines if ln.get_color() == "#2b6cb0" for x in ln.get_xdata()
        }
        assert train_steps == set(range(1, 31))
        scatter = {c.get_label(): c.get_offsets().tolist() for c in loss_ax.collections}
        assert scatter["best checkpoint"] == [[10, data.checkpoints[1].y]]
        assert [x for x, _ in scatter["deleted by retention"]] == [5, 15, 20]
        assert [x for x, _ in scatter["emergency save"]] == [22]
        assert len(saves_ax.patches) == 2 * len(data.saves)
        assert [t.get_text() for t in saves_ax.get_xticklabels()][4] == "22!"
        budget = [ln for ln in disk_ax.lines if ln.get_label().startswith("budget")]
        assert budget and budget[0].get_label() == "budget 150.00 KB"
    finally:
        plt.close(fig)


@pytest.mark.crash
def test_cli_writes_png_and_self_contained_html(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "2 restart(s), 2 steps lost" in out
    png = tmp_path / "r" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "r" / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from a network
    assert "<td>checkpoint-10</td>" in page and "best" in page
    assert "checkpoint-15" in page  # the restarts table

    assert main(["report", str(run_dir), "--out", str(tmp_path / "j"), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "j").exists()  # --json only prints (#29 item 8)
    assert [c["kind"] for c in body["checkpoints"]][:2] == ["deleted", "best"]
    assert body["resumes"][0]["steps_lost"] == 2


def test_cli_missing_directory_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_empty_directory_renders_with_a_note(tmp_path: Path) -> None:
    data = extract(tmp_path)
    assert data.source == "empty" and data.notes
    paths = write_report(data, tmp_path / "out")
    assert paths["png"].stat().st_size > 0
    assert "nothing to report yet" in paths["html"].read_text()


def test_torn_record_still_reports(tmp_path: Path) -> None:
    (tmp_path / "safepoint.log.jsonl").write_bytes(
        b'{"t":1,"event":"start","config":{"keep_last":2},"on_disk":[]}\n'
        b'{"t":2,"event":"metrics","step":1,"metrics":{"loss":2.0,"eval_loss":"nan"}}\n'
        b'{"t":3,"event":"signal","signal":"SIGTERM","step":1}\n'
        b'{"t":4,"event":"emergency_save","step":1,"result":"skipped","left_s":0.5}\n'
        b'{"t":5,"event":"metrics","step":2,"metr'
    )
    data = extract(tmp_path)
    assert [(p.step, p.value) for p in data.train_loss] == [(1, 2.0)]
    assert data.eval_loss == []  # a NaN is not plotted
    assert [e["event"] for e in data.signals] == ["signal", "emergency_save"]
    page = write_report(data, tmp_path / "out")["html"].read_text()
    assert "<td>SIGTERM</td>" in page and "result=skipped" in page


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stock")
    proc = subprocess.run(
        [sys.executable, str(STOCK_TRAINER), str(out), "--steps", "12"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_stock_trainer_directory_shows_loss_and_checkpoints(stock_dir: Path) -> None:
    data = extract(stock_dir)
    assert data.source == "trainer_state"
    assert [p.step for p in data.train_loss] == list(range(1, 13))
    assert [p.step for p in data.eval_loss] == [4, 8, 12]
    state = json.loads((stock_dir / "checkpoint-12" / "trainer_state.json").read_text())
    losses = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    assert all(p.value == losses[p.step] for p in data.train_loss)
    best = Path(state["best_model_checkpoint"]).name
    kinds = {m.name: m.kind for m in data.checkpoints}
    assert set(kinds) == {p.name for p in stock_dir.glob("checkpoint-*")}
    assert kinds[best] == "best" and list(kinds.values()).count("best") == 1
    assert data.saves == [] and data.disk == [] and data.notes
    paths = write_report(data, stock_dir / "report")
    page = paths["html"].read_text()
    assert "stock Trainer" in page
    assert page.count("<img class=plot") == 1  # no empty timing and disk panels


def test_stock_trainer_page_says_what_is_true(
    stock_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """#29 item 8: on a stock Trainer folder the checkpoint table holds the metrics that
    matter (the others folded below it), the cards count its checkpoints (not "saves 0"),
    and ``report --json`` prints JSON and writes nothing."""
    data = extract(stock_dir)
    page = write_report(data, tmp_path / "r")["html"].read_text()
    table = page.split("<h2>Checkpoints on disk</h2>")[1].split("</table>")[0]
    headers = re.findall(r"<th>([^<]*)</th>", table)
    assert headers[-3:] == ["kept because", "stall", "write"]
    assert {"loss", "eval_loss"} >= set(headers[4:-3]) and "eval_runtime" not in headers
    assert "<details><summary>Other logged metrics" in page and "eval_runtime" in page
    cards = dict(
        (k, v) for v, k in re.findall(r"<div class=card><b>([^<]*)</b><span>([^<]*)</span>", page)
    )
    assert "saves" not in cards
    assert cards["checkpoints (save times not recorded)"] == str(len(data.checkpoints)) != "0"
    assert "best by eval_loss" in page
    before = sorted(p.name for p in stock_dir.iterdir())
    assert main(["report", str(stock_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "trainer_state"
    assert sorted(p.name for p in stock_dir.iterdir()) == before


@pytest.mark.crash
def test_ls_shows_stall_and_write_of_each_save(run_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich would squeeze the headers into 80 columns
    data = extract(run_dir)
    assert main(["ls", str(run_dir), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for kept in data.kept:
        assert rows[kept.name]["stall_s"] == kept.stall_s > 0
        assert rows[kept.name]["write_s"] == kept.write_s > 0
    assert main(["ls", str(run_dir)]) == 0
    header = capsys.readouterr().out
    assert "stall" in header and "write" in header


def test_background_and_skipped_saves(tmp_path: Path) -> None:
    lines = [
        {"event": "start", "config": {}, "on_disk": []},
        {"event": "save_skipped", "step": 4, "busy_step": 2},
        {"event": "save", "step": 2, "stall_s": 0.001, "write_s": 0.5, "bytes": 10},
        {"event": "save_skipped", "step": 6, "reason": "step 6", "error": "No space left"},
        {"event": "save", "step": 8, "stall_s": 0.001, "write_s": 0.5, "bytes": 10},
    ]
    text = "".join(json.dumps({"t": i, **e}) + "\n" for i, e in enumerate(lines))
    (tmp_path / "safepoint.log.jsonl").write_text(text)
    data = extract(tmp_path)
    # The background commit of step 2 was recorded late: the chart still goes by step.
    assert [(s.step, s.result) for s in data.saves] == [
        (2, "committed"),
        (6, "failed"),
        (8, "committed"),
    ]
    assert data.skipped_saves == [4]
    page = write_report(data, tmp_path / "out")["html"].read_text()
    assert "saves skipped (writer busy)" in page


def test_a_run_without_eval_loss_says_it_has_no_best(tmp_path: Path) -> None:
    """#29 item 8: a run that logs only its training loss has no best checkpoint; the page
    said "best by eval_loss (min)" all the same. A real Checkpointer run, in process."""
    import torch

    from safepoint import Checkpointer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Checkpointer(tmp_path / "run", save_every=2, total_steps=4) as ckpt:
        for step in range(1, 5):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.step(step, {"model": model, "optimizer": opt}, metrics={"loss": loss.item()})
    data = extract(tmp_path / "run")
    assert data.source == "record" and len(data.kept) == 2
    page = write_report(data, tmp_path / "r")["html"].read_text()
    assert "best by" not in page
    assert f"no best checkpoint: none has {data.metric}" in page
