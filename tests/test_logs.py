"""What a run leaves for people and tools: train.log (with the traceback of every recovered failure,
appended across resumes), metrics.csv, and TensorBoard curves that continue after a resume."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from conftest import FAST, run_cli

ARGS = [*FAST, "--base-model", "none"]


def test_train_log_has_every_line_and_the_traceback_of_a_recovered_failure(tiny_idx: Path, tmp_path: Path):
    args = [*ARGS, "--data", str(tiny_idx), "--output-dir", "out"]
    first = run_cli(args, cwd=tmp_path, faults="error@8,sigint@13")
    assert first.returncode == 130, first.stderr[-2000:]
    log = (tmp_path / "out" / "train.log").read_text()
    assert log.count("=====") == 2 and "a new run" in log  # one start marker (a line with ===== on both sides)
    assert "data: " in log and "train class counts" in log  # logged before the folder could be written
    assert "Traceback (most recent call last)" in log and "RuntimeError: injected fault: error at step 8" in log
    assert "recovering (retry 1/5)" in log and "epoch   1/3" in log
    assert "run ended: Interrupted: SIGINT: stopped at epoch 3, step 2" in log
    second = run_cli(args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    log = (tmp_path / "out" / "train.log").read_text()
    assert log.count("=====") == 4 and "resuming from checkpoint_last.pth" in log  # appended, a second marker
    assert log.index("RuntimeError: injected fault") < log.index("resuming from checkpoint_last.pth")
    for line in second.stdout.splitlines():
        if line.strip():
            assert line in log  # every line the run printed, with a time stamp in front
    assert log.rstrip().splitlines()[-1].endswith("config_finetuned.json")  # the closing line


def test_metrics_csv_holds_the_history(reference_run: Path):
    history = json.loads((reference_run / "history.json").read_text())
    with open(reference_run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [r["epoch"] for r in history]
    assert list(rows[0]) == list(history[0])  # the same fields, in the same order
    for row, record in zip(rows, history):
        assert float(row["val_acc"]) == pytest.approx(record["val_acc"])
        assert float(row["train_loss"]) == pytest.approx(record["train_loss"])
        assert json.loads(row["events"]) == record["events"]


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every ``tag`` scalar in the event files of ``folder``, in file order: a plain
    TFRecord reader (length, CRC, Event, CRC), so that what any tool would read is checked."""
    from tensorboardX.proto import event_pb2

    found = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (size,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + size])
            pos += 12 + size + 4
            found += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
        assert pos == len(data), f"{path.name}: a record is cut short"
    return found


@pytest.mark.parametrize("fault, code", [("sigint@9", 130), ("kill@11", -9)])
def test_tensorboard_curves_continue_after_a_resume_without_duplicates(tiny_idx: Path, tmp_path: Path, fault: str,
                                                                        code: int):
    # SIGINT saves at the step. SIGKILL at the end of epoch 2 (step 12), half-way through its save, leaves
    # the checkpoint of step 6 while the event file already holds steps 7-12 (the epoch's scalars are
    # flushed before its save): the resumed run redoes them, and they must not appear twice.
    pytest.importorskip("tensorboardX")
    board = tmp_path / "out" / "tensorboard"
    args = [*ARGS, "--data", str(tiny_idx), "--output-dir", "out", "--logger", "tensorboard"]
    assert run_cli(args, cwd=tmp_path, faults=fault).returncode == code
    if fault.startswith("kill"):
        assert max(step for step, _ in scalars(board, "train/loss")) > 6  # steps beyond the checkpoint were on disk
    assert run_cli(args, cwd=tmp_path).returncode == 0
    assert [step for step, _ in scalars(board, "train/loss")] == list(range(1, 19))  # 3 epochs of 6 steps, each once
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    val = scalars(board, "epoch/val_acc")
    assert [step for step, _ in val] == [6, 12, 18]
    assert [value for _, value in val] == pytest.approx([r["val_acc"] for r in history])
    assert scalars(board, "train/lr")[-1][1] == pytest.approx(history[-1]["lr"], rel=1e-5)


def test_tensorboard_without_the_package_is_bad_input(tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboardX" else real(name, *a))
    proc = run_cli([*ARGS, "--data", str(tiny_idx), "--output-dir", "out", "--logger", "tensorboard"], cwd=tmp_path)
    assert proc.returncode == 2 and "needs the tensorboardX package" in proc.stderr
    assert not (tmp_path / "out").exists()
