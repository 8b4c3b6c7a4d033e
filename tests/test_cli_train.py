"""End-to-end tests of the training command line: artifacts, best-K files, early stopping, exact
resume, refused resumes, --no-resume, bad input. Every test runs the real CLI in a subprocess."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_same_weights, bomb_png, load_state, run_cli, stripped_history

ARTIFACTS = ["best_model_finetuned.pth", "checkpoint_last.pth", "history.json", "config_finetuned.json"]


def digest_tree(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 of every file under ``folder`` (to prove nothing was touched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_artifacts_and_their_contents(reference_run: Path, tiny_idx: Path):
    out = reference_run
    for name in ARTIFACTS + ["checkpoint_prev.pth", "data_report.json"]:
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for r in history:
        assert 0.0 <= r["val_acc"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0
        assert r["train_loss"] > 0 and r["val_loss"] > 0 and r["lr"] > 0
        assert r["seconds"] > 0 and r["images_per_s"] > 0 and r["nan_skipped"] == 0
    assert history[0]["lr"] > history[-1]["lr"]  # one-cycle anneals to the end
    cfg = json.loads((out / "config_finetuned.json").read_text())
    assert cfg["config"]["width"] == 8 and cfg["config"]["batch_size"] == 64 and cfg["config"]["epochs"] == 3
    assert cfg["class_names"] == [str(i) for i in range(10)]
    assert cfg["resolved"]["steps_per_epoch"] == 6  # 360 training images / 64
    assert set(cfg["versions"]) >= {"python", "torch", "cnn_finetune"} and len(cfg["data_fingerprint"]) == 64
    report = json.loads((out / "data_report.json").read_text())
    assert report["split"] == {"train": 360, "val": 40, "seed": 42, "val_fraction": 0.1, "calibration": 10}
    assert report["train_source"]["num_images"] == 400 and report["train_source"]["num_skipped"] == 0
    assert sum(report["train_class_counts"].values()) == 360

    # The best model is usable without the config: class names, normalisation, architecture.
    from cnn_finetune.model.loading import load_model_file

    model, meta = load_model_file(out / "best_model_finetuned.pth")
    best_epoch = min(history, key=lambda r: (-r["val_acc"], r["val_loss"], r["epoch"]))
    assert meta["epoch"] == best_epoch["epoch"]
    assert meta["metrics"]["val_acc"] == pytest.approx(best_epoch["val_acc"])
    assert meta["class_names"] == cfg["class_names"] and meta["arch"] == "cnn_v2"
    assert meta["normalization"] == cfg["normalization"]
    assert [r["best"] for r in history].count(True) >= 1
    # the final checkpoint is marked finished and holds the whole history
    state = load_state(out / "checkpoint_last.pth")
    assert state["finished"]["reason"] == "completed" and len(state["history"]) == 3


def test_best_k_files_rotate_on_disk_and_survive_restarts(tiny_idx: Path, tmp_path: Path):
    args = [*FAST, "--data", str(tiny_idx), "--epochs", "6", "--keep-best", "2", "--lr", "0.01"]
    proc = run_cli([*args, "--output-dir", "full"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    history = json.loads((tmp_path / "full" / "history.json").read_text())
    ranked = sorted(history, key=lambda r: (-r["val_acc"], r["val_loss"], r["epoch"]))
    expected = {f"best_epoch{r['epoch']:03d}_val_acc{r['val_acc']:.4f}.pth" for r in ranked[:2]}
    on_disk = {p.name for p in (tmp_path / "full").glob("best_epoch*.pth")}
    assert on_disk == expected
    # at least one file was really written and later deleted: more than K epochs entered the top K
    entered, top = 0, []
    for r in history:
        rank = (-r["val_acc"], r["val_loss"], r["epoch"])
        if len(top) < 2 or rank < max(top):
            entered += 1
            top = sorted(top + [rank])[:2]
    assert entered > 2
    best = load_state(tmp_path / "full" / "best_model_finetuned.pth")
    top_file = load_state(tmp_path / "full" / f"best_epoch{ranked[0]['epoch']:03d}_val_acc{ranked[0]['val_acc']:.4f}.pth")
    assert all(torch.equal(best["model"][k], top_file["model"][k]) for k in best["model"])

    # Interrupted twice and resumed: the same files, the same best model.
    assert run_cli([*args, "--output-dir", "cut"], cwd=tmp_path, faults="sigint@8").returncode == 130
    assert run_cli([*args, "--output-dir", "cut"], cwd=tmp_path, faults="sigterm@21").returncode == 143
    proc = run_cli([*args, "--output-dir", "cut"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "cut").glob("best_epoch*.pth")} == expected
    assert_same_weights(tmp_path / "full" / "best_model_finetuned.pth", tmp_path / "cut" / "best_model_finetuned.pth")


def test_early_stopping_at_the_predicted_epoch_also_after_resume(tiny_idx: Path, tmp_path: Path):
    # min_delta 0.5 (50 points of accuracy): only the first epoch counts as an improvement,
    # so with patience 2 the run must stop after epoch 3 of 10.
    args = [*FAST, "--data", str(tiny_idx), "--epochs", "10", "--patience", "2", "--min-delta", "0.5"]
    proc = run_cli([*args, "--output-dir", "a"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "early stopping after epoch 3" in proc.stdout
    assert len(json.loads((tmp_path / "a" / "history.json").read_text())) == 3
    assert load_state(tmp_path / "a" / "checkpoint_last.pth")["finished"]["reason"] == "early_stopped"
    # interrupted in epoch 2, the early-stopping state comes back with the checkpoint
    assert run_cli([*args, "--output-dir", "b"], cwd=tmp_path, faults="sigint@8").returncode == 130
    proc = run_cli([*args, "--output-dir", "b"], cwd=tmp_path)
    assert proc.returncode == 0 and "early stopping after epoch 3" in proc.stdout
    assert stripped_history(tmp_path / "a") == stripped_history(tmp_path / "b")
    # running a finished run again does nothing and says how to start over
    before = digest_tree(tmp_path / "b")
    proc = run_cli([*args, "--output-dir", "b"], cwd=tmp_path)
    assert proc.returncode == 0 and "already finished" in proc.stdout and "--no-resume" in proc.stdout
    after = digest_tree(tmp_path / "b")
    assert {k: v for k, v in after.items() if k not in ("config_finetuned.json", "data_report.json")} == \
        {k: v for k, v in before.items() if k not in ("config_finetuned.json", "data_report.json")}


@pytest.mark.parametrize(
    "interruptions",
    [
        ["sigint@0", "sigterm@7", "kill@13"],  # first step, mid-epoch, a step with no save due
        ["sigint@5", "kill@11"],  # the last step of epoch 1 (saved before validation), a kill inside the end-of-epoch save
        ["kill@1", "kill@3", "kill@9"],  # kills inside periodic saves (every 2 steps), twice in a row
    ],
)
def test_resume_is_bit_exact_after_interruptions(reference_run: Path, tiny_idx: Path, tmp_path: Path, interruptions):
    args = [*FAST, "--data", str(tiny_idx), "--output-dir", "out"]
    if "kill@1" in interruptions:
        args += ["--checkpoint-every-steps", "2"]
    expected_codes = {"sigint": 130, "sigterm": 143, "kill": -9}
    for fault in interruptions:
        proc = run_cli(args, cwd=tmp_path, faults=fault)
        assert proc.returncode == expected_codes[fault.split("@")[0]], (fault, proc.stderr[-2000:])
        if fault.startswith("sig"):
            assert "Run the same command to continue" in proc.stderr
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(reference_run / "checkpoint_last.pth", tmp_path / "out" / "checkpoint_last.pth")
    assert stripped_history(reference_run) == stripped_history(tmp_path / "out")
    events = [e for r in json.loads((tmp_path / "out" / "history.json").read_text()) for e in r["events"]]
    assert sum(e["type"] == "resumed" for e in events) == len(interruptions)
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


def test_mismatched_resume_is_refused_without_touching_anything(tiny_idx: Path, tmp_path: Path):
    args = [*FAST, "--data", str(tiny_idx), "--output-dir", "out"]
    assert run_cli(args, cwd=tmp_path, faults="sigint@7").returncode == 130
    before = digest_tree(tmp_path / "out")
    proc = run_cli([*args, "--lr", "0.05"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "lr: checkpoint has 0.003, this run has 0.05" in proc.stderr and "--no-resume" in proc.stderr
    # other data: a different subset of the same images
    from cnn_finetune.data.loader import read_idx, write_idx

    other = tmp_path / "other"
    other.mkdir()
    imgs, labels = read_idx(tiny_idx), read_idx(tiny_idx.with_name("train-labels-idx1-ubyte.gz"))
    write_idx(other / "train-images-idx3-ubyte.gz", imgs[:-10])
    write_idx(other / "train-labels-idx1-ubyte.gz", labels[:-10])
    proc = run_cli([*FAST, "--data", str(other / "train-images-idx3-ubyte.gz"), "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 2 and "different data" in proc.stderr and "--no-resume" in proc.stderr
    assert digest_tree(tmp_path / "out") == before


def test_no_resume_moves_the_old_run_aside(tiny_idx: Path, tmp_path: Path):
    args = [*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--epochs", "1"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    before = digest_tree(tmp_path / "out")
    proc = run_cli([*args, "--no-resume"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(moved) == 1 and f"was moved to {moved[0].relative_to(tmp_path)}" in proc.stdout
    assert digest_tree(moved[0]) == before  # the old run is intact, byte for byte
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert len(history) == 1 and not any(e["type"] == "resumed" for e in history[0]["events"])


def test_files_of_an_unknown_run_are_not_overwritten(tiny_idx: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "best_model_finetuned.pth").write_bytes(b"someone's model")
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 2 and "no checkpoint to resume from" in proc.stderr and "--no-resume" in proc.stderr
    assert (out / "best_model_finetuned.pth").read_bytes() == b"someone's model"


def test_resume_removes_only_our_own_temporaries(tiny_idx: Path, tmp_path: Path):
    args = [*FAST, "--data", str(tiny_idx), "--output-dir", "out"]
    out = tmp_path / "out"
    assert run_cli(args, cwd=tmp_path, faults="sigint@7").returncode == 130
    users = {"budget.tmp-2024.xlsx": b"my budget", "notes.tmp-1": b"mine", "history.json.tmp-12.bak": b"mine too"}
    for name, content in users.items():
        (out / name).write_bytes(content)
    (out / "checkpoint_last.pth.tmp-999999").write_bytes(b"half a checkpoint")  # ours, left by a killed run
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "removed checkpoint_last.pth.tmp-999999, left by a run killed while writing it" in proc.stdout
    assert not (out / "checkpoint_last.pth.tmp-999999").exists()
    assert {name: (out / name).read_bytes() for name in users} == users
    assert "budget.tmp-2024.xlsx" not in proc.stdout


@pytest.fixture(scope="module")
def finished_run(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("finished")
    assert run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--epochs", "1"], cwd=work).returncode == 0
    return work


def _bad_config(work: Path) -> list[str]:
    (work / "bad.json").write_text(json.dumps({"lr": -0.1}))
    return ["--config", "bad.json"]


def _unknown_key(work: Path) -> list[str]:
    (work / "unknown.json").write_text(json.dumps({"epochz": 3}))
    return ["--config", "unknown.json"]


def _wrong_type(work: Path) -> list[str]:
    (work / "type.json").write_text(json.dumps({"batch_size": "big"}))
    return ["--config", "type.json"]


def _latin1_config(work: Path) -> list[str]:
    (work / "latin1.json").write_bytes('{"aug_rotation": 15, "data": "caf\xe9"}'.encode("latin-1"))
    return ["--config", "latin1.json"]


@pytest.mark.parametrize(
    "make_args, fragment",
    [
        (lambda w: ["--data", "no/such/folder"], "data path no/such/folder does not exist"),
        (_latin1_config, "config file latin1.json is not UTF-8 text: byte 0xe9 at line 1, column 34 cannot be decoded; save the file as UTF-8"),
        (lambda w: ["--seed", str(10**23)], f"seed={10**23} is out of range; use a whole number from 0 to 2**63-1"),
        (lambda w: ["--width", "30000"], "width=30000 is out of range; use 1 to 512 channels"),
        (lambda w: ["--width", "512", "--batch-size", "1000000"], "width=512 with batch_size=1000000 (eval_batch_size=1000) needs about"),
        (lambda w: ["--set", "lr=1" + "0" * 400], "lr is an integer of 401 digits, too large for a number"),
        (lambda w: ["--set", 'output_dir="a\\u0000b"'], "output_dir='a\\x00b' contains characters that no file name can hold"),
        (_bad_config, "lr=-0.1 must not be negative"),
        (_unknown_key, "unknown key(s) 'epochz' (did you mean 'epochs'?)"),
        (_wrong_type, "batch_size='big' has the wrong type: expected int"),
        (lambda w: ["--epochs", "0"], "epochs=0 must be a positive number"),
        (lambda w: ["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (lambda w: ["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
        (lambda w: ["--config", "missing.json"], "config file missing.json does not exist"),
        (lambda w: ["--base-model", "no/base.pth"], "base model no/base.pth does not exist"),
        (lambda w: ["--set", "aug_rotation"], "expected KEY=VALUE"),
        (lambda w: ["--set", "aug_elastic=-1.5"], "aug_elastic=-1.5 must not be negative"),
        (lambda w: ["--set", "aug_elastic=500.0"], "aug_elastic=500.0 pixels would tear the images apart; use 0 (off) to 100.0"),
        (lambda w: ["--set", "aug_elastic_sigma=0.1"], "aug_elastic_sigma=0.1 pixels is out of range; use 0.5 to 14.0"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_touches_nothing(finished_run: Path, tiny_idx: Path, make_args, fragment):
    work = finished_run
    before = digest_tree(work / "out")
    args = [*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--epochs", "1"]
    proc = run_cli([*args, *make_args(work)], cwd=work)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert digest_tree(work / "out") == before


def test_the_cache_sees_a_content_change_that_keeps_size_and_time(tmp_path: Path):
    """A rerun after cp -p or rsync -a put other pixels in place must not train on the cached old ones."""
    import os

    import numpy as np
    from PIL import Image

    from cnn_finetune.data.loader import load_dataset

    ds = load_dataset(None)
    for i in range(40):  # 20 images of each of two classes, as BMP: the size depends on the dimensions only
        (tmp_path / "data" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i, 0].numpy()).save(tmp_path / "data" / str(i % 2) / f"{i}.bmp")
    args = [*FAST, "--data", "data", "--output-dir", "out", "--epochs", "1", "--batch-size", "16"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    target = tmp_path / "data" / "0" / "0.bmp"
    st = target.stat()
    Image.fromarray(ds.images[100, 0].numpy()).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 2 and "was trained on different data" in proc.stderr, proc.stdout + proc.stderr
    assert "(cache miss)" in proc.stdout
    assert np.array_equal(np.asarray(Image.open(target)), ds.images[100, 0].numpy())


RSS_CLI = """
import resource, sys
from cnn_finetune.cli import main
code = main(sys.argv[1:])
print("peak RSS KiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def test_a_decompression_bomb_is_skipped_before_it_is_decoded(tmp_path: Path):
    """A 46 KB PNG of 13000 x 13000 pixels used to take 2.5 GB while decoded (peak RSS of this run)."""
    from PIL import Image

    from cnn_finetune.data.loader import load_dataset

    ds = load_dataset(None)
    for i in range(20):
        (tmp_path / "data" / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i, 0].numpy()).save(tmp_path / "data" / str(i % 2) / f"{i}.png")
    bomb = bomb_png(tmp_path / "data" / "0" / "bomb.png")
    assert bomb.stat().st_size < 60_000
    (tmp_path / "rss_cli.py").write_text(RSS_CLI)
    args = [*FAST, "--data", "data", "--output-dir", "out", "--epochs", "1", "--batch-size", "16"]
    proc = run_cli(args, cwd=tmp_path, script=tmp_path / "rss_cli.py")  # a subprocess of its own: its own peak
    assert proc.returncode == 0, proc.stderr
    reason = "image too large: 13000 x 13000 = 169,000,000 pixels, over the limit of 64,000,000 (max_image_pixels); not decoded"
    assert f"data/0/bomb.png: {reason}" in proc.stderr
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["train_source"]["skipped"] == [{"path": "data/0/bomb.png", "reason": reason}]
    peak_kib = int(proc.stdout.split("peak RSS KiB")[1].split()[0])
    assert peak_kib < 1_000_000, f"peak RSS {peak_kib / 1024:.0f} MiB: the image was decoded"
    # The limit is a config value: set below 28 x 28, no image is left (exit 2, naming the reason).
    proc = run_cli([*args, "--no-resume", "--set", "max_image_pixels=100"], cwd=tmp_path)
    assert proc.returncode == 2 and "image too large: 28 x 28 = 784 pixels, over the limit of 100" in proc.stderr


def test_the_largest_seed_trains_and_resumes(tiny_idx: Path, tmp_path: Path):
    """Every seed in the documented range works through the split, the initial weights and each step's draws."""
    args = [*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--epochs", "1", "--seed", str(2**63 - 1)]
    assert run_cli(args, cwd=tmp_path, faults="sigint@2").returncode == 130
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert load_state(tmp_path / "out" / "checkpoint_last.pth")["seed"] == 2**63 - 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_bad_input(finished_run: Path, tiny_idx: Path):
    before = digest_tree(finished_run / "out")
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--device", "cuda", "--no-resume"], cwd=finished_run)
    assert proc.returncode == 2
    assert "--device cuda was requested but CUDA is not available" in proc.stderr and "--device cpu" in proc.stderr
    assert digest_tree(finished_run / "out") == before
    assert not [p for p in finished_run.iterdir() if p.name.startswith("out.old-")]  # not even moved aside


def test_default_base_model_missing_is_a_notice(tiny_idx: Path, tmp_path: Path):
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--epochs", "1"], cwd=tmp_path)
    assert proc.returncode == 0
    assert "note: no base model at models/cnn_modelo_v2/best_model.pth: training from scratch" in proc.stdout


def test_fine_tuning_from_a_base_model_with_other_classes(tiny_idx: Path, tmp_path: Path):
    """Base: 10 digits. Fine-tune on an image folder of 4 classes, two of them digits."""
    from PIL import Image

    from cnn_finetune.data.loader import read_idx

    assert run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "base", "--epochs", "2"], cwd=tmp_path).returncode == 0
    imgs, labels = read_idx(tiny_idx), read_idx(tiny_idx.with_name("train-labels-idx1-ubyte.gz"))
    for cls, digit in (("3", 3), ("7", 7), ("x", 1), ("y", 0)):
        folder = tmp_path / "data" / "processed" / cls
        folder.mkdir(parents=True)
        for i in [j for j in range(len(labels)) if labels[j] == digit][:30]:
            Image.fromarray(imgs[i]).save(folder / f"{i}.png")
    args = [*FAST, "--data", "data", "--output-dir", "ft", "--epochs", "1", "--base-model", "base/best_model_finetuned.pth",
            "--freeze-features-epochs", "1"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "feature layers loaded, classifier head new (2 of 4 classes carried over)" in proc.stdout
    base = load_state(tmp_path / "base" / "best_model_finetuned.pth")["model"]
    tuned = load_state(tmp_path / "ft" / "checkpoint_last.pth")["model"]
    # frozen for the only epoch: features (and their batch-norm statistics) equal the base model's
    for k in base:
        if k.startswith("features."):
            assert torch.equal(base[k], tuned[k]), k
    assert tuned["head.weight"].shape == (4, 32)
    assert not torch.equal(tuned["head.weight"][0], base["head.weight"][3])  # the head did train
    shutil.rmtree(tmp_path / "ft")


@pytest.fixture(scope="module")
def imbalanced(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Class 9 kept at 8 of 40 images; and a separate validation set as a PNG folder."""
    from PIL import Image

    from cnn_finetune.data.loader import read_idx, write_idx

    imgs, labels = read_idx(tiny_idx), read_idx(tiny_idx.with_name("train-labels-idx1-ubyte.gz"))
    keep = [i for i in range(len(labels)) if labels[i] != 9 or i % 5 == 0]
    folder = tmp_path_factory.mktemp("imbalanced")
    write_idx(folder / "train-images-idx3-ubyte.gz", imgs[keep])
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[keep])
    val = folder / "val"
    for i in range(0, len(labels), 10):
        (val / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(imgs[i]).save(val / str(labels[i]) / f"{i}.png")
    return folder / "train-images-idx3-ubyte.gz", val


@pytest.mark.parametrize("balance", ["sampler", "weighted_loss"])
def test_class_balancing_runs_and_resumes_exactly(imbalanced, tmp_path: Path, balance: str):
    train, val = imbalanced
    args = [*FAST, "--data", str(train), "--val-data", str(val), "--balance", balance, "--epochs", "2"]
    proc = run_cli([*args, "--output-dir", "full", "--verbose"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "9: 8  [imbalanced: largest/smallest = 5.0; see --balance]" in proc.stdout
    assert "epoch 1/2" in proc.stderr  # the --verbose progress bar
    report = json.loads((tmp_path / "full" / "data_report.json").read_text())
    assert report["split"]["val"] == 40 and report["val_source"]["kind"] == "folder"
    assert report["train_class_counts"]["9"] == 8 and report["split"]["train"] == 368
    assert run_cli([*args, "--output-dir", "cut"], cwd=tmp_path, faults="sigint@7").returncode == 130
    assert run_cli([*args, "--output-dir", "cut"], cwd=tmp_path).returncode == 0
    assert_same_weights(tmp_path / "full" / "checkpoint_last.pth", tmp_path / "cut" / "checkpoint_last.pth")


def test_test_data_is_evaluated_with_the_best_model(reference_run: Path, tiny_idx: Path, tmp_path: Path):
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--test-data", str(tiny_idx)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    test = json.loads((tmp_path / "out" / "test_evaluation.json").read_text())
    assert test["num_samples"] == 400 and sum(map(sum, test["confusion_matrix"])) == 400
    assert f"test accuracy {100 * test['accuracy']:.2f}% on 400 images" in proc.stdout
    assert (tmp_path / "out" / "test_confusion_matrix.png").stat().st_size > 1000
    assert "Test accuracy" in (tmp_path / "out" / "model_card.md").read_text()
    # --test-data never influences training: the weights equal a run without it
    assert_same_weights(reference_run / "checkpoint_last.pth", tmp_path / "out" / "checkpoint_last.pth")


def test_time_based_checkpoints_bound_what_a_crash_loses(tiny_idx: Path, tmp_path: Path):
    # A save is due after every step once 1 ms has passed; the kill after step 3 strikes inside the
    # save of step 3, so the checkpoint on disk must be the one written after step 2 (global step 3).
    # The previous-checkpoint link was already updated to it when the killed write began.
    args = [*FAST[:-2], "--data", str(tiny_idx), "--output-dir", "out", "--checkpoint-every-seconds", "0.001"]
    assert FAST[-2:] == ["--set", "checkpoint_every_seconds=0"]
    assert run_cli(args, cwd=tmp_path, faults="kill@3").returncode == -9
    assert load_state(tmp_path / "out" / "checkpoint_last.pth")["position"]["global_step"] == 3
    assert load_state(tmp_path / "out" / "checkpoint_prev.pth")["position"]["global_step"] == 3


def test_no_resume_with_an_unusable_base_model_moves_nothing(finished_run: Path, tiny_idx: Path):
    before = digest_tree(finished_run / "out")
    (finished_run / "garbage.pth").write_bytes(b"not a model")
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--no-resume", "--base-model", "garbage.pth"],
                   cwd=finished_run)
    assert proc.returncode == 2 and "base model cannot be used" in proc.stderr
    assert digest_tree(finished_run / "out") == before
    assert not [p for p in finished_run.iterdir() if p.name.startswith("out.old-")]


def test_a_folder_with_foreign_reports_but_no_checkpoint_is_not_overwritten(tiny_idx: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_card.md").write_text("my notes")
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out"], cwd=tmp_path)
    assert proc.returncode == 2 and "model_card.md" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["model_card.md"]


def test_a_base_model_with_non_finite_weights_is_bad_input(reference_run: Path, tiny_idx: Path, tmp_path: Path):
    from cnn_finetune.files.checkpoint import save_checkpoint

    state = load_state(reference_run / "best_model_finetuned.pth")
    state["model"]["head.bias"][3] = float("nan")
    save_checkpoint(state, tmp_path / "nan_model.pth")
    proc = run_cli([*FAST, "--data", str(tiny_idx), "--output-dir", "out", "--base-model", "nan_model.pth"], cwd=tmp_path)
    assert proc.returncode == 2 and "base model nan_model.pth holds NaN/Inf weights" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_base_model_none_trains_from_scratch_even_when_the_default_exists(reference_run: Path, tiny_idx: Path, tmp_path: Path):
    default = tmp_path / "models" / "cnn_modelo_v2"
    default.mkdir(parents=True)
    shutil.copy(reference_run / "best_model_finetuned.pth", default / "best_model.pth")
    args = [*FAST, "--data", str(tiny_idx), "--epochs", "1"]
    proc = run_cli([*args, "--output-dir", "a"], cwd=tmp_path)
    assert proc.returncode == 0 and "fine-tuning from models/cnn_modelo_v2/best_model.pth: all layers loaded" in proc.stdout
    proc = run_cli([*args, "--output-dir", "b", "--base-model", "none"], cwd=tmp_path)
    assert proc.returncode == 0 and "; training from scratch" in proc.stdout and "fine-tuning" not in proc.stdout
    assert load_state(tmp_path / "b" / "best_model_finetuned.pth")["init"] == "training from scratch"
