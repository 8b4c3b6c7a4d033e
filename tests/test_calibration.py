"""Calibrated confidence: the temperature fit, the expected calibration error, the "unknown" rule, and
how the tools use the temperature stored in the model file (predict.py, evaluate.py, export, the API)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, cli_env, finished_run, load_state


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
    # 40 validation images (4 per class): 3 per class pick the epoch, 1 per class is kept for the temperature.
    assert cal["fitted_on"] == "validation images kept apart from the choice of the epoch" and cal["num_images"] == 10
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


def test_the_temperature_is_fitted_on_validation_images_that_did_not_pick_the_epoch(reference_run: Path, tiny_idx: Path):
    # A split that also chose the best epoch flatters the model (right more often than on new images),
    # and a temperature fitted there makes it overconfident: it is fitted on the held-out part only.
    from cnn_finetune import TrainConfig, load_model_file
    from cnn_finetune.data.loader import calibration_mask
    from cnn_finetune.pipeline import prepare_data
    from cnn_finetune.tools.calibration import fit_temperature
    from cnn_finetune.tools.inference import predict_logits

    split = prepare_data(TrainConfig(data=str(tiny_idx), cache=False)).split
    held = calibration_mask(split.val_labels, 0.3, 42)
    assert held.sum() == 10 and torch.bincount(split.val_labels[held], minlength=10).tolist() == [1] * 10
    assert torch.equal(held, calibration_mask(split.val_labels, 0.3, 42))  # seeded: the same on every run
    model, meta = load_model_file(reference_run / "best_model_finetuned.pth")
    logits = predict_logits(model, meta, split.val_images)
    cal = load_state(reference_run / "best_model_finetuned.pth")["calibration"]
    on_held, on_all = fit_temperature(logits[held], split.val_labels[held]), fit_temperature(logits, split.val_labels)
    assert on_held != pytest.approx(on_all, rel=1e-3) and cal["temperature_whole_split"] == pytest.approx(on_all, rel=1e-6)
    # never sharper than the whole split's fit: the split that chose the epoch only ever flatters the model
    assert cal["temperature"] == pytest.approx(max(on_held, on_all), rel=1e-6)
    # The epoch was chosen on the other 30: every validation accuracy of the run is a multiple of 1/30.
    for row in json.loads((reference_run / "history.json").read_text()):
        assert row["val_acc"] * 30 == pytest.approx(round(row["val_acc"] * 30), abs=1e-6)
    report = json.loads((reference_run / "data_report.json").read_text())
    assert report["split"]["val"] == 40 and report["split"]["calibration"] == 10


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
        # The confidence check alone (--max-distance 0); the default also has the distance check (below).
        extra = ["--min-confidence", setting, "--max-distance", "0"] if setting else []
        proc = run_tool("predict", args + extra, tmp_path)
        assert proc.returncode == 0, proc.stderr
        rows[setting] = json.loads(proc.stdout)
    assert [r["unknown"] for r in rows["0"]] == [False, False]  # 0: never unknown
    assert [r["unknown"] for r in rows["1"]] == [True, True]  # 1: always (no confidence is above 1)
    meta = load_state(reference_run / "best_model_finetuned.pth")
    threshold, limit = model_threshold(meta), meta["calibration"]["feature_distance"]["threshold"]
    for r in rows[None]:
        assert r["confidence"] == r["predictions"][0]["probability"]
        assert r["unknown"] == (r["confidence"] < threshold or r["distance"] > limit)
    text = run_tool("predict", ["--model", model, str(tmp_path / "one.png"), "--min-confidence", "1", "--max-distance", "0"],
                    tmp_path)
    assert "one.png: unknown (confidence under 100.0%; best guess " in text.stdout
    assert "1 answered unknown" in text.stderr
    csv_out = run_tool("predict", ["--model", model, str(tmp_path / "one.png"), "--csv", "--min-confidence", "0"], tmp_path)
    header, row = csv_out.stdout.splitlines()[:2]
    assert header.endswith(",unknown,distance,error") and ",false," in row
    json_row = json.loads(run_tool("predict", ["--model", model, str(tmp_path / "one.png"), "--json"], tmp_path).stdout)[0]
    assert float(row.split(",")[-2]) == pytest.approx(json_row["distance"], rel=1e-4)  # the same distance as --json
    bad = run_tool("predict", ["--model", model, str(tmp_path / "one.png"), "--min-confidence", "1.5"], tmp_path)
    assert bad.returncode == 2 and "--min-confidence 1.5 must be a probability from 0 to 1" in bad.stderr


def test_a_model_file_without_calibration_keeps_the_raw_softmax():
    from cnn_finetune.tools.calibration import model_temperature, model_threshold

    assert model_temperature({}) == 1.0 and model_threshold({}) == 0.0
    assert model_temperature({"calibration": {"temperature": float("nan")}}) == 1.0


def test_a_damaged_distance_field_means_no_distance_check():
    from cnn_finetune.tools.calibration import fit_feature_distance, model_distance

    fitted = {**fit_feature_distance(torch.eye(4).repeat(3, 1) + 0.1 * torch.arange(12.0)[:, None], torch.arange(12) % 2),
              "threshold": 5.0}
    assert model_distance({"calibration": {"feature_distance": fitted}}) is fitted
    assert model_distance({"calibration": {"feature_distance": fitted}}, feature_size=96) is None  # another width
    for broken in ({**fitted, "threshold": float("inf")}, {**fitted, "precision": [[1.0, 2.0]]},
                   {**fitted, "means": []}, {k: v for k, v in fitted.items() if k != "means"}, "text"):
        assert model_distance({"calibration": {"feature_distance": broken}}) is None


# --- the second signal: the distance in feature space ----------------------------------------------------


def pixel_csv(path: Path, images: torch.Tensor) -> Path:
    """A CSV of pixels (header ``pixel0..pixel783``), one row per uint8 28x28 image: predict.py uses it as it is."""
    lines = [",".join(f"pixel{i}" for i in range(784))] + [",".join(map(str, im.flatten().tolist())) for im in images]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_distance_fit_by_hand():
    from cnn_finetune.tools.calibration import distance_threshold, feature_distance, fit_feature_distance

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 3
    feats = torch.randn(600, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.0]) + 10 * torch.nn.functional.one_hot(labels, 4)
    fitted = fit_feature_distance(feats, labels, shrinkage=0.0)
    assert fitted["classes"] == [0, 1, 2] and torch.tensor(fitted["means"]).shape == (3, 4)
    means = torch.tensor(fitted["means"], dtype=torch.float64)
    precision = torch.tensor(fitted["precision"], dtype=torch.float64)
    # The nearest mean, by the textbook formula, for a point of each class and one far from all.
    points = torch.cat([feats[:3], torch.full((1, 4), 40.0)]).double()
    by_hand = torch.stack([torch.stack([(p - m) @ precision @ (p - m) for m in means]).min() for p in points])
    assert torch.allclose(feature_distance(points, fitted), by_hand, rtol=1e-6)
    # The covariance it inverts is the pooled within-class one (plus the ridge): its diagonal is the variances.
    assert torch.allclose(torch.diag(torch.linalg.inv(precision)), torch.tensor([1.0, 4.0, 0.25, 1.0], dtype=torch.float64), rtol=0.15)
    d = feature_distance(feats, fitted)
    right = torch.ones(600, dtype=torch.bool)
    right[::7] = False  # wrong answers do not count
    t = distance_threshold(d, right)
    assert (d[right] <= t).double().mean() == pytest.approx(0.99, abs=0.003)
    assert distance_threshold(d, torch.zeros(600, dtype=torch.bool)) is None
    # Shrinkage keeps the precision finite when a feature never varies (a dead ReLU) and classes hold one image.
    few = fit_feature_distance(torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 1.0]]), torch.tensor([0, 1]))
    assert torch.isfinite(torch.tensor(few["precision"])).all()


@pytest.fixture(scope="module")
def trained_run(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FAST settings trained for 15 epochs (about 85% validation accuracy, some seconds): a model that,
    like a real one, is confident on uniform noise (the 3-epoch reference run is confident on nothing)."""
    return finished_run([*FAST, "--epochs", "15", "--data", str(tiny_idx)], tmp_path_factory, "trained15")


@pytest.fixture(scope="module")
def noise_and_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A CSV of 30 uniform-noise images followed by 100 built-in sample digits the tiny runs never train on
    (tiny_idx takes the first 40 of each class; these are the 41st to 50th)."""
    from cnn_finetune.data.loader import load_dataset

    ds = load_dataset(None, use_cache=False)
    digits = torch.cat([ds.images[torch.nonzero(ds.labels == c).flatten()[40:50], 0] for c in range(10)])
    noise = torch.randint(0, 256, (30, 28, 28), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    return pixel_csv(tmp_path_factory.mktemp("ood") / "noise_then_digits.csv", torch.cat([noise, digits])), 30


def test_predict_answers_unknown_for_noise_the_confidence_accepts(trained_run: Path, noise_and_digits: tuple[Path, int],
                                                                  tmp_path: Path):
    from cnn_finetune.tools.calibration import model_distance, model_threshold

    csv_path, n_noise = noise_and_digits
    model = str(trained_run / "best_model_finetuned.pth")
    meta = load_state(trained_run / "best_model_finetuned.pth")
    fitted = model_distance(meta)
    assert fitted is not None and fitted["num_images"] == 360 and torch.tensor(fitted["precision"]).shape == (32, 32)
    limit, threshold = fitted["threshold"], model_threshold(meta)
    rows = {}
    for name, extra in (("rule", []), ("confidence only", ["--max-distance", "0"])):
        proc = run_tool("predict", ["--model", model, str(csv_path), "--json", *extra], tmp_path)
        assert proc.returncode == 0, proc.stderr
        rows[name] = json.loads(proc.stdout)
    noise, digits = rows["rule"][:n_noise], rows["rule"][n_noise:]
    # Every noise image is far from every class, and answered unknown, ...
    assert all(r["distance"] > limit and r["unknown"] for r in noise)
    # ... though the confidence alone accepts them (the answer without the distance check): the network
    # is over 50% sure of a class on every one, above the threshold.
    alone = rows["confidence only"][:n_noise]
    assert all(not r["unknown"] and r["distance"] is None and r["confidence"] > max(threshold, 0.5) for r in alone)
    # The model's own kind of images (unseen digits) stay near their classes: at most a few are far.
    assert sum(r["distance"] > limit for r in digits) <= 5
    assert sum(r["unknown"] for r in digits) <= 15 and min(r["distance"] for r in noise) > 2 * limit
    for r in rows["rule"]:
        assert r["unknown"] == (r["confidence"] < threshold or r["distance"] > limit)
    text = run_tool("predict", ["--model", model, str(csv_path)], tmp_path)
    assert f"{csv_path}:2: unknown (" in text.stdout and "feature distance" in text.stdout.splitlines()[0]
    bad = run_tool("predict", ["--model", model, str(csv_path), "--max-distance", "-1"], tmp_path)
    assert bad.returncode == 2 and "--max-distance -1.0 must be a finite distance of 0 or more" in bad.stderr


def test_old_model_files_predict_without_a_distance_check(reference_run: Path, noise_and_digits: tuple[Path, int],
                                                          tmp_path: Path):
    from cnn_finetune.files.checkpoint import load_safetensors, save_checkpoint
    from cnn_finetune.tools.calibration import model_threshold

    csv_path, _ = noise_and_digits
    state = load_state(reference_run / "best_model_finetuned.pth")
    cal = dict(state["calibration"])
    assert "feature_distance" in cal
    del cal["feature_distance"]
    save_checkpoint({**state, "calibration": cal}, tmp_path / "before_the_distance.pth")
    proc = run_tool("predict", ["--model", str(tmp_path / "before_the_distance.pth"), str(csv_path), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 130 and all(r["distance"] is None for r in rows)
    assert all(r["unknown"] == (r["confidence"] < model_threshold(state)) for r in rows)
    # A model file from before calibration altogether (the old-layout fixture): the plain softmax, never unknown.
    old = Path(__file__).parent / "fixtures" / "premove_run" / "best_model_finetuned.pth"
    proc = run_tool("predict", ["--model", str(old), str(csv_path), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(r["unknown"] is False and r["distance"] is None for r in json.loads(proc.stdout))
    # The export carries the new fields in the .safetensors metadata, and predicting from it gives the same distances.
    proc = run_tool("export", ["--model", str(reference_run / "best_model_finetuned.pth"), "--output-dir", "exp", "--no-onnx"],
                    tmp_path)
    assert proc.returncode == 0, proc.stderr
    (st,) = (tmp_path / "exp").glob("*.safetensors")
    assert load_safetensors(st)[1]["calibration"]["feature_distance"] == state["calibration"]["feature_distance"]
    a = json.loads(run_tool("predict", ["--model", str(st), str(csv_path), "--json"], tmp_path).stdout)
    b = json.loads(run_tool("predict", ["--model", str(reference_run / "best_model_finetuned.pth"), str(csv_path), "--json"],
                            tmp_path).stdout)
    assert [r["distance"] for r in a] == [r["distance"] for r in b] and all(r["distance"] is not None for r in a)


def test_a_run_begun_before_the_calibration_part_existed_resumes_as_it_began(reference_run: Path, tiny_idx: Path,
                                                                            tmp_path: Path):
    # A checkpoint whose settings lack calibration_fraction chose its epochs on the whole validation split:
    # extending it keeps that (not refused, not switched half-way to a smaller selection split).
    import shutil

    from cnn_finetune.files.checkpoint import save_checkpoint

    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    for name in ("checkpoint_last.pth", "checkpoint_prev.pth"):
        if (out / name).exists():
            state = load_state(out / name)
            del state["config"]["calibration_fraction"]
            (out / name).unlink()  # a hard link to the reference run's own file: never write through it
            save_checkpoint(state, out / name)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_finetuned.py"), *FAST, "--epochs", "4",
                           "--data", str(tiny_idx), "--output-dir", "out"], cwd=tmp_path, env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads((out / "config_finetuned.json").read_text())["resolved"]
    assert resolved["automatic"]["calibration_fraction"] == "0.0; the run started before this setting existed, kept"
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 4 and history[3]["val_acc"] * 40 == pytest.approx(round(history[3]["val_acc"] * 40), abs=1e-6)
    assert load_state(out / "checkpoint_last.pth")["config"]["calibration_fraction"] == 0.0
    assert json.loads((out / "data_report.json").read_text())["split"]["calibration"] == 0
    cal = load_state(out / "best_model_finetuned.pth")["calibration"]
    assert cal["fitted_on"] == "validation split" and cal["num_images"] == 40
