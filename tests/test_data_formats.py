"""The data formats people have, through the training command: a Kaggle-style CSV of pixels, a NumPy
.npz (as Keras' mnist.npz), and a flat image folder with a labels CSV.

Each test writes a real file of the 400 real MNIST digits of the tiny set, with bad rows mixed in,
trains on it through the CLI, and checks the classes, the counts and data_report.json. Bad sources
are exit 2 naming the file, with nothing created.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, run_cli

from cnn_finetune.data.loader import load_dataset
from cnn_finetune.errors import DataError

DIGITS = [str(d) for d in range(10)]
HEADER = "label," + ",".join(f"pixel{i}" for i in range(784))


@pytest.fixture(scope="module")
def digits(tiny_idx: Path) -> tuple[np.ndarray, np.ndarray]:
    """The tiny set's 400 images (uint8 N x 28 x 28) and labels (40 of each digit)."""
    ds = load_dataset(tiny_idx, use_cache=False)
    return ds.images[:, 0].numpy(), ds.labels.numpy()


def row(label: object, pixels: np.ndarray | list) -> str:
    return ",".join([str(label)] + [str(int(v)) if isinstance(v, (int, np.integer)) else str(v) for v in np.ravel(pixels)])


def train(data: str, tmp_path: Path, *extra: str) -> tuple[object, dict]:
    proc = run_cli([*FAST, "--data", data, "--output-dir", "out", *extra], tmp_path)
    report = json.loads((tmp_path / "out" / "data_report.json").read_text()) if proc.returncode == 0 else {}
    return proc, report


def assert_trained_on_400_digits(proc: object, report: dict, kind: str) -> None:
    assert proc.returncode == 0, proc.stderr[-2000:]
    src = report["train_source"]
    assert src["kind"] == kind and src["num_images"] == 400
    assert src["class_names"] == DIGITS and set(src["class_counts"].values()) == {40}
    assert report["split"]["train"] + report["split"]["val"] == 400
    assert f"skipped {src['num_skipped']} unusable file(s)" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Kaggle-style CSV


BAD_CSV_ROWS = {  # line -> (row text, reason in data_report.json)
    3: (lambda px: row(3, px[:-1]), "line 3: 784 values; expected 785 (label + 784 pixels)"),
    5: (lambda px: row(4, [*px[:-1], 300]), "line 5: pixel 783 is 300: expected a whole number 0-255"),
    7: (lambda px: row(5, [*px[:10], "dark", *px[11:]]), "line 7: pixel 10 is 'dark': not a number"),
    9: (lambda px: row("", px), "line 9: missing label"),
    11: (lambda px: row(6, [*px[:2], -1, *px[3:]]), "line 11: pixel 2 is -1: expected a whole number 0-255"),
}


def kaggle_lines(images: np.ndarray, labels: np.ndarray, header: bool = True) -> list[str]:
    """The Kaggle layout, one image per line, with the bad rows of BAD_CSV_ROWS at their lines."""
    lines = [HEADER] if header else []
    good = iter(row(lab, img) for img, lab in zip(images, labels))
    zeros = list(np.zeros(784, np.int64))
    while len(lines) < header + len(images) + len(BAD_CSV_ROWS):
        no = len(lines) + 1
        lines.append(BAD_CSV_ROWS[no][0](zeros) if no in BAD_CSV_ROWS else next(good))
    return lines


@pytest.mark.parametrize("variant", ["header", "no_header", "gz"])
def test_kaggle_csv_trains_and_reports_its_bad_rows(digits, tmp_path: Path, variant: str):
    images, labels = digits
    # Without a header the label is the first of 785 values (the Kaggle and Fashion-MNIST order).
    lines = kaggle_lines(images, labels, header=variant != "no_header")
    path = tmp_path / ("train.csv.gz" if variant == "gz" else "train.csv")
    text = "\n".join(lines) + "\n"
    path.write_bytes(gzip.compress(text.encode()) if variant == "gz" else text.encode())
    proc, report = train(str(path), tmp_path)
    assert_trained_on_400_digits(proc, report, "csv")
    skipped = report["train_source"]["skipped"]
    assert [s["path"] for s in skipped] == [str(path)] * 5
    assert [s["reason"] for s in skipped] == [reason for _, reason in BAD_CSV_ROWS.values()]
    # The rows are the images, in order: the same data as the IDX file they came from.
    ds = load_dataset(path, use_cache=False)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images)) and ds.labels.tolist() == labels.tolist()


def test_csv_without_labels_is_refused_for_training_and_predicted_row_by_row(digits, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]):
    from cnn_finetune.tools.inference import load_inference_model, predict_proba
    from cnn_finetune.tools.predict import main as predict_main

    images, labels = digits
    labelled = tmp_path / "train.csv"
    labelled.write_text("\n".join([HEADER] + [row(lab, img) for img, lab in zip(images, labels)]) + "\n")
    proc, _ = train(str(labelled), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    unlabelled = tmp_path / "test.csv"  # Kaggle's test.csv: pixel0..pixel783, no label; line 4 is bad
    lines = [HEADER.split(",", 1)[1]] + [",".join(map(str, img.ravel())) for img in images[:6]]
    lines.insert(3, ",".join(["7"] * 700))
    unlabelled.write_text("\n".join(lines) + "\n")

    refused = run_cli([*FAST, "--data", str(unlabelled), "--output-dir", "refused"], tmp_path)
    assert refused.returncode == 2
    assert f"{unlabelled} has no label column" in refused.stderr and "predict.py" in refused.stderr
    assert not (tmp_path / "refused").exists()

    model_path = tmp_path / "out" / "best_model_finetuned.pth"
    assert predict_main(["--model", str(model_path), str(unlabelled), "--top-k", "1", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in records] == [f"{unlabelled}:{n}" for n in range(2, 9)]
    assert records[2]["error"] == "700 values; expected 784" and records[2]["predictions"] == []
    model, meta = load_inference_model(model_path)
    best = predict_proba(model, meta, torch.from_numpy(images[:6]).unsqueeze(1)).argmax(1).tolist()
    assert [r["predictions"][0]["class"] for r in records if not r["error"]] == [meta["class_names"][i] for i in best]


# ------------------------------------------------------------------------------------------------
# NumPy .npz


def test_npz_trains_on_its_train_arrays_and_tests_on_its_test_arrays(digits, tmp_path: Path):
    images, labels = digits
    x_train = images.reshape(-1, 784).astype(np.float32)  # (N, 784) floats, as some tools save them
    y_train = labels.astype(np.float64)
    x_train = np.concatenate([x_train, np.full((2, 784), 3.0, np.float32)])
    x_train[400, 5] = 256.0  # a pixel out of range
    y_train = np.concatenate([y_train, [1.0, np.nan]])  # the last image has no label
    x_test = images[::4, :, :, None]  # (N, 28, 28, 1) uint8, as Keras' channels-last arrays
    path = tmp_path / "mnist.npz"
    np.savez_compressed(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=labels[::4])
    proc, report = train(str(path), tmp_path, "--test-data", str(path))
    assert_trained_on_400_digits(proc, report, "npz")
    assert report["train_source"]["skipped"] == [
        {"path": str(path), "reason": "x_train[400]: pixel 5 is 256: expected a whole number 0-255"},
        {"path": str(path), "reason": "x_train[401]: missing label (y_train[401] is NaN or empty)"}]
    assert "(x_train/y_train)" in report["train_source"]["source"]
    test_eval = json.loads((tmp_path / "out" / "test_evaluation.json").read_text())
    assert test_eval["num_samples"] == 100 and test_eval["data"]["source"] == f"{path} (x_test/y_test)"
    assert [c["support"] for c in test_eval["per_class"]] == [10] * 10


def test_npz_part_can_be_named_and_missing_arrays_are_named(digits, tmp_path: Path):
    images, labels = digits
    path = tmp_path / "keras.npz"
    np.savez(path, x_train=images[:200], y_train=labels[:200], x_test=images[200:], y_test=labels[200:])
    assert len(load_dataset(path, use_cache=False)) == 200
    assert torch.equal(load_dataset(f"{path}:test", use_cache=False).images[:, 0], torch.from_numpy(images[200:]))
    assert len(load_dataset(path, use_cache=False, part="test")) == 200
    only_train = tmp_path / "only_train.npz"
    np.savez(only_train, x_train=images, y_train=labels)
    with pytest.raises(DataError, match=f"{only_train} has no x_test array .it holds x_train, y_train."):
        load_dataset(only_train, part="test", use_cache=False)


# ------------------------------------------------------------------------------------------------
# A flat image folder with labels.csv


def test_flat_folder_with_labels_csv_trains_and_reports_bad_rows(digits, tmp_path: Path):
    images, labels = digits
    folder = tmp_path / "digits"
    folder.mkdir()
    rows = ["filename,label"]
    for i, (img, lab) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,{lab}")
    (folder / "broken.png").write_bytes(b"not a PNG")
    Image.fromarray(images[0]).save(folder / "extra.png")  # present but not listed: no label
    rows += ["broken.png,3", "lost.png,4", "005.png,9", "x.png", "extra2.png,"]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    proc, report = train(str(folder), tmp_path)
    assert_trained_on_400_digits(proc, report, "listed")
    csv_path = str(folder / "labels.csv")
    assert report["train_source"]["skipped"] == [
        {"path": csv_path, "reason": "line 404: 005.png is listed again (first on line 7)"},
        {"path": csv_path, "reason": "line 405: 1 values; expected filename,label"},
        {"path": csv_path, "reason": "line 406: missing label for extra2.png"},
        {"path": str(folder / "lost.png"), "reason": "file not found (listed on line 403 of labels.csv)"},
        {"path": str(folder / "extra.png"), "reason": "no label: not listed in labels.csv"},
        {"path": str(folder / "broken.png"), "reason": report["train_source"]["skipped"][5]["reason"]},
    ]
    assert "not an image" in report["train_source"]["skipped"][5]["reason"]
    # --data may name the CSV itself; the same images in the same order, from the cache.
    ds = load_dataset(folder / "labels.csv", cache_dir=tmp_path / "cache")  # the training run's cache
    assert ds.cache == "hit" and torch.equal(ds.images[:, 0], torch.from_numpy(images))


# ------------------------------------------------------------------------------------------------
# Bad sources: exit 2 naming the file, nothing created


def _bad_sources(tmp: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, tuple[Path, str]]:
    narrow = tmp / "narrow.csv"
    narrow.write_text("label,a,b,c\n1,2,3,4\n")
    pickled = tmp / "objects.npz"
    np.savez(pickled, x_train=np.array([object()] * 3, dtype=object), y_train=np.arange(3))
    flat = tmp / "flat.npz"
    np.savez(flat, x_train=images.reshape(-1, 14, 56), y_train=labels)
    onehot = tmp / "onehot.npz"
    np.savez(onehot, x_train=images, y_train=np.eye(10)[labels])
    unlabelled = tmp / "unlabelled.npz"
    np.savez(unlabelled, x_train=images)
    nothing = tmp / "nothing"
    nothing.mkdir()
    (nothing / "labels.csv").write_text("filename,label\nmissing.png,1\n")
    return {
        "csv-header": (narrow, "its header has 4 columns; expected 784 pixel values per row"),
        "npz-pickle": (pickled, "cannot read"),
        "npz-shape": (flat, "x_train in {} has shape (400, 14, 56)"),
        "npz-onehot": (onehot, "y_train in {} has shape (400, 10); expected one label per image"),
        "npz-no-labels": (unlabelled, "{} has x_train but no y_train"),
        "labels-nothing": (nothing, "no usable image in {}"),
    }


@pytest.mark.parametrize("case", ["csv-header", "npz-pickle", "npz-shape", "npz-onehot", "npz-no-labels", "labels-nothing"])
def test_bad_sources_exit_2_naming_the_file(digits, tmp_path: Path, case: str):
    path, message = _bad_sources(tmp_path, *digits)[case]
    proc = run_cli([*FAST, "--data", str(path), "--output-dir", "out"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(path) in proc.stderr and message.format(path) in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
