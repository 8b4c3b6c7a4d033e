"""Elastic distortions in real runs (off by default, bit-exact on resume when on) and test-time
augmentation (config ``tta``: auto, on for classes new to the base model): the views a model file names,
used alike by evaluation, prediction, the calibration and the exports; ``evaluate.py --tta`` / ``--no-tta``
override them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_same_weights, finished_run, load_state, run_cli

ELASTIC = ["--set", "aug_elastic=34", "--set", "aug_elastic_sigma=4"]


@pytest.fixture(scope="module")
def tta_run(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run's settings with the views on (digits: ``tta`` auto would leave them off)."""
    return finished_run([*FAST, "--data", str(tiny_idx), "--set", "tta=on"], tmp_path_factory, "tta_on")


def test_elastic_run_resumes_bit_for_bit_and_off_is_the_default_run(reference_run: Path, tiny_idx: Path, tmp_path: Path):
    args = [*FAST, "--data", str(tiny_idx)]
    assert run_cli([*args, *ELASTIC, "--output-dir", "full"], cwd=tmp_path).returncode == 0
    # interrupted mid-epoch by a real signal, then the same command again
    cut = run_cli([*args, *ELASTIC, "--output-dir", "cut"], cwd=tmp_path, faults="sigint@7")
    assert cut.returncode == 130, cut.stderr[-2000:]
    resumed = run_cli([*args, *ELASTIC, "--output-dir", "cut"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(tmp_path / "full" / "checkpoint_last.pth", tmp_path / "cut" / "checkpoint_last.pth")
    saved = json.loads((tmp_path / "full" / "config_finetuned.json").read_text())["config"]
    assert (saved["aug_elastic"], saved["aug_elastic_sigma"]) == (34, 4)
    # the distortion is really applied: other weights than the default run's
    ref, elastic = load_state(reference_run / "checkpoint_last.pth")["model"], load_state(tmp_path / "full" / "checkpoint_last.pth")["model"]
    assert any(not torch.equal(ref[k], elastic[k]) for k in ref)
    # off (0), whatever the smoothing, is the default run bit for bit: no random number is drawn for it
    off = run_cli([*args, "--set", "aug_elastic=0", "--set", "aug_elastic_sigma=9", "--output-dir", "off"], cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    assert_same_weights(reference_run / "checkpoint_last.pth", tmp_path / "off" / "checkpoint_last.pth")


def test_a_checkpoint_from_before_the_setting_resumes_and_turning_it_on_is_refused():
    from cnn_finetune.config import TrainConfig, resume_mismatches

    older = TrainConfig().to_dict()
    del older["aug_elastic"], older["aug_elastic_sigma"]  # written before elastic distortions existed
    assert resume_mismatches(older, TrainConfig()) == []
    assert resume_mismatches(older, TrainConfig(aug_elastic=34.0)) == ["aug_elastic: checkpoint has None, this run has 34.0"]


def pattern() -> torch.Tensor:
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 5:12, 6:20] = 1.0
    x[0, 0, 14:22, 9:11] = 0.5
    return x


@pytest.mark.parametrize("dx, dy", [(1, 0), (-1, 0), (0, 1), (0, -1), (2, -1)])
def test_a_tta_shift_moves_the_image_by_whole_pixels(dx: int, dy: int):
    from cnn_finetune.tools.inference import view

    x = pattern()
    expected = torch.roll(x, shifts=(dy, dx), dims=(2, 3))  # the pattern is far from the border: no wrap-around
    torch.testing.assert_close(view(x, dx, dy, 0), expected, atol=1e-5, rtol=0)
    assert view(x, 0, 0, 0) is x
    turned = view(x, 0, 0, 8)
    assert 0.5 < float((turned - x).abs().max()) and float(turned.sum()) == pytest.approx(float(x.sum()), rel=0.03)


def test_tta_with_the_plain_view_alone_is_the_plain_prediction(tta_run: Path, tiny_idx: Path):
    from cnn_finetune.data.loader import read_idx
    from cnn_finetune.tools.inference import PLAIN, TTA_VIEWS, load_inference_model, predict_logits

    model, meta = load_inference_model(tta_run / "best_model_finetuned.pth")
    assert meta["tta_views"] == [list(v) for v in TTA_VIEWS]  # the file of a run with tta on names its views
    images = torch.from_numpy(read_idx(tiny_idx)[:100]).unsqueeze(1)
    plain = torch.softmax(predict_logits(model, meta, images, views=PLAIN), 1)
    with torch.no_grad():
        by_hand = torch.softmax(model(normalise(images, meta)), 1)
    torch.testing.assert_close(plain, by_hand, atol=1e-6, rtol=0)
    both = predict_logits(model, meta, images, batch_size=33).exp()  # the model's views; batches of 33: not a divisor of 100
    torch.testing.assert_close(both.sum(1), torch.ones(100), atol=1e-5, rtol=0)
    assert TTA_VIEWS[0] == (0, 0, 0) and len(TTA_VIEWS) == 7
    assert float((both - plain).abs().max()) > 1e-3  # the other views do count
    # the mean of the views' softmax, each view computed on its own
    from cnn_finetune.tools.inference import normalise_unit, view
    from cnn_finetune.data.augment import to_unit
    with torch.no_grad():
        mean = sum(torch.softmax(model(normalise_unit(view(to_unit(images), *v), meta)), 1) for v in TTA_VIEWS) / 7
    torch.testing.assert_close(both, mean, atol=1e-6, rtol=0)


def normalise(images: torch.Tensor, meta: dict) -> torch.Tensor:
    """(pixel / 255 - mean) / std, written out: what the network takes."""
    norm = meta["normalization"]
    return (images.float() / 255 - norm["mean"]) / norm["std"]


def test_evaluate_uses_the_model_files_views_unless_told(tta_run: Path, reference_run: Path, tiny_idx: Path,
                                                         tmp_path: Path, capsys):
    from cnn_finetune.tools.evaluate import main

    model = str(tta_run / "best_model_finetuned.pth")
    for name, flags in (("default", []), ("tta", ["--tta"]), ("plain", ["--no-tta"])):
        assert main(["--model", model, "--data", str(tiny_idx), "--output-dir", str(tmp_path / name), "--no-cache", *flags]) == 0
    default, tta, plain = (json.loads((tmp_path / n / "evaluation.json").read_text()) for n in ("default", "tta", "plain"))
    assert "tta_views" not in plain and tta["tta_views"][0] == [0, 0, 0] and len(tta["tta_views"]) == 7
    assert default["tta_views"] == tta["tta_views"] and default["predictions"] == tta["predictions"]
    assert default["confidences"] == tta["confidences"]
    assert tta["num_samples"] == plain["num_samples"] == 400
    assert tta["predictions"] != plain["predictions"] or tta["confidences"] != plain["confidences"]
    # a file with the plain view alone (the default digits run): evaluate's default classifies the image alone
    assert main(["--model", str(reference_run / "best_model_finetuned.pth"), "--data", str(tiny_idx), "--output-dir",
                 str(tmp_path / "plain-file"), "--no-cache"]) == 0
    assert "tta_views" not in json.loads((tmp_path / "plain-file" / "evaluation.json").read_text())
    with pytest.raises(SystemExit):  # both at once is a contradiction, refused by the parser
        main(["--model", model, "--data", str(tiny_idx), "--tta", "--no-tta"])


def test_tta_auto_is_off_on_digits_and_the_tools_follow_the_file(reference_run: Path, tiny_idx: Path):
    from cnn_finetune.data.loader import read_idx
    from cnn_finetune.tools.inference import PLAIN, load_inference_model, predict_logits, predict_with_unknown

    # The default run (tta auto) on digits the base model separates: the views are left off, and it says why.
    manifest = json.loads((reference_run / "config_finetuned.json").read_text())
    assert manifest["config"]["tta"] == "off"
    assert manifest["resolved"]["automatic"]["tta"].startswith("auto: off (")
    model, meta = load_inference_model(reference_run / "best_model_finetuned.pth")
    assert meta["tta_views"] == [[0, 0, 0]]
    images = torch.from_numpy(read_idx(tiny_idx)[:50]).unsqueeze(1)
    torch.testing.assert_close(predict_logits(model, meta, images), predict_logits(model, meta, images, views=PLAIN), atol=0, rtol=0)
    evaluation = json.loads((reference_run / "evaluation.json").read_text())
    assert "tta_views" not in evaluation
    # predict classifies the plain image alone too: its probabilities are the plain logits' at the file's temperature
    from cnn_finetune.tools.calibration import calibrated_probs, model_temperature
    answers = predict_with_unknown(model, meta, images)
    with torch.no_grad():
        plain = calibrated_probs(model(normalise(images, meta)), model_temperature(meta))
    torch.testing.assert_close(answers.probs, plain, atol=1e-6, rtol=0)


def test_predict_and_evaluate_agree_with_the_views(tta_run: Path, tiny_idx: Path):
    from cnn_finetune.data.loader import read_idx
    from cnn_finetune.tools.calibration import calibrated_probs, model_temperature
    from cnn_finetune.tools.evaluate import evaluate_arrays
    from cnn_finetune.tools.inference import load_inference_model, predict_logits, predict_proba, predict_with_unknown

    model, meta = load_inference_model(tta_run / "best_model_finetuned.pth")
    images = torch.from_numpy(read_idx(tiny_idx)[:60]).unsqueeze(1)
    labels = torch.zeros(60, dtype=torch.int64)
    report = evaluate_arrays(model, meta, images, labels, "cpu")
    expected = calibrated_probs(predict_logits(model, meta, images), model_temperature(meta))
    torch.testing.assert_close(predict_proba(model, meta, images), expected, atol=0, rtol=0)
    answers = predict_with_unknown(model, meta, images)
    torch.testing.assert_close(answers.probs, expected, atol=0, rtol=0)
    assert report["predictions"] == expected.argmax(1).tolist() and report["tta_views"] == meta["tta_views"]
    assert report["confidences"] == [round(v, 4) for v in expected.max(1).values.tolist()]


@pytest.mark.parametrize("views, why", [
    ([[1, 0, 0], [0, 0, 0]], "the first view must be the unaugmented image"),
    ([[0, 0, 0], [9, 0, 0]], "outside"),
    ([[0, 0, 0], [0, 0]], "three numbers"),
    ([[0, 0, 0], [0, 0, float("nan")]], "three numbers"),
    ([], "1 to 64 views"),
    ("all", "1 to 64 views"),
])
def test_a_model_file_with_damaged_views_is_refused_by_name(tta_run: Path, tmp_path: Path, views, why):
    from cnn_finetune.files.checkpoint import load_checkpoint, save_checkpoint
    from cnn_finetune.errors import UserError
    from cnn_finetune.tools.inference import load_inference_model

    state = load_checkpoint(tta_run / "best_model_finetuned.pth")
    state["tta_views"] = views
    bad = tmp_path / "edited.pth"
    save_checkpoint(state, bad)
    with pytest.raises(UserError) as err:
        load_inference_model(bad)
    assert str(bad) in str(err.value) and why in str(err.value) and "test-time views" in str(err.value)


def test_the_exports_predict_with_the_views(tta_run: Path, tiny_idx: Path, tmp_path: Path):
    import numpy as np
    from cnn_finetune.data.loader import read_idx
    from cnn_finetune.tools.export import export_model, load_torchscript, run_onnx
    from cnn_finetune.tools.inference import PLAIN, load_inference_model, predict_logits

    sidecar = export_model(tta_run / "best_model_finetuned.pth", tmp_path / "export")
    assert sidecar["checks"]["passed"] and sidecar["tta_views"][0] == [0, 0, 0] and len(sidecar["tta_views"]) == 7
    assert "mean softmax over the test-time views" in sidecar["output"]["value"]
    model, meta = load_inference_model(tta_run / "best_model_finetuned.pth")
    images = torch.from_numpy(read_idx(tiny_idx)[:40]).unsqueeze(1)
    tools = predict_logits(model, meta, images)  # what evaluate and predict compute
    x = normalise(images, meta)
    traced = load_torchscript(tmp_path / "export" / sidecar["files"]["torchscript"])
    with torch.no_grad():
        torch.testing.assert_close(traced(x), tools, atol=1e-4, rtol=0)
    onnx_out, _ = run_onnx(tmp_path / "export" / sidecar["files"]["onnx"], x)
    torch.testing.assert_close(torch.from_numpy(np.asarray(onnx_out)), tools, atol=1e-4, rtol=0)
    assert float((tools - predict_logits(model, meta, images, views=PLAIN).log_softmax(1)).abs().max()) > 1e-3


def test_tta_auto_follows_the_separability_of_the_classes():
    from cnn_finetune.config import TrainConfig
    from cnn_finetune.training.recipe import SEPARABLE_THRESHOLD, resolve

    def chosen(fine_tuning: bool, separability: float | None, tta: str = "auto") -> tuple[str, str | None]:
        r = resolve(TrainConfig(tta=tta), 5, fine_tuning, separability=separability, per_class=27)
        return r.config.tta, r.notes.get("tta")

    value, note = chosen(True, 0.80)  # letters of a new script: the few-shot sets where the views won
    assert value == "on" and "80.0%" in note and f"below {100 * SEPARABLE_THRESHOLD:.0f}%" in note
    value, note = chosen(True, 0.98)  # digits the base model knows
    assert value == "off" and "98.0%" in note
    assert chosen(False, None)[0] == "off" and "from scratch" in chosen(False, None)[1]
    assert chosen(True, None) == ("off", "auto: off (the base model's separability of the classes was not measured)")
    assert chosen(True, 0.98, "on") == ("on", None) and chosen(True, 0.80, "off") == ("off", None)  # explicit wins


def test_a_resumed_run_keeps_the_views_it_started_with(tiny_idx: Path, tmp_path: Path):
    args = [*FAST, "--data", str(tiny_idx), "--output-dir", "out"]
    cut = run_cli([*args, "--set", "tta=on"], cwd=tmp_path, faults="sigint@7")
    assert cut.returncode == 130, cut.stderr[-2000:]
    resumed = run_cli(args, cwd=tmp_path)  # tta auto now: the run goes on with the views it began with
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "tta: on; decided when the run started, kept" in resumed.stdout
    assert len(load_state(tmp_path / "out" / "best_model_finetuned.pth")["tta_views"]) == 7
