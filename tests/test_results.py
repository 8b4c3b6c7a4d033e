"""Results a person can use: evaluation, prediction, export, training curves and the model card.

A model is trained once per session on the tiny real-MNIST set; the scripts then run for real in
subprocesses on it. Error paths that need no fresh process call the scripts' ``main`` in-process
(the same code the console scripts run), which keeps this file well under a minute and a half.
"""

from __future__ import annotations

import csv
import io
import json
import math
import string
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, bomb_png, run_cli

SCRIPTS = ROOT / "scripts"
# Batch 32 and a higher learning rate: after 3 epochs the model predicts several classes (about 60%
# validation accuracy), so "predictions agree" compares varied answers, not one constant class.
TRAIN_ARGS = ["--epochs", "3", "--width", "8", "--batch-size", "32", "--lr", "0.01", "--cooldown", "0",
              "--base-model", "none", "--set", "checkpoint_every_seconds=0", "--set", "aug_rotation=5"]


def run_script(name: str, args: list[str], cwd: Path) -> "subprocess.CompletedProcess[str]":  # noqa: F821
    """Run ``scripts/<name>.py`` for real in a subprocess."""
    return run_cli(args, cwd, script=SCRIPTS / f"{name}.py", timeout=180)


def assert_png(path: Path, min_bytes: int = 5_000, max_bytes: int = 5_000_000) -> tuple[int, int]:
    """``path`` is a complete, decodable PNG of a plausible size; returns (width, height)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert min_bytes <= len(data) <= max_bytes, f"{path}: {len(data)} bytes"
    assert 300 <= width <= 6000 and 300 <= height <= 6000, (width, height)
    with Image.open(path) as img:
        img.verify()  # checks the CRCs of every chunk: a truncated file fails here
    return width, height


# ------------------------------------------------------------------------------------------------
# Session fixtures: one trained model, one folder of PNG images


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_idx: Path) -> SimpleNamespace:
    """A model trained for real by the training CLI on the tiny set; its folder and loaded model."""
    from cnn_finetune.model.loading import load_model_file

    work = tmp_path_factory.mktemp("results")
    out = work / "run"
    proc = run_cli(["--data", str(tiny_idx), "--output-dir", str(out), *TRAIN_ARGS], work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, meta = load_model_file(out / "best_model_finetuned.pth")
    return SimpleNamespace(work=work, out=out, model_path=out / "best_model_finetuned.pth", model=model, meta=meta)


@pytest.fixture(scope="session")
def png_folder(tmp_path_factory: pytest.TempPathFactory, tiny_idx: Path) -> SimpleNamespace:
    """Class folders with 2 PNG images per class taken from the tiny set, plus a broken PNG in class 3."""
    from cnn_finetune.data.loader import load_dataset

    ds = load_dataset(tiny_idx, use_cache=False)
    root = tmp_path_factory.mktemp("pngs") / "labelled"
    originals = {}
    for c, name in enumerate(ds.class_names):
        folder = root / name
        folder.mkdir(parents=True)
        for k, i in enumerate(torch.nonzero(ds.labels == c).flatten()[:2].tolist()):
            path = folder / f"img{k}.png"
            Image.fromarray(ds.images[i, 0].numpy()).save(path)
            originals[path] = ds.images[i, 0].numpy()
    broken = root / "3" / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    return SimpleNamespace(root=root, broken=broken, originals=originals)


def class_tree(root: Path, tiny_idx: Path, names: list[str | bytes], per_class: int = 12) -> Path:
    """A plain class-folder tree with ``per_class`` real MNIST PNGs in each folder (names may be bytes)."""
    import os

    from cnn_finetune.data.loader import load_dataset

    ds = load_dataset(tiny_idx, use_cache=False)
    for c, name in enumerate(names):
        folder = os.path.join(os.fsencode(root), os.fsencode(name))
        os.makedirs(folder)
        for k, i in enumerate(torch.nonzero(ds.labels == c).flatten()[:per_class].tolist()):
            Image.fromarray(ds.images[i, 0].numpy()).save(os.fsdecode(os.path.join(folder, b"%d.png" % k)))
    return root


def loader_order(root: Path) -> list[Path]:
    """The order in which ``load_dataset`` reads a plain class-folder tree (good images only)."""
    return [p for d in sorted(p for p in root.iterdir() if p.is_dir()) for p in sorted(d.iterdir()) if p.name != "broken.png"]


# ------------------------------------------------------------------------------------------------
# Evaluation


def test_evaluate_script_on_idx_is_consistent(trained: SimpleNamespace, tiny_idx: Path) -> None:
    """Confusion matrix sums to N, accuracy = trace / N, per-class numbers follow from the matrix."""
    out = trained.work / "eval_idx"
    proc = run_script("evaluate", ["--model", str(trained.model_path), "--data", str(tiny_idx), "--output-dir", str(out)], trained.work)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "evaluation.json").read_text())
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (10, 10)
    assert report["num_samples"] == 400 == cm.sum()
    assert cm.sum(axis=1).tolist() == [40] * 10  # the tiny set has 40 images per class
    assert report["accuracy"] == pytest.approx(np.trace(cm) / 400, abs=1e-12)
    assert len(report["predictions"]) == 400
    for i, c in enumerate(report["per_class"]):
        assert c["support"] == cm[i].sum() and c["predicted"] == cm[:, i].sum()
        assert c["recall"] == pytest.approx(cm[i, i] / cm[i].sum())
        if cm[:, i].sum():
            assert c["precision"] == pytest.approx(cm[i, i] / cm[:, i].sum())
    counts = [p["count"] for p in report["most_confused"]]
    assert counts == sorted(counts, reverse=True)
    for p in report["most_confused"]:
        assert cm[int(p["true"]), int(p["predicted"])] == p["count"] and p["true"] != p["predicted"]
    assert f"accuracy:  {100 * report['accuracy']:.2f}%" in proc.stdout
    assert "most confused" in proc.stdout or "no confusions" in proc.stdout
    assert_png(out / "confusion_matrix.png", min_bytes=10_000)


def test_evaluate_arrays_reproduces_the_trainers_validation(trained: SimpleNamespace, tiny_idx: Path) -> None:
    """On the validation images that choose the epoch (the split less its calibration part), the library
    gives the accuracy and loss the trainer recorded."""
    from cnn_finetune.data.loader import calibration_mask, load_dataset, stratified_split
    from cnn_finetune.tools.evaluate import evaluate_arrays

    ds = load_dataset(tiny_idx, use_cache=False)
    cfg = trained.meta["config"]
    _, val = stratified_split(ds.labels, cfg["val_fraction"], cfg["seed"])
    val = val[~calibration_mask(ds.labels[val], cfg["calibration_fraction"], cfg["seed"])]
    report = evaluate_arrays(trained.model, trained.meta, ds.images[val], ds.labels[val], "cpu")
    assert report["num_samples"] == len(val) == 30
    assert report["accuracy"] == pytest.approx(trained.meta["metrics"]["val_acc"], abs=1e-12)
    assert report["loss"] == pytest.approx(trained.meta["metrics"]["val_loss"], rel=1e-5)
    assert report["model"]["epoch"] == trained.meta["epoch"]


def test_metrics_from_confusion_hand_computed() -> None:
    """Undefined precision/recall are None, macro averages use classes with samples, pairs sorted."""
    from cnn_finetune.tools.evaluate import metrics_from_confusion

    cm = torch.tensor([[3, 1, 0],   # a: 4 images
                       [2, 0, 0],   # b: 2 images, never predicted correctly, never predicted at all
                       [0, 0, 0]])  # c: no images
    r = metrics_from_confusion(cm, ["a", "b", "c"])
    a, b, c = r["per_class"]
    assert r["num_samples"] == 6 and r["accuracy"] == pytest.approx(3 / 6)
    assert a["precision"] == pytest.approx(3 / 5) and a["recall"] == pytest.approx(3 / 4)
    assert a["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert b["precision"] == 0.0 and b["recall"] == 0.0 and b["f1"] == 0.0
    assert c["precision"] is None and c["recall"] is None and c["f1"] is None
    assert r["macro_recall"] == pytest.approx((0.75 + 0.0) / 2)
    assert [(p["true"], p["predicted"], p["count"]) for p in r["most_confused"]] == [("b", "a", 2), ("a", "b", 1)]
    assert r["most_confused"][0]["share_of_true"] == pytest.approx(1.0)


def test_evaluate_rejects_classes_the_model_does_not_know(trained: SimpleNamespace, png_folder: SimpleNamespace,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cnn_finetune.tools.evaluate import main

    data = tmp_path / "data"
    for name in ("0", "x_extra"):
        (data / name).mkdir(parents=True)
        Image.fromarray(next(iter(png_folder.originals.values()))).save(data / name / "a.png")
    code = main(["--model", str(trained.model_path), "--data", str(data), "--output-dir", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2
    assert "x_extra" in err and "does not know" in err
    assert not (tmp_path / "ev").exists()


def test_class_names_that_look_like_math_markup_reach_the_reports_as_text(tiny_idx: Path, tmp_path: Path) -> None:
    """matplotlib reads ``$^$`` as math markup: the names must be drawn, written and matched as plain text."""
    names = ["$^$", "a_b", "back\\slash"]
    data = class_tree(tmp_path / "data", tiny_idx, names)
    proc = run_cli(["--data", str(data), "--output-dir", "run", *TRAIN_ARGS, "--epochs", "1", "--batch-size", "16"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final reports could not be written" not in proc.stderr
    out = tmp_path / "run"
    assert_png(out / "confusion_matrix.png", min_bytes=5_000)
    assert json.loads((out / "evaluation.json").read_text())["class_names"] == sorted(names)
    card = (out / "model_card.md").read_text()
    assert all(name in card for name in names)
    ev = run_script("evaluate", ["--model", str(out / "best_model_finetuned.pth"), "--data", str(data),
                                 "--output-dir", str(tmp_path / "ev")], tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["num_samples"] == 36
    assert_png(tmp_path / "ev" / "confusion_matrix.png", min_bytes=5_000)
    assert all(name in ev.stdout for name in names)


def test_names_that_are_not_utf8_never_stop_training_evaluation_or_prediction(tiny_idx: Path, tmp_path: Path) -> None:
    """A class folder and files whose names are not valid UTF-8: kept exactly (the class survives the
    checkpoint and a resume, with a stable data fingerprint), shown escaped in every report."""
    import os

    from cnn_finetune.files.checkpoint import load_checkpoint

    data = class_tree(tmp_path / "data", tiny_idx, ["0", "1", b"cl\xffass"])
    good = os.path.join(os.fsencode(data), b"0", b"caf\xe9.png")  # a Latin-1 name, a valid image
    os.rename(os.path.join(os.fsencode(data), b"0", b"0.png"), good)
    with open(os.path.join(os.fsencode(data), b"1", b"bad\xfe.png"), "wb") as fh:
        fh.write(b"not an image")
    args = ["--data", str(data), "--output-dir", "run", *TRAIN_ARGS, "--epochs", "2", "--batch-size", "16"]
    # A subprocess in a UTF-8 locale, where printing such a name unescaped raises UnicodeEncodeError.
    first = run_cli(args, tmp_path, faults="sigint@2", LC_ALL="C.UTF-8")
    assert first.returncode == 130, first.stderr[-2000:]
    assert "bad\\xfe.png: not an image" in first.stderr
    second = run_cli(args, tmp_path, LC_ALL="C.UTF-8")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from" in second.stdout and "Traceback" not in second.stderr
    out = tmp_path / "run"
    state = load_checkpoint(out / "best_model_finetuned.pth")
    assert state["class_names"] == ["0", "1", "cl\udcffass"]  # the folder's own name: os.fsencode gives its bytes back
    report = json.loads((out / "data_report.json").read_bytes().decode("utf-8"))
    assert report["train_source"]["class_names"] == ["0", "1", "cl\\xffass"]
    assert [s["path"] for s in report["train_source"]["skipped"]] == [str(data / "1" / "bad\\xfe.png")]
    assert json.loads((out / "config_finetuned.json").read_text())["class_names"] == ["0", "1", "cl\\xffass"]
    assert "cl\\xffass" in (out / "model_card.md").read_text(encoding="utf-8")
    assert json.loads((out / "evaluation.json").read_text())["class_names"] == ["0", "1", "cl\\xffass"]
    assert_png(out / "confusion_matrix.png", min_bytes=5_000)

    model = str(out / "best_model_finetuned.pth")
    ev = run_cli(["--model", model, "--data", str(data), "--output-dir", "ev"], tmp_path, script=SCRIPTS / "evaluate.py",
                 LC_ALL="C.UTF-8")
    assert ev.returncode == 0, ev.stderr
    evaluation = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert evaluation["num_samples"] == 36 and "cl\\xffass" in ev.stdout
    pr = run_cli(["--model", model, str(data), "--json"], tmp_path, script=SCRIPTS / "predict.py", LC_ALL="C.UTF-8")
    assert pr.returncode == 0, pr.stderr
    records = {r["file"]: r for r in json.loads(pr.stdout)}
    assert records[str(data / "1" / "bad\\xfe.png")]["error"] and not records[str(data / "0" / "caf\\xe9.png")]["error"]


# ------------------------------------------------------------------------------------------------
# Prediction


def test_predict_agrees_with_evaluate_on_the_same_images(trained: SimpleNamespace, png_folder: SimpleNamespace) -> None:
    """predict.py on PNG files gives, image by image, the class evaluate.py predicted for them."""
    out = trained.work / "eval_png"
    ev = run_script("evaluate", ["--model", str(trained.model_path), "--data", str(png_folder.root), "--output-dir", str(out)], trained.work)
    assert ev.returncode == 0, ev.stderr
    report = json.loads((out / "evaluation.json").read_text())
    assert report["num_samples"] == 20
    assert [s["path"] for s in report["data"]["skipped"]] == [str(png_folder.broken)]  # reported, not fatal
    evaluated = {str(p): report["class_names"][i] for p, i in zip(loader_order(png_folder.root), report["predictions"], strict=True)}

    pr = run_script("predict", ["--model", str(trained.model_path), str(png_folder.root), "--json", "--top-k", "3"], trained.work)
    assert pr.returncode == 0, pr.stderr
    records = json.loads(pr.stdout)
    assert len(records) == 21
    errors = [r for r in records if r["error"]]
    assert [r["file"] for r in errors] == [str(png_folder.broken)] and errors[0]["predictions"] == []
    predicted = {r["file"]: r["predictions"][0]["class"] for r in records if not r["error"]}
    assert predicted == evaluated
    assert len(set(predicted.values())) >= 2, "the test model should not predict one constant class"
    for r in records:
        probs = [p["probability"] for p in r["predictions"]]
        assert probs == sorted(probs, reverse=True) and (not probs or 0 < sum(probs) <= 1 + 1e-6)
        assert len(probs) in (0, 3)
    assert "predicted 20 image(s), 1 could not be read" in pr.stderr


def test_predict_reports_unreadable_files_on_their_own_line(trained: SimpleNamespace, png_folder: SimpleNamespace,
                                                            tmp_path: Path) -> None:
    """Text output: one line per input in order; bad and missing files named with the reason."""
    good = png_folder.root / "7" / "img0.png"
    big = tmp_path / "big_colour.jpg"  # not 28x28, dark strokes on white, RGB: the full MNIST layout path
    Image.fromarray(255 - png_folder.originals[good]).resize((140, 100)).convert("RGB").save(big, quality=95)
    missing = tmp_path / "missing.png"
    proc = run_script("predict", ["--model", str(trained.model_path), str(good), str(png_folder.broken), str(missing),
                                  str(big), "--top-k", "2"], trained.work)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(f"{good}: ") and lines[0].count("%)") == 2
    assert lines[1].startswith(f"{png_folder.broken}: error: ") and "not an image" in lines[1]
    assert lines[2] == f"{missing}: error: file not found"
    assert lines[3].startswith(f"{big}: ") and lines[3].count("%)") == 2


def test_predict_csv_has_an_error_column(trained: SimpleNamespace, png_folder: SimpleNamespace,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cnn_finetune.tools.predict import main

    files = [png_folder.root / "1" / "img0.png", png_folder.broken]
    assert main(["--model", str(trained.model_path), *map(str, files), "--csv", "--top-k", "2"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["file"] for r in rows] == [str(f) for f in files]
    assert rows[0]["error"] == "" and rows[0]["class_1"] in trained.meta["class_names"]
    assert float(rows[0]["probability_1"]) >= float(rows[0]["probability_2"]) > 0
    assert "not an image" in rows[1]["error"] and rows[1]["class_1"] == ""


def test_predict_and_evaluate_refuse_a_decompression_bomb_per_file(trained: SimpleNamespace, png_folder: SimpleNamespace,
                                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cnn_finetune.tools.evaluate import main as evaluate
    from cnn_finetune.tools.predict import main as predict

    bomb = bomb_png(tmp_path / "data" / "7" / "bomb.png")
    good = png_folder.root / "7" / "img0.png"
    (tmp_path / "data" / "7" / "img0.png").write_bytes(good.read_bytes())
    reason = "image too large: 13000 x 13000 = 169,000,000 pixels, over the limit of 64,000,000 (max_image_pixels); not decoded"
    assert predict(["--model", str(trained.model_path), str(bomb), str(good)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"{bomb}: error: {reason}" and lines[1].startswith(f"{good}: ")
    (tmp_path / "data" / "1").mkdir()
    (tmp_path / "data" / "1" / "img0.png").write_bytes((png_folder.root / "1" / "img0.png").read_bytes())
    assert evaluate(["--model", str(trained.model_path), "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert report["num_samples"] == 2 and report["data"]["skipped"] == [{"path": str(bomb), "reason": reason}]


def test_predict_exits_2_when_nothing_could_be_predicted(trained: SimpleNamespace, png_folder: SimpleNamespace,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cnn_finetune.tools.predict import main

    assert main(["--model", str(trained.model_path), str(png_folder.broken)]) == 2
    captured = capsys.readouterr()
    assert f"{png_folder.broken}: error:" in captured.out
    assert "no image could be predicted" in captured.err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert main(["--model", str(trained.model_path), str(tmp_path / "empty")]) == 2
    assert f"no image files in {tmp_path / 'empty'}" in capsys.readouterr().err


def test_evaluate_missing_data_exits_2(trained: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cnn_finetune.tools.evaluate import main

    missing = tmp_path / "no_such_data"
    assert main(["--model", str(trained.model_path), "--data", str(missing), "--output-dir", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# Bad model files


@pytest.fixture()
def bad_models(trained: SimpleNamespace, tmp_path: Path) -> dict[str, Path]:
    truncated = tmp_path / "truncated.pth"
    data = trained.model_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a model" * 100)
    return {"missing": tmp_path / "no_such_model.pth", "truncated": truncated, "garbage": garbage}


def test_corrupt_model_file_exits_2_naming_it_subprocess(trained: SimpleNamespace, bad_models: dict[str, Path], tiny_idx: Path) -> None:
    proc = run_script("evaluate", ["--model", str(bad_models["truncated"]), "--data", str(tiny_idx)], trained.work)
    assert proc.returncode == 2
    assert str(bad_models["truncated"]) in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("tool", ["evaluate", "predict", "export"])
@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage"])
def test_bad_model_file_exits_2_naming_it(tool: str, kind: str, bad_models: dict[str, Path], png_folder: SimpleNamespace,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    main = importlib.import_module(f"cnn_finetune.tools.{tool}").main
    model = str(bad_models[kind])
    args = {
        "evaluate": ["--model", model, "--data", str(png_folder.root), "--output-dir", str(tmp_path / "o")],
        "predict": ["--model", model, str(png_folder.root)],
        "export": ["--model", model, "--output-dir", str(tmp_path / "o")],
    }[tool]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert model in err and err.startswith("error: ")
    assert not (tmp_path / "o").exists()  # nothing written for bad input


# ------------------------------------------------------------------------------------------------
# Export


def test_export_agrees_with_pytorch(trained: SimpleNamespace, tiny_idx: Path) -> None:
    """The script's reported differences are small, and the files agree when loaded here."""
    from cnn_finetune.data.loader import load_dataset
    from cnn_finetune.tools.export import load_torchscript
    from cnn_finetune.tools.inference import normalise_images

    out = trained.work / "export"
    proc = run_script("export", ["--model", str(trained.model_path), "--output-dir", str(out)], trained.work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    side = json.loads((out / "best_model_finetuned.preprocessing.json").read_text())
    checks = side["checks"]
    assert checks["passed"] is True
    assert 0 <= checks["torchscript_max_abs_diff"] <= 1e-4
    assert 0 <= checks["onnx_max_abs_diff"] <= 1e-4, checks
    assert "onnxruntime" in checks["onnx_checked_with"]
    assert f"{checks['onnx_max_abs_diff']:.3g}" in proc.stdout and "NOT exported" not in proc.stdout
    assert side["class_names"] == trained.meta["class_names"]
    assert side["normalization"] == {k: pytest.approx(v) for k, v in trained.meta["normalization"].items()}
    assert side["input"]["shape"] == ["batch", 1, 28, 28] and side["polarity"] == trained.meta["config"]["polarity"]
    # A consumer of the ONNX/TorchScript file gets the run's temperature and "unknown" threshold too.
    cal = trained.meta["calibration"]
    assert side["calibration"]["temperature"] == pytest.approx(cal["temperature"])
    assert side["calibration"]["unknown_threshold"] == pytest.approx(cal["unknown_threshold"])
    assert ".safetensors" in side["calibration"]["feature_distance"]

    ds = load_dataset(tiny_idx, use_cache=False)
    for n in (1, 37):  # any batch size, not only the one used for tracing
        x = normalise_images(ds.images[:n], trained.meta)
        with torch.no_grad():
            expected = trained.model(x)
            scripted = load_torchscript(out / side["files"]["torchscript"])(x)
        assert (scripted - expected).abs().max() <= 1e-4
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(out / side["files"]["onnx"]), providers=["CPUExecutionProvider"])
        onnx_out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert (onnx_out - expected).abs().max() <= 1e-4
        assert torch.equal(onnx_out.argmax(1), expected.argmax(1))


def test_export_without_onnx_says_so(trained: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Where ONNX cannot be exported the output says so; TorchScript is still written and checked."""
    import importlib.util

    import cnn_finetune.tools.export as export

    real = importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    (tmp_path / "best_model_finetuned.onnx").write_bytes(b"stale")  # from an earlier export: must go
    assert export.main(["--model", str(trained.model_path), "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ONNX:        NOT exported, TorchScript only: the onnx package is not installed" in out
    side = json.loads((tmp_path / "best_model_finetuned.preprocessing.json").read_text())
    assert side["files"]["onnx"] is None and "onnx_max_abs_diff" not in side["checks"]
    assert not (tmp_path / "best_model_finetuned.onnx").exists()
    assert (tmp_path / "best_model_finetuned.torchscript.pt").exists()


def test_export_fails_when_an_export_disagrees(trained: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnx")
    import cnn_finetune.tools.export as export

    real = export.run_onnx
    monkeypatch.setattr(export, "run_onnx", lambda path, x: (real(path, x)[0] + 1e-3, "a broken runtime"))
    assert export.main(["--model", str(trained.model_path), "--output-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "disagrees" in captured.err
    assert json.loads((tmp_path / "best_model_finetuned.preprocessing.json").read_text())["checks"]["passed"] is False


@pytest.mark.parametrize("room_for", ["torchscript", "all but onnx"])
def test_an_export_that_cannot_be_written_fails_with_exit_1(trained: SimpleNamespace, tmp_path: Path, room_for: str) -> None:
    """A real small tmpfs filled so that TorchScript (or everything but ONNX: TorchScript, safetensors and
    the JSON) still fits."""
    import os

    from conftest import small_tmpfs

    pytest.importorskip("onnx")
    probe = tmp_path / "probe"
    assert run_script("export", ["--model", str(trained.model_path), "--output-dir", str(probe)], trained.work).returncode == 0
    pages = {p.name.split(".", 1)[1]: -(-p.stat().st_size // 4096) for p in probe.iterdir()}  # 4 KiB pages each file takes
    assert pages["onnx"] > 4, pages
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "export"
        out.mkdir()
        others = pages["safetensors"] + pages["preprocessing.json"] + 2
        room = pages["torchscript.pt"] + (others if room_for == "all but onnx" else -2)
        st = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - room * 4096))
        proc = run_script("export", ["--model", str(trained.model_path), "--output-dir", str(out)], trained.work)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and ".tmp-" not in "".join(os.listdir(out))
        if room_for == "torchscript":
            assert f"error: export failed: cannot write to {out}: No space left on device" in proc.stderr
            assert os.listdir(out) == []
        else:
            assert "ONNX:        FAILED, not exported: OSError: No space left on device" in proc.stdout
            assert "error: the ONNX export failed (OSError: No space left on device); no ONNX file was left" in proc.stderr
            assert sorted(os.listdir(out)) == ["best_model_finetuned.preprocessing.json", "best_model_finetuned.safetensors",
                                               "best_model_finetuned.torchscript.pt"]
            checks = json.loads((out / "best_model_finetuned.preprocessing.json").read_text())["checks"]
            assert checks["passed"] is False and checks["onnx_failed"] == "OSError: No space left on device"


# ------------------------------------------------------------------------------------------------
# Model files without pickle: <stem>.safetensors


@pytest.fixture(scope="session")
def exported(trained: SimpleNamespace) -> Path:
    """The safetensors file export.py writes for the trained model."""
    from cnn_finetune.tools.export import main

    out = trained.work / "export_st"
    assert main(["--model", str(trained.model_path), "--output-dir", str(out), "--no-onnx"]) == 0
    return out / "best_model_finetuned.safetensors"


def test_safetensors_model_predicts_exactly_as_its_pth(trained: SimpleNamespace, exported: Path, tiny_idx: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open

    from cnn_finetune.data.loader import load_dataset
    from cnn_finetune.tools.evaluate import main as evaluate_main
    from cnn_finetune.tools.inference import load_inference_model, predict_logits

    with safe_open(str(exported), framework="pt") as f:  # a standard safetensors file, readable by any tool
        header = f.metadata()
        assert set(f.keys()) == set(trained.model.state_dict())
    assert json.loads(header["class_names"]) == trained.meta["class_names"]
    assert json.loads(header["normalization"]) == trained.meta["normalization"]
    assert json.loads(header["arch"]) == "cnn_v2" and json.loads(header["arch_params"]) == trained.meta["arch_params"]

    images = load_dataset(tiny_idx, use_cache=False).images
    pth_model, pth_meta = load_inference_model(trained.model_path)
    st_model, st_meta = load_inference_model(exported)
    assert torch.equal(predict_logits(st_model, st_meta, images), predict_logits(pth_model, pth_meta, images))
    assert {k: v for k, v in st_meta.items() if k != "path"} == {k: v for k, v in pth_meta.items() if k != "path"}

    reports = []
    for model in (trained.model_path, exported):
        out = trained.work / f"eval_{model.suffix[1:]}"
        assert evaluate_main(["--model", str(model), "--data", str(tiny_idx), "--output-dir", str(out)]) == 0
        reports.append(json.loads((out / "evaluation.json").read_text()))
    assert reports[0]["predictions"] == reports[1]["predictions"] and reports[0]["loss"] == reports[1]["loss"]
    capsys.readouterr()


def test_safetensors_base_model_fine_tunes_exactly_as_its_pth(trained: SimpleNamespace, exported: Path, tiny_idx: Path,
                                                             tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from conftest import FAST, assert_same_weights

    plain = tmp_path / "plain_state_dict.safetensors"  # weights only, written by another program
    save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, str(plain))
    outs = {}
    for base in (trained.model_path, exported, plain):
        out = tmp_path / f"from_{base.stem}_{base.suffix[1:]}"
        proc = run_cli([*FAST, "--epochs", "1", "--width", "8", "--data", str(tiny_idx), "--base-model", str(base),
                        "--output-dir", str(out)], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"fine-tuning from {base}: all layers loaded" in proc.stdout
        outs[base] = out
    assert_same_weights(outs[trained.model_path] / "checkpoint_last.pth", outs[exported] / "checkpoint_last.pth")
    assert_same_weights(outs[trained.model_path] / "checkpoint_last.pth", outs[plain] / "checkpoint_last.pth")


@pytest.mark.parametrize("damage", ["truncated", "flipped_weight", "garbage", "foreign"])
def test_damaged_or_foreign_safetensors_exits_2_naming_it(exported: Path, png_folder: SimpleNamespace, tiny_idx: Path,
                                                          tmp_path: Path, damage: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    from cnn_finetune.tools.evaluate import main as evaluate_main
    from cnn_finetune.tools.export import main as export_main
    from cnn_finetune.tools.predict import main as predict_main

    bad = tmp_path / f"{damage}.safetensors"
    data = exported.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flipped_weight":
        bad.write_bytes(data[:-10] + bytes([data[-10] ^ 0x40]) + data[-9:])  # a bit of the last tensor
    elif damage == "garbage":
        bad.write_bytes(b"\x00not a model" * 100)
    else:  # a valid safetensors file of another program, e.g. a language model's weights
        save_file({"embed.weight": torch.zeros(4, 3)}, str(bad), metadata={"format": "pt"})
    reason = {"truncated": "cannot be loaded as safetensors", "flipped_weight": "fails its checksum",
              "garbage": "cannot be loaded as safetensors", "foreign": "not a model written by this program"}[damage]
    for main, args in ((evaluate_main, ["--data", str(tiny_idx), "--output-dir", str(tmp_path / "o")]),
                       (predict_main, [str(png_folder.root)]), (export_main, ["--output-dir", str(tmp_path / "o")])):
        assert main(["--model", str(bad), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(bad) in err and reason in err, err
    assert not (tmp_path / "o").exists()
    proc = run_cli(["--data", str(tiny_idx), "--base-model", str(bad), "--output-dir", "run", "--epochs", "1"], tmp_path)
    assert proc.returncode == 2 and str(bad) in proc.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# Pictures


def synthetic_history(epochs: int = 30) -> list[dict]:
    records = []
    for e in range(1, epochs + 1):
        events = {5: [{"type": "resumed"}], 9: [{"type": "retry"}, {"type": "retry"}], 12: [{"type": "oom"}],
                  17: [{"type": "nan_rollback"}]}.get(e, [])
        records.append({"epoch": e, "train_loss": math.exp(-e / 8), "val_loss": 0.9 * math.exp(-e / 9) + 0.1,
                        "train_acc": 1 - 0.5 * math.exp(-e / 5), "val_acc": 0.98 - 0.4 * math.exp(-e / 6) + 0.001 * (e == 21),
                        "nan_skipped": 2 if e == 16 else 0, "best": False, "events": events})
    records[3]["val_loss"] = None  # NaN is stored as null in history.json
    return records


@pytest.mark.parametrize("history, monitor, expected", [
    ([{"epoch": 1, "val_acc": 0.5, "best": True}, {"epoch": 2, "val_acc": 0.7, "best": True},
      {"epoch": 3, "val_acc": 0.9, "best": False}], "val_acc", 2),  # the trainer's flag wins
    ([{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.7}, {"epoch": 3, "val_acc": 0.7}], "val_acc", 2),
    ([{"epoch": 1, "val_loss": None}, {"epoch": 2, "val_loss": 0.4}, {"epoch": 3, "val_loss": 0.6}], "val_loss", 2),
    ([{"epoch": 1, "val_acc": None}], "val_acc", None),
])
def test_best_record(history: list[dict], monitor: str, expected: int | None) -> None:
    from cnn_finetune.tools.plots import best_record

    best = best_record(history, monitor)
    assert (best["epoch"] if best else None) == expected


def test_training_curves_png(trained: SimpleNamespace, tmp_path: Path) -> None:
    """The real history and a 30-epoch history with events both give a valid picture, quickly."""
    from cnn_finetune.tools.plots import plot_training_curves

    real = json.loads((trained.out / "history.json").read_text())
    plot_training_curves(real, tmp_path / "real.png")
    assert_png(tmp_path / "real.png", min_bytes=20_000)
    history = synthetic_history(30)
    t0 = time.perf_counter()
    plot_training_curves(history, tmp_path / "curves.png", monitor="val_acc")
    seconds = time.perf_counter() - t0
    width, height = assert_png(tmp_path / "curves.png", min_bytes=30_000)
    assert width > height
    assert seconds < 3.0, f"plotting 30 epochs took {seconds:.2f} s; it runs after every epoch"
    assert not list(tmp_path.glob("*.tmp-*"))
    plot_training_curves([], tmp_path / "none.png")  # nothing to draw yet: nothing written
    assert not (tmp_path / "none.png").exists()


def test_confusion_matrix_scales_with_classes(tmp_path: Path) -> None:
    from cnn_finetune.tools.evaluate import metrics_from_confusion, write_reports
    from cnn_finetune.tools.plots import confusion_figure_geometry

    sizes = {}
    for names in (list(string.digits), list(string.digits + string.ascii_uppercase + string.ascii_lowercase)):
        n = len(names)
        cm = torch.diag(torch.full((n,), 20)) + (torch.arange(n * n).reshape(n, n) % 7 == 0).long()
        cm[-1] = 0  # a class without images: a grey row, not a crash
        report = metrics_from_confusion(cm, names)
        paths = write_reports(report, tmp_path / str(n), prefix="test_")
        assert [p.name for p in paths] == ["test_evaluation.json", "test_confusion_matrix.png"]
        sizes[n] = assert_png(paths[1], min_bytes=10_000)
        assert json.loads(paths[0].read_text())["confusion_matrix"] == cm.tolist()
    assert sizes[62][0] > 1.5 * sizes[10][0]  # more classes: a larger picture, not smaller cells only
    assert confusion_figure_geometry(10)["annotate"] and not confusion_figure_geometry(62)["annotate"]
    assert confusion_figure_geometry(62)["tick_pt"] >= 7


# ------------------------------------------------------------------------------------------------
# Model card


def test_model_card(trained: SimpleNamespace, tiny_idx: Path, tmp_path: Path) -> None:
    from cnn_finetune.data.loader import load_dataset, stratified_split
    from cnn_finetune.tools.evaluate import evaluate_arrays
    from cnn_finetune.tools.model_card import write_model_card
    from cnn_finetune.tools.plots import best_record

    out = trained.out
    config = json.loads((out / "config_finetuned.json").read_text())
    data_report = json.loads((out / "data_report.json").read_text())
    data_report["train_source"]["skipped"] = [{"path": "data/raw/7/bad.png", "reason": "truncated or corrupt image: x"}]
    history = json.loads((out / "history.json").read_text())
    ds = load_dataset(tiny_idx, use_cache=False)
    _, val = stratified_split(ds.labels, 0.1, 42)
    evaluation = evaluate_arrays(trained.model, trained.meta, ds.images[val], ds.labels[val], "cpu")
    test_eval = evaluate_arrays(trained.model, trained.meta, ds.images, ds.labels, "cpu")

    card = write_model_card(tmp_path, config=config, data_report=data_report, history=history,
                            evaluation=evaluation, test_evaluation=test_eval).read_text()
    best = best_record(history)
    assert best["epoch"] == trained.meta["epoch"]
    assert f"**Best epoch:** {best['epoch']} (val_acc): validation accuracy {100 * best['val_acc']:.2f}%" in card
    assert f"- **Accuracy:** {100 * evaluation['accuracy']:.2f}%" in card
    assert f"Test accuracy {100 * test_eval['accuracy']:.2f}% on 400 images" in card
    assert "## Test" in card and "data/raw/7/bad.png" in card and "truncated or corrupt" in card
    assert "| 3 | 40 | 36 | 4 |" in card  # per class: in the source, training, validation
    assert "| lr | 0.01 |" in card and "load_model_file" in card and "scripts/predict.py" in card

    # Config as a plain TrainConfig dict, no evaluation: still a card, without those sections.
    minimal = write_model_card(tmp_path / "m", config=config["config"], data_report=data_report, history=history,
                               evaluation=None).read_text()
    assert "## Validation" not in minimal and "## Test" not in minimal and f"Best epoch {best['epoch']}" in minimal


def test_curve_refresher_redraws_every_epoch_unless_epochs_are_too_short(tmp_path: Path):
    from cnn_finetune.tools.plots import CurveRefresher

    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_acc": 0.5, "val_acc": 0.5 + e / 100,
                "best": True, "events": [], "nan_skipped": 0} for e in range(1, 4)]
    refresh = CurveRefresher(tmp_path / "curves.png", share=0.02)
    assert refresh(history[:1]) and (tmp_path / "curves.png").stat().st_size > 0
    # right after a redraw (a "short epoch"), the next one is skipped: it would exceed 2% of the time
    assert not refresh(history[:2])
    # after an "epoch" 60x longer than a redraw, it redraws
    refresh._done_at -= refresh._cost / 0.02 + 0.01
    assert refresh(history)
    assert refresh._cost is not None and refresh._cost > 0
