"""Elastic distortions in real runs (off by default, bit-exact on resume when on) and test-time
augmentation in the evaluation (``evaluate.py --tta``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_same_weights, load_state, run_cli

ELASTIC = ["--set", "aug_elastic=34", "--set", "aug_elastic_sigma=4"]


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


def test_tta_with_the_plain_view_alone_is_the_plain_prediction(reference_run: Path, tiny_idx: Path):
    from cnn_finetune.data.loader import read_idx
    from cnn_finetune.tools.inference import TTA_VIEWS, load_inference_model, predict_logits, predict_tta_log_probs

    model, meta = load_inference_model(reference_run / "best_model_finetuned.pth")
    images = torch.from_numpy(read_idx(tiny_idx)[:100]).unsqueeze(1)
    plain = torch.softmax(predict_logits(model, meta, images), 1)
    alone = predict_tta_log_probs(model, meta, images, views=((0, 0, 0),)).exp()
    torch.testing.assert_close(alone, plain, atol=1e-6, rtol=0)
    both = predict_tta_log_probs(model, meta, images, batch_size=33).exp()  # batches of 33: not a divisor of 100
    torch.testing.assert_close(both.sum(1), torch.ones(100), atol=1e-5, rtol=0)
    assert TTA_VIEWS[0] == (0, 0, 0) and len(TTA_VIEWS) == 7
    assert float((both - plain).abs().max()) > 1e-3  # the other views do count


def test_evaluate_tta_flag_reports_its_views(reference_run: Path, tiny_idx: Path, tmp_path: Path, capsys):
    from cnn_finetune.tools.evaluate import main

    model = str(reference_run / "best_model_finetuned.pth")
    assert main(["--model", model, "--data", str(tiny_idx), "--output-dir", str(tmp_path / "plain"), "--no-cache"]) == 0
    assert main(["--model", model, "--data", str(tiny_idx), "--output-dir", str(tmp_path / "tta"), "--no-cache", "--tta"]) == 0
    plain = json.loads((tmp_path / "plain" / "evaluation.json").read_text())
    tta = json.loads((tmp_path / "tta" / "evaluation.json").read_text())
    assert "tta_views" not in plain and tta["tta_views"][0] == [0, 0, 0] and len(tta["tta_views"]) == 7
    assert tta["num_samples"] == plain["num_samples"] == 400
    assert tta["predictions"] != plain["predictions"] or tta["confidences"] != plain["confidences"]
