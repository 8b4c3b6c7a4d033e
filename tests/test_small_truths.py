"""What the tools say about themselves is true: the program name in usage lines, --version, the
start-up line of a resumed run, and a warning when a model is evaluated on its own training data.
(The README's evaluate example is run from a fresh layout by tests/test_readme_run.py.)"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, cli_env, run_cli

from cnn_finetune import __version__

TOOLS = {"cli": ("train_finetuned.py", "train-finetuned"), "tools.evaluate": ("evaluate.py", "cnn-evaluate"),
         "tools.predict": ("predict.py", "cnn-predict"), "tools.export": ("export.py", "cnn-export")}


@pytest.mark.parametrize("module", sorted(TOOLS))
@pytest.mark.parametrize("how", ["script", "console_script", "windows_console_script", "python_-c"])
def test_usage_names_the_program_that_was_run(module: str, how: str, monkeypatch: pytest.MonkeyPatch):
    script, console = TOOLS[module]
    argv0, expected = {"script": (f"scripts/{script}", script), "console_script": (f"/venv/bin/{console}", console),
                       "windows_console_script": (rf"C:\venv\Scripts\{console}.exe".replace("\\", "/"), console),
                       "python_-c": ("-c", script)}[how]
    monkeypatch.setattr(sys, "argv", [argv0])
    usage = importlib.import_module(f"cnn_finetune.{module}").build_parser().format_usage()
    assert usage.startswith(f"usage: {expected} [-h] [--version]"), usage


@pytest.mark.parametrize("module", sorted(TOOLS))
def test_version_on_all_four_tools(module: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{TOOLS[module][1]}"])
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"cnn_finetune.{module}").main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"{TOOLS[module][1]} (cnn-finetune) {__version__}\n"


def test_installed_console_script_and_script_say_their_names(tmp_path: Path):
    console = Path(sys.executable).parent / "cnn-evaluate"
    runs = [([sys.executable, str(ROOT / "scripts" / "export.py"), "--help"], "usage: export.py ")]
    if console.exists():  # installed by pip install -e (the README's set-up command)
        runs.append(([str(console), "--version"], f"cnn-evaluate (cnn-finetune) {__version__}"))
    for argv, expected in runs:
        proc = subprocess.run(argv, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith(expected), proc.stdout + proc.stderr


def test_resumed_run_says_it_resumes_and_how_the_run_began(tiny_idx: Path, tmp_path: Path):
    from cnn_finetune.model.cnn import build_model

    base = tmp_path / "base.pth"
    torch.save(build_model(10, width=8).state_dict(), base)
    args = [*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--base-model", str(base)]
    first = run_cli(args, tmp_path, faults="sigint@8")
    assert first.returncode == 130, first.stderr[-2000:]
    began = f"fine-tuning from {base}: all layers loaded"
    assert f"parameters) on cpu; {began}\n" in first.stdout
    resumed = run_cli(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    model_line = next(line for line in resumed.stdout.splitlines() if line.startswith("model: CNN v2"))
    assert model_line.endswith(f"on cpu; resumes from checkpoint_last.pth (the run started {began})"), model_line
    assert "resuming from out/checkpoint_last.pth: epoch 2, step 3 of 6" in resumed.stdout


# ------------------------------------------------------------------------------------------------
# evaluate.py on the data the model was trained on


@pytest.fixture(scope="module")
def tiny_model(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("tiny_model")
    proc = run_cli([*FAST, "--epochs", "1", "--data", str(tiny_idx), "--output-dir", "out"], work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return work / "out" / "best_model_finetuned.pth"


def evaluate(model: Path, data: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str, dict]:
    from cnn_finetune.tools.evaluate import main

    assert main(["--model", str(model), *data, "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err, json.loads((out / "evaluation.json").read_text())


def test_evaluate_warns_on_the_training_data_only(tiny_model: Path, tiny_idx: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]):
    out, err, report = evaluate(tiny_model, ["--data", str(tiny_idx)], tmp_path / "seen", capsys)
    assert f"warning: {tiny_idx} is the data this model was trained on" in err
    assert report["data"]["seen_in_training"] == "training"
    # The same digits less one are other data: no warning (held-out data is what evaluation is for).
    from cnn_finetune.data.loader import load_dataset, write_idx

    ds = load_dataset(tiny_idx, use_cache=False)
    folder = tmp_path / "other"
    folder.mkdir()
    write_idx(folder / "t-images-idx3-ubyte.gz", ds.images[1:, 0].numpy())
    write_idx(folder / "t-labels-idx1-ubyte.gz", ds.labels[1:].numpy().astype("uint8"))
    out, err, report = evaluate(tiny_model, ["--data", str(folder / "t-images-idx3-ubyte.gz")], tmp_path / "new", capsys)
    assert "warning" not in err and report["data"]["seen_in_training"] is None


def test_evaluate_without_data_says_it_uses_the_builtin_sample(tiny_model: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]):
    out, err, report = evaluate(tiny_model, [], tmp_path / "builtin", capsys)
    assert "no --data: evaluating on the built-in MNIST sample" in out
    assert "warning" not in err  # this model was trained on the tiny set, not on the sample
    assert report["num_samples"] == 5000 and report["data"]["kind"] == "builtin"


def test_evaluate_warns_when_the_default_model_meets_its_builtin_sample(tiny_model: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]):
    """A model trained on the built-in sample (the README's run) evaluated without --data."""
    from cnn_finetune.files.checkpoint import load_checkpoint, save_checkpoint
    from cnn_finetune.data.loader import load_dataset

    state = load_checkpoint(tiny_model)
    state["data_fingerprint"] = load_dataset(None).fingerprint()  # as train_finetuned.py on the sample writes it
    model = tmp_path / "on_sample.pth"
    save_checkpoint(state, model)
    out, err, report = evaluate(model, [], tmp_path / "eval", capsys)
    assert "no --data: evaluating on the built-in MNIST sample" in out
    assert "warning: built-in MNIST sample" in err and "is the data this model was trained on" in err
    assert report["data"]["seen_in_training"] == "training"


def test_every_log_handler_gets_encodable_text_for_a_name_that_is_not_utf8() -> None:
    # pytest's log capture (sent as UTF-8 by xdist), a notebook's handler or a UTF-8 log file must not
    # meet the lone surrogates that keep a non-UTF-8 file name (os.fsdecode) exact.
    import logging
    import os

    from cnn_finetune.log import logger

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        logger.warning("skipped %s: unreadable", os.fsdecode(b"data/cl\xffass/a.png"))
    finally:
        logger.removeHandler(handler)
    assert seen == ["skipped data/cl\\xffass/a.png: unreadable"]
    seen[0].encode("utf-8")
