"""Calibrated confidence: the temperature fit, the expected calibration error, the "unknown" rule, and
how the tools use the temperature stored in the model file (predict.py, evaluate.py, export, the API)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli_env, load_state


def run_tool(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], cwd=cwd, env=cli_env(cwd),
                          capture_output=True, text=True, timeout=300)


def test_the_fit_recovers_the_temperature_that_made_the_labels():
    from cnn_finetune.tools.calibration import fit_temperature

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 10, generator=g) * 3
    labels = torch.multinomial(torch.softmax(logits / 2.5, 1), 1, generator=g).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(logits[:0], labels[:0]) == 1.0


def test_ece_by_hand_and_after_scaling():
    from cnn_finetune.tools.calibration import calibrated_probs, expected_calibration_error, fit_temperature

    # Two bins used: confidence 0.9 (2 images, 1 right) and 0.6 (2 images, 2 right): ECE = 0.5*0.4 + 0.5*0.4.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    # Over-confident logits: scaling brings the error down to a fraction of it.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5000, 10, generator=g) * 2
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    hot = logits * 3
    before = expected_calibration_error(calibrated_probs(hot), labels)
    after = expected_calibration_error(calibrated_probs(hot, fit_temperature(hot, labels)), labels)
    assert before > 0.2 and after < 0.03


def test_the_unknown_threshold_keeps_99_percent_of_the_right_answers():
    from cnn_finetune.tools.calibration import unknown_threshold

    conf = torch.linspace(0.5, 1.0, 1001)[1:]
    probs = torch.stack([conf, 1 - conf], 1)
    labels = torch.zeros(1000, dtype=torch.int64)
    labels[::10] = 1  # every tenth answer is wrong: those do not count
    t = unknown_threshold(probs, labels)
    right = conf[labels == 0]
    assert (right >= t).float().mean() == pytest.approx(0.99, abs=0.002)
    assert unknown_threshold(probs, torch.ones(1000, dtype=torch.int64)) == 0.0  # no right answer: never unknown


def test_the_run_stores_the_temperature_and_every_tool_uses_it(reference_run: Path, tmp_path: Path):
    from cnn_finetune import load_model_file, predict_proba
    from cnn_finetune.data.loader import load_dataset
    from cnn_finetune.tools.inference import predict_logits

    best = load_state(reference_run / "best_model_finetuned.pth")
    cal = best["calibration"]
    assert 0.05 < cal["temperature"] < 20 and 0.0 <= cal["unknown_threshold"] <= 1.0
    assert cal["fitted_on"] == "validation split" and cal["num_images"] == 40
    # The best-epoch file is the same file (a hard link), calibration included.
    twin = next(p for p in reference_run.glob("best_epoch*.pth") if p.samefile(reference_run / "best_model_finetuned.pth"))
    assert load_state(twin)["calibration"] == cal
    ev = json.loads((reference_run / "evaluation.json").read_text())
    assert ev["temperature"] == pytest.approx(cal["temperature"]) and 0 <= ev["ece"] <= 1 and 0 <= ev["ece_uncalibrated"] <= 1
    assert sum(b["count"] for b in ev["reliability"]) == 40 and len(ev["reliability"]) == 15
    assert (reference_run / "reliability_diagram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model, meta = load_model_file(reference_run / "best_model_finetuned.pth")
    images = load_dataset(None, use_cache=False).images[:16]
    logits = predict_logits(model, meta, images)
    assert torch.allclose(predict_proba(model, meta, images), torch.softmax(logits / cal["temperature"], 1))
    assert torch.allclose(predict_proba(model, meta, images, temperature=1.0), torch.softmax(logits, 1))

    # The export carries it in the .safetensors metadata, and a tool reading that file uses it.
    proc = run_tool("export", ["--model", str(reference_run / "best_model_finetuned.pth"), "--output-dir", "exp", "--no-onnx"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (st,) = (tmp_path / "exp").glob("*.safetensors")
    from cnn_finetune.files.checkpoint import load_safetensors

    assert load_safetensors(st)[1]["calibration"] == cal
    model2, meta2 = load_model_file(st)
    assert torch.allclose(predict_proba(model2, meta2, images), predict_proba(model, meta, images))


def test_predict_answers_unknown_under_the_threshold(reference_run: Path, tmp_path: Path):
    from PIL import Image

    from cnn_finetune.tools.calibration import model_threshold

    noise = torch.randint(0, 256, (28, 28), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    Image.fromarray(noise.numpy(), mode="L").save(tmp_path / "noise.png")  # a blank page is refused as no image at all
    digit = Image.new("L", (28, 28), 0)
    for y in range(6, 22):  # a thick vertical stroke: a "1"
        for x in range(12, 16):
            digit.putpixel((x, y), 255)
    digit.save(tmp_path / "one.png")
    model = str(reference_run / "best_model_finetuned.pth")
    rows = {}
    for setting in ("0", "1", None):
        args = ["--model", model, str(tmp_path / "noise.png"), str(tmp_path / "one.png"), "--json"]
        proc = run_tool("predict", args + (["--min-confidence", setting] if setting else []), tmp_path)
        assert proc.returncode == 0, proc.stderr
        rows[setting] = json.loads(proc.stdout)
    assert [r["unknown"] for r in rows["0"]] == [False, False]  # 0: never unknown
    assert [r["unknown"] for r in rows["1"]] == [True, True]  # 1: always (no confidence is above 1)
    threshold = model_threshold(load_state(reference_run / "best_model_finetuned.pth"))
    for r in rows[None]:
        assert r["confidence"] == r["predictions"][0]["probability"]
        assert r["unknown"] == (r["confidence"] < threshold)
    text = run_tool("predict", ["--model", model, str(tmp_path / "one.png"), "--min-confidence", "1"], tmp_path)
    assert "one.png: unknown (confidence under 100.0%; best guess " in text.stdout
    assert "1 answered unknown" in text.stderr
    csv_out = run_tool("predict", ["--model", model, str(tmp_path / "one.png"), "--csv", "--min-confidence", "0"], tmp_path)
    assert csv_out.stdout.splitlines()[0].endswith(",unknown,error") and ",false," in csv_out.stdout
    bad = run_tool("predict", ["--model", model, str(tmp_path / "one.png"), "--min-confidence", "1.5"], tmp_path)
    assert bad.returncode == 2 and "--min-confidence 1.5 must be a probability from 0 to 1" in bad.stderr


def test_a_model_file_without_calibration_keeps_the_raw_softmax():
    from cnn_finetune.tools.calibration import model_temperature, model_threshold

    assert model_temperature({}) == 1.0 and model_threshold({}) == 0.0
    assert model_temperature({"calibration": {"temperature": float("nan")}}) == 1.0
