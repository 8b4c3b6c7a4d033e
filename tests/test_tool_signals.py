"""Ctrl+C in the tools (evaluate.py, predict.py, export.py), sent for real to a real process while it
works: it stops within a second with exit 130, one line and no traceback, and leaves no half-written
output; an export in progress leaves the earlier export set whole."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, MNIST_TEST, ROOT, cli_env, run_cli

SCRIPTS = ROOT / "scripts"
QMNIST = MNIST_TEST.parent / "qmnist" / "images"  # 8,400 raw PNG photos: a slow input to preprocess
STOP_WITHIN = 3.0  # seconds from the signal to the exit: "within a second", with room for a busy machine


@pytest.fixture(scope="module")
def model(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model file trained for real on the tiny set."""
    work = tmp_path_factory.mktemp("toolsig")
    proc = run_cli([*FAST, "--epochs", "1", "--base-model", "none", "--data", str(tiny_idx), "--output-dir", "run"], work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return work / "run" / "best_model_finetuned.pth"


def start(script: str, args: list[str], cwd: Path, stdout=subprocess.PIPE, sigint_ignored: bool = False) -> subprocess.Popen[str]:
    """The tool in a subprocess; ``sigint_ignored``: started with SIGINT ignored, as a script's background job is."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen([sys.executable, str(SCRIPTS / f"{script}.py"), *args], cwd=cwd, env=cli_env(cwd),
                            stdout=stdout, stderr=subprocess.PIPE, text=True, preexec_fn=ignore)


def wait_for_line(stream, text: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Read ``stream`` until a line holds ``text`` (the tool has reached its slow part)."""
    end = time.monotonic() + timeout
    for line in stream:
        if text in line:
            return
        assert time.monotonic() < end and proc.poll() is None, f"never saw {text!r}"
    raise AssertionError(f"the tool ended before {text!r}: {proc.wait()}")


def interrupt(proc: subprocess.Popen[str]) -> tuple[int, str, str, float]:
    """SIGINT now; the exit code, the rest of stdout and stderr, and the seconds it took to stop."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err, time.monotonic() - t0


@pytest.mark.skipif(not QMNIST.is_dir(), reason="needs the real QMNIST photos in ../shared/data/qmnist")
@pytest.mark.parametrize("inherited", ["default", "ignored"])  # ignored: the tool ran on to exit 0 (as training never did)
def test_ctrl_c_stops_predict_at_once_with_nothing_printed(model: Path, tmp_path: Path, inherited: str):
    # Standard output to a file: a pipe nobody reads while stderr is read could fill and block the tool.
    with open(tmp_path / "stdout.json", "w") as stdout:
        proc = start("predict", ["--model", str(model), "--json", str(QMNIST)], tmp_path, stdout=stdout,
                     sigint_ignored=inherited == "ignored")
        wait_for_line(proc.stderr, "predicting 8400 image(s)", proc)  # 8,400 photos: 10-30 s of preprocessing ahead
        code, _, err, took = interrupt(proc)
    assert code == 130, err[-2000:]
    assert took < STOP_WITHIN, took
    assert "Traceback" not in err and "predict.py: stopped by SIGINT; no prediction was printed" in err
    assert (tmp_path / "stdout.json").read_text() == ""  # no half JSON list


@pytest.mark.skipif(not QMNIST.is_dir(), reason="needs the real QMNIST photos in ../shared/data/qmnist")
def test_ctrl_c_stops_evaluate_at_once_and_keeps_the_earlier_report(model: Path, tmp_path: Path):
    # Ten class folders named as the model's classes, of raw photos to preprocess (links: nothing copied).
    data = tmp_path / "photos"
    letters = sorted(p for p in QMNIST.iterdir() if p.is_dir())[:10]
    for digit, folder in enumerate(letters):
        (data / str(digit)).mkdir(parents=True)
        for k, photo in enumerate(sorted(folder.iterdir())[:150]):
            (data / str(digit) / f"{k}.png").symlink_to(photo)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "evaluation.json").write_text('{"earlier": true}\n')
    proc = start("evaluate", ["--model", str(model), "--data", str(data), "--no-cache", "--output-dir", str(reports)],
                 tmp_path)
    wait_for_line(proc.stdout, "model: ", proc)  # printed before the 1,500 photos are read
    code, out, err, took = interrupt(proc)
    assert code == 130, err[-2000:]
    assert took < STOP_WITHIN, took
    assert "Traceback" not in err and "evaluate.py: stopped by SIGINT; no report was written" in err
    assert sorted(os.listdir(reports)) == ["evaluation.json"]
    assert (reports / "evaluation.json").read_text() == '{"earlier": true}\n'


def wide_model(model: Path, folder: Path) -> Path:
    """Another model of the same file name, wide (about 27 MB): its export takes seconds, not a fraction."""
    from cnn_finetune.files.checkpoint import load_checkpoint, save_checkpoint
    from cnn_finetune.model.cnn import build_model

    state = load_checkpoint(model)
    state["model"] = build_model(len(state["class_names"]), width=160).state_dict()
    state["arch_params"]["width"] = state["config"]["width"] = 160
    folder.mkdir()
    save_checkpoint(state, folder / model.name)
    return folder / model.name


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_ctrl_c_during_an_export_leaves_the_earlier_set_whole(model: Path, tmp_path: Path):
    pytest.importorskip("onnx")
    out = tmp_path / "export"
    first = subprocess.run([sys.executable, str(SCRIPTS / "export.py"), "--model", str(model), "--output-dir", str(out)],
                           cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    before = digests(out)
    assert len(before) == 4
    other = wide_model(model, tmp_path / "other")
    proc = start("export", ["--model", str(other), "--output-dir", str(out)], tmp_path)
    # TorchScript and safetensors are written (into the staging folder) before ONNX is made and checked.
    staged = out / f".{other.stem}.export.tmp-{proc.pid}" / f"{other.stem}.safetensors"
    end = time.monotonic() + 120
    while not staged.exists():
        assert proc.poll() is None and time.monotonic() < end, proc.stderr.read()[-2000:]
        time.sleep(0.002)
    code, _, err, took = interrupt(proc)
    assert code == 130, err[-2000:]
    assert took < STOP_WITHIN, took
    assert "Traceback" not in err and "export.py: stopped by SIGINT; the export folder keeps the earlier set" in err
    assert digests(out) == before  # the first model's four files, byte for byte; no staging folder left
    again = subprocess.run([sys.executable, str(SCRIPTS / "export.py"), "--model", str(other), "--output-dir", str(out)],
                           cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    after = digests(out)
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in after)  # a whole new set


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export_and_nothing_else(model: Path, tmp_path: Path):
    out = tmp_path / "export"
    other = wide_model(model, tmp_path / "other")
    proc = start("export", ["--model", str(other), "--output-dir", str(out), "--no-onnx"], tmp_path)
    staging = out / f".{other.stem}.export.tmp-{proc.pid}"
    end = time.monotonic() + 120
    while not (staging / f"{other.stem}.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < end, proc.stderr.read()[-2000:]
        time.sleep(0.002)
    proc.kill()  # SIGKILL: no handler runs, the staging folder stays behind
    proc.communicate(timeout=60)
    assert staging.is_dir()
    # Not to be touched: the folder of a running export (this test's own pid) and one holding a user's file.
    running = out / f".{other.stem}.export.tmp-{os.getpid()}"
    running.mkdir()
    (running / f"{other.stem}.safetensors").write_bytes(b"in progress")
    foreign = out / f".{other.stem}.export.tmp-999999999"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    again = subprocess.run([sys.executable, str(SCRIPTS / "export.py"), "--model", str(other), "--output-dir", str(out), "--no-onnx"],
                           cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert not staging.exists()
    assert (running / f"{other.stem}.safetensors").read_bytes() == b"in progress"
    assert (foreign / "notes.txt").read_text() == "mine"
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        f"{other.stem}.torchscript.pt", f"{other.stem}.safetensors", f"{other.stem}.preprocessing.json"}
