"""Copies of one image under two labels, and test images that are copies of training images.

Units check the grouping on hand-made images; an end-to-end run of the real command on class folders
with a file copied into another letter's folder (as the QMNIST letters have 98 times) checks that the run
warns, names both files in data_report.json and the model card, trains as usual and leaves the files alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, cli_env, run_cli

ROOT = Path(__file__).resolve().parents[1]


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)


def test_groups_copies_under_two_labels_apart_from_copies_under_one():
    from cnn_finetune.data.duplicates import find_duplicates

    x = images(10)
    x[5] = x[1]
    x[7] = x[1]  # image 1 three times: labels a, b, a
    x[9] = x[2]  # image 2 twice, both b
    y = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0, 1, 1])
    found = find_duplicates(x, y, ["a", "b"], [f"f{i}" for i in range(10)])
    assert found["across_classes"] == {"groups": 1, "images": 3, "unavoidable_errors": 1, "examples": [
        {"labels": ["a", "b"], "images": [{"image": "f1", "label": "a"}, {"image": "f5", "label": "b"}, {"image": "f7", "label": "a"}]}]}
    assert found["within_class"] == {"groups": 1, "extra_copies": 1}
    one_pixel_off = x.clone()
    one_pixel_off[5, 0, 3, 3] ^= 1
    one_pixel_off[7, 0, 0, 0] ^= 1
    one_pixel_off[9, 0, 27, 27] ^= 1
    clean = find_duplicates(one_pixel_off, y, ["a", "b"], [f"f{i}" for i in range(10)])
    assert clean["across_classes"]["groups"] == 0 and clean["within_class"]["groups"] == 0


def test_test_copies_are_matched_by_class_name_not_number():
    from cnn_finetune.data.duplicates import find_overlap

    x = images(6)
    y = torch.tensor([0, 1, 0, 1, 0, 1])  # classes a, b
    test = torch.stack([x[1], x[2], images(1, seed=1)[0], x[3]])
    # The test data names its classes the other way round: number 0 is "b".
    found = find_overlap(x, y, ["a", "b"], [f"f{i}" for i in range(6)], test, torch.tensor([0, 0, 0, 1]), ["b", "a"],
                         ["t0", "t1", "t2", "t3"])
    # t0 = f1, b in both: a copy with the same label; t1 = f2 (a), labelled b; t3 = f3 (b), labelled a.
    assert found["images"] == 3 and found["other_label"] == 2
    assert [e["test_image"] for e in found["examples"]] == ["t1", "t3"]
    assert found["examples"][0] == {"test_image": "t1", "test_label": "b", "training_images": ["f2"], "training_labels": ["a"]}


def write_folders(root: Path, pictures: np.ndarray, labels: np.ndarray, names: list[str]) -> list[Path]:
    files = []
    for i, (img, label) in enumerate(zip(pictures, labels)):
        folder = root / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        files.append(folder / f"img{i:03d}.png")
        Image.fromarray(255 - img).save(files[-1])  # dark ink on white, as scans are
    return files


def test_a_run_names_copies_under_two_labels_and_test_copies_and_touches_nothing(tmp_path: Path, tiny_idx: Path):
    from cnn_finetune.data.loader import load_dataset

    ds = load_dataset(tiny_idx, use_cache=False)
    keep = torch.cat([torch.nonzero(ds.labels == c).flatten()[:20] for c in range(3)])
    pictures, labels = ds.images[keep, 0].numpy(), ds.labels[keep].numpy()
    names = ["zero", "one", "two"]
    files = write_folders(tmp_path / "data", pictures, labels, names)
    # One picture of a "zero" also filed under "two", as a byte-identical copy of another name.
    copy = tmp_path / "data" / "two" / "copy_of_img000.png"
    shutil.copyfile(files[0], copy)
    fresh = torch.nonzero(ds.labels == 2).flatten()[20:22]  # two "two" images that are not in the training data
    test_pick = torch.cat([keep[20:23], fresh])
    test_files = write_folders(tmp_path / "test", ds.images[test_pick, 0].numpy(), np.array([0, 0, 0, 2, 2]), names)
    # And one test "two" also filed under the test's "zero": whatever the model says, one of the two is wrong.
    test_copy = tmp_path / "test" / "zero" / "copy_of_img003.png"
    shutil.copyfile(test_files[3], test_copy)
    before = {p: p.read_bytes() for p in [*files, copy, *test_files, test_copy]}
    proc = run_cli([*FAST, "--epochs", "1", "--data", str(tmp_path / "data"), "--test-data", str(tmp_path / "test"),
                    "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "1 picture(s) under two or more labels" in log and str(files[0]) in log and str(copy) in log
    # The test's three "zero" images are the first three "one" images of the training data (keep[20:23]).
    assert "3 test image(s) are copies of training or validation images" in log and "3 of them carry another label" in log
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())["duplicates"]
    # In the data's order: class folders sorted by name (one, two, zero), files by name within each.
    assert report["across_classes"] == {"groups": 1, "images": 2, "unavoidable_errors": 1, "examples": [
        {"labels": ["two", "zero"], "images": [{"image": str(copy), "label": "two"}, {"image": str(files[0]), "label": "zero"}]}]}
    assert report["test_copies"]["images"] == 3 and report["test_copies"]["other_label"] == 3
    assert [e["training_labels"] for e in report["test_copies"]["examples"]] == [["one"]] * 3
    assert report["test_across_classes"]["groups"] == 1 and report["test_across_classes"]["unavoidable_errors"] == 1
    assert "1 picture(s) under two or more labels" in log and "at least 1 of them are errors whatever a model predicts" in log
    card = (tmp_path / "out" / "model_card.md").read_text(encoding="utf-8")
    assert "2 images are 1 picture(s) under two or more labels" in card and f"`{copy}` (two)" in card
    assert "3 test image(s) are copies of training or validation images**, 3 of them under another label" in card
    assert "**The test data holds 2 images that are 1 picture(s) under two or more labels**: at least 1 test errors" in card
    # evaluate.py says the same of the test folder, in its log and evaluation.json.
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(tmp_path / "out" / "best_model_finetuned.pth"),
                           "--data", str(tmp_path / "test"), "--output-dir", str(tmp_path / "eval")],
                          cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at least 1 of them are errors whatever a model predicts" in proc.stderr + proc.stdout
    evaluated = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["data"]["duplicates"]["across_classes"]
    assert evaluated["groups"] == 1 and evaluated["unavoidable_errors"] == 1
    assert {x["image"] for x in evaluated["examples"][0]["images"]} == {str(test_files[3]), str(test_copy)}
    assert {p: p.read_bytes() for p in before} == before  # reported, not moved, removed or relabelled
    assert sorted(p.name for p in (tmp_path / "data" / "two").iterdir()) == sorted(
        [f.name for f in files if f.parent.name == "two"] + [copy.name])


def test_a_run_on_distinct_images_says_so(reference_run: Path):
    report = json.loads((reference_run / "data_report.json").read_text())["duplicates"]
    assert report["across_classes"]["groups"] == 0 and "test_copies" not in report
    assert "No image appears under two labels." in (reference_run / "model_card.md").read_text(encoding="utf-8")


QMNIST = next((d for d in ([Path(os.environ["QMNIST_DIR"])] if os.environ.get("QMNIST_DIR") else [])
               + [p / "shared" / "data" / "qmnist" / "images" for p in (ROOT.parent, ROOT, ROOT.parents[1])] if d.is_dir()), None)


@pytest.mark.skipif(QMNIST is None, reason="the QMNIST letters are not in ../shared/data/qmnist/images (set QMNIST_DIR)")
def test_the_real_letters_hold_98_pictures_under_two_letters(tmp_path: Path):
    """о/ө and к/қ of the QMNIST letters (800 raw PNGs, linked): 48 + 50 files are in both folders."""
    from cnn_finetune.data.duplicates import find_duplicates
    from cnn_finetune.data.loader import load_dataset

    for letter in ("о", "ө", "к", "қ"):
        (tmp_path / "letters" / letter).mkdir(parents=True)
        for f in (QMNIST / letter).glob("*.png"):
            (tmp_path / "letters" / letter / f.name).symlink_to(f)
    ds = load_dataset(tmp_path / "letters", use_cache=False)
    found = find_duplicates(ds.images, ds.labels, ds.class_names, ds.origin)["across_classes"]
    assert found["groups"] == 98 and found["images"] == 196
    pairs = {tuple(g["labels"]) for g in found["examples"]}
    assert pairs <= {("к", "қ"), ("о", "ө")}
    # Each group is one file name in the two folders: the same picture filed twice.
    assert all(len({Path(x["image"]).name for x in g["images"]}) == 1 for g in found["examples"])
