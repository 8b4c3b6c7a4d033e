"""The run pipeline and its Python API: train in-process, use the model, stop with Ctrl+C, and every
refused run leaves the output folder exactly as it was."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, cli_env, load_state, run_cli

from cnn_finetune import TrainConfig, train
from cnn_finetune.errors import ConfigError, UserError


def digest_tree(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_config(tiny_idx: Path, out: Path, **extra: object) -> TrainConfig:
    values = dict(data=str(tiny_idx), output_dir=str(out), width=8, batch_size=64, epochs=2, base_model=None,
                  cooldown_min=0.0, cooldown_max=0.0, checkpoint_every_seconds=0.0)
    return TrainConfig(**{**values, **extra})


def test_api_trains_and_the_model_predicts(tiny_idx: Path, tmp_path: Path, one_thread, capsys, monkeypatch):
    """The README's notebook example: train, load the best model, predict a few images."""
    from cnn_finetune.data.loader import load_dataset
    from cnn_finetune.tools.inference import predict_proba
    from cnn_finetune.model.loading import load_model_file

    monkeypatch.setenv("TRAIN_FAULTS", "")
    result = train(tiny_config(tiny_idx, tmp_path / "out"))
    assert result.status == "completed" and result.exit_code == 0
    assert result.best_model_path == tmp_path / "out" / "best_model_finetuned.pth" and result.best_model_path.is_file()
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert result.best["epoch"] in (1, 2)
    assert "completed 2 epochs" in capsys.readouterr().out  # the package logger prints like the CLI

    model, meta = load_model_file(result.best_model_path)
    ds = load_dataset(tiny_idx, use_cache=False)
    probs = predict_proba(model, meta, ds.images[:16])
    assert probs.shape == (16, 10) and torch.allclose(probs.sum(1), torch.ones(16))
    assert meta["class_names"] == [str(i) for i in range(10)]

    # Running it again continues the finished run: nothing to do, same result, and it can be silenced.
    logging.getLogger("cnn_finetune").setLevel(logging.WARNING)
    try:
        again = train(tiny_config(tiny_idx, tmp_path / "out"))
    finally:
        logging.getLogger("cnn_finetune").setLevel(logging.INFO)
    assert again.status == "already_finished" and again.best == result.best
    assert capsys.readouterr().out == ""


def test_api_refuses_bad_input_with_typed_errors(tiny_idx: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="epochs=0 must be a positive number"):
        train(tiny_config(tiny_idx, tmp_path / "out"), epochs=0)
    with pytest.raises(UserError, match="does not exist") as err:
        train(tiny_config(tiny_idx, tmp_path / "out", data=str(tmp_path / "missing")))
    assert err.value.exit_code == 2 and not (tmp_path / "out").exists()


API_SCRIPT = """
import json, sys
from cnn_finetune import TrainConfig, train
cfg = TrainConfig(data=sys.argv[1], output_dir="out", width=8, batch_size=32, epochs=3, base_model=None,
                  checkpoint_every_seconds=0.0)
try:
    train(cfg)
except KeyboardInterrupt as stop:
    print(json.dumps({"type": type(stop).__name__, "saved": stop.saved, "exit_code": stop.exit_code}))
    sys.exit(0)
print("not interrupted")
"""


def test_api_ctrl_c_saves_at_the_step_then_raises_keyboard_interrupt(tiny_idx: Path, tmp_path: Path):
    (tmp_path / "api.py").write_text(textwrap.dedent(API_SCRIPT))
    env = cli_env(tmp_path, TRAIN_FAULTS="sigint@7", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "api.py", str(tiny_idx)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    caught = json.loads(proc.stdout.strip().splitlines()[-1])
    assert caught == {"type": "Interrupted", "saved": True, "exit_code": 130}
    pos = load_state(tmp_path / "out" / "checkpoint_last.pth")["position"]
    assert pos["global_step"] == 8 and pos["step"] == 8 - pos["steps_per_epoch"] * pos["epoch"]


# --- refused runs touch nothing ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def earlier_run(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("earlier")
    assert run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--epochs", "1"], cwd=work).returncode == 0
    return work


REFUSALS = [
    # (extra arguments, TRAIN_FAULTS, fragment of the message)
    (["--no-resume"], "shape@0", "the model cannot train on this data"),  # the one-step check, before the move aside
    (["--no-resume", "--data", "no/such/folder"], None, "does not exist"),
    (["--no-resume", "--set", "width=-3"], None, "width=-3 must be a positive number"),
    (["--lr", "0.5"], None, "lr: checkpoint has 0.003, this run has 0.5"),
    (["--no-resume", "--base-model", "missing.pth"], None, "base model missing.pth does not exist"),
    (["--no-resume", "--test-data", "no/test"], None, "data path no/test does not exist"),
]


@pytest.mark.parametrize("extra, faults, fragment", REFUSALS, ids=lambda v: str(v)[:40])
def test_every_refused_run_leaves_the_folder_untouched(earlier_run: Path, tiny_idx: Path, extra, faults, fragment):
    before = digest_tree(earlier_run)
    args = [*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--epochs", "1", *extra]
    proc = run_cli(args, cwd=earlier_run, faults=faults)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert fragment in proc.stderr
    assert digest_tree(earlier_run) == before  # nothing written, moved or created, anywhere in the work folder


def test_output_dir_that_is_a_file_is_bad_input(tiny_idx: Path, tmp_path: Path):
    (tmp_path / "out").write_text("my notes")
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 2 and "--output-dir out is a file" in proc.stderr
    assert (tmp_path / "out").read_text() == "my notes"


def test_no_resume_on_the_current_folder_is_refused_and_leaves_no_lock(tiny_idx: Path, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", ".", "--no-resume"], cwd=tmp_path)
    assert proc.returncode == 2 and "it is (or contains) the current folder" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "notes.txt"]


# --- the console script and the packaged default config -------------------------------------------------


def test_packaged_default_config_equals_the_dataclass_and_the_checkout_copy():
    from cnn_finetune.config import PACKAGED_CONFIG_PATH

    packaged = json.loads(PACKAGED_CONFIG_PATH.read_text())
    assert packaged == TrainConfig().to_dict() == json.loads((ROOT / "configs" / "finetune.json").read_text())


@pytest.mark.skipif(not (Path(sys.executable).parent / "train-finetuned").exists(),
                    reason="the train-finetuned console script is not installed in this environment")
def test_console_script_works_from_any_folder(tiny_idx: Path, tmp_path: Path):
    script = str(Path(sys.executable).parent / "train-finetuned")
    proc = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: train-finetuned")
    proc = subprocess.run([script, *FAST, "--epochs", "1", "--data", str(tiny_idx), "--output-dir", "out"], cwd=tmp_path,
                          env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "out" / "config_finetuned.json").read_text())["config"]
    # The defaults, the flags, and the automatic settings resolved for a run from scratch.
    expected = {**TrainConfig().to_dict(), "width": 8, "batch_size": 64, "epochs": 1, "cooldown_min": 0.0,
                "cooldown_max": 0.0, "checkpoint_every_seconds": 0.0, "data": str(tiny_idx), "output_dir": "out",
                "patience": 8, "feature_lr_scale": 1.0, "freeze_features_epochs": 0, "tta": "off",
                "bn_stats": "training", "set_aside": "off"}
    assert saved == expected


def test_help_comes_from_the_config_metadata():
    from cnn_finetune.cli import build_parser
    from cnn_finetune.config import field_help

    text = build_parser("train_finetuned.py").format_help()
    for key in ("width", "feature_lr_scale", "checkpoint_every_seconds"):
        words = field_help()[key].split()[:4]
        assert " ".join(words) in " ".join(text.split()), key
    assert "--no-resume" in text and "--no-cache" in text and "--max-retries" in text


def test_interrupted_is_a_keyboard_interrupt_with_fields():
    from cnn_finetune.errors import Interrupted

    err = Interrupted("stopped", signal_name="SIGTERM", exit_code=143, saved=True)
    assert isinstance(err, KeyboardInterrupt) and not isinstance(err, Exception)
    assert (err.exit_code, err.saved, err.second, err.signal_name) == (143, True, False, "SIGTERM")
