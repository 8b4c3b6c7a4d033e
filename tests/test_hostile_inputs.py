"""Hostile input files, through the real commands: FIFOs where files should be, sizes that lie,
a damaged data cache, edited model files, CSV cells and labels past Python's limits, and labels
lists that reach outside their folder (issue 20, the input cases).

Each test runs train_finetuned.py (``conftest.run_cli``), evaluate.py, predict.py or export.py
(their ``main``) on a file made to be hostile, and asserts on the exit code, the message and the
data report. Where the bug was a hang, the command runs in a thread that must finish in time.
"""

from __future__ import annotations

import io
import json
import os
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, finished_run, run_cli

from cnn_finetune.data.loader import load_dataset

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes (FIFOs) need a POSIX system")


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``, which must return within ``seconds``: a read that blocks on a FIFO fails the test
    instead of hanging it (the blocked thread is a daemon, left behind)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised below, in the test's thread
            box["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s: blocked on a FIFO?"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="module")
def digits(tiny_idx: Path) -> tuple[np.ndarray, np.ndarray]:
    """The tiny set's 400 real MNIST digits (uint8 N x 28 x 28) and labels."""
    ds = load_dataset(tiny_idx, use_cache=False)
    return ds.images[:, 0].numpy(), ds.labels.numpy()


@pytest.fixture(scope="module")
def model_file(tiny_idx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best_model_finetuned.pth of a one-epoch FAST run on the tiny set."""
    return finished_run([*FAST, "--epochs", "1", "--data", str(tiny_idx)], tmp_path_factory, "hostile_model") / "best_model_finetuned.pth"


def png_folder(root: Path, digits: tuple[np.ndarray, np.ndarray], per_class: int = 12) -> Path:
    """Class folders 0/ and 1/ of real digits as 28x28 PNG files (white strokes on black)."""
    images, labels = digits
    for c in (0, 1):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i, k in enumerate(np.flatnonzero(labels == c)[:per_class]):
            Image.fromarray(images[k]).save(root / str(c) / f"{i}.png")
    return root


def report_of(out: Path) -> dict:
    return json.loads((out / "data_report.json").read_text())["train_source"]


def predict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict], str]:
    from cnn_finetune.tools.predict import main

    code = main([*args, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else [], captured.err


# ------------------------------------------------------------------------------------------------
# Case 4: FIFOs, sockets and devices are skipped without being opened


@needs_fifo
def test_a_fifo_in_a_class_folder_is_skipped_by_training_and_evaluation(digits, model_file: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cnn_finetune.tools.evaluate import main as evaluate_main

    root = png_folder(tmp_path / "data", digits)
    fifo = root / "0" / "stuck.png"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it for reading blocks forever
    proc = within(60, lambda: run_cli([*FAST, "--epochs", "1", "--data", str(root), "--output-dir", "out"], tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = report_of(tmp_path / "out")
    assert report["num_images"] == 24
    assert {"path": str(fifo), "reason": "a FIFO (named pipe), not an image file: skipped without opening it"} in report["skipped"]
    assert within(60, lambda: evaluate_main(["--model", str(model_file), "--data", str(root), "--output-dir", str(tmp_path / "ev")])) == 0
    assert "a FIFO (named pipe)" in capsys.readouterr().err + (tmp_path / "ev" / "evaluation.json").read_text()


@needs_fifo
def test_a_fifo_or_device_as_model_base_model_or_image_is_refused_at_once(digits, model_file: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)
    image = png_folder(tmp_path / "imgs", digits, per_class=1) / "0" / "0.png"
    for model in (fifo, Path("/dev/zero")):  # a FIFO blocks; /dev/zero never ends
        code, _, err = within(30, lambda: predict(capsys, "--model", str(model), str(image)))
        assert code == 2 and f"--model {model} is a" in err and "not a model file" in err, err
    proc = within(60, lambda: run_cli([*FAST, "--base-model", str(fifo), "--output-dir", "out"], tmp_path))
    assert proc.returncode == 2 and f"--base-model {fifo} is a FIFO (named pipe), not a model file" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
    # A FIFO among the images to predict: one error line, the other images predicted.
    pipe = image.parent / "pipe.png"
    os.mkfifo(pipe)
    code, records, _ = within(30, lambda: predict(capsys, "--model", str(model_file), str(image.parent)))
    assert code == 0 and [r["file"] for r in records] == [str(image), str(pipe)]
    assert records[0]["error"] is None and records[1]["error"] == "a FIFO (named pipe), not an image file: skipped without opening it"


@needs_fifo
def test_a_fifo_beside_an_idx_file_or_as_data_is_exit_2(tiny_idx: Path, tmp_path: Path) -> None:
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(tiny_idx.read_bytes())
    os.mkfifo(tmp_path / "train-labels-idx1-ubyte.gz")
    proc = within(60, lambda: run_cli([*FAST, "--data", str(images), "--output-dir", "out"], tmp_path))
    assert proc.returncode == 2 and "a FIFO (named pipe), not a regular file" in proc.stderr and "Traceback" not in proc.stderr
    os.mkfifo(tmp_path / "data.npz")
    proc = within(60, lambda: run_cli([*FAST, "--data", str(tmp_path / "data.npz"), "--output-dir", "out"], tmp_path))
    assert proc.returncode == 2 and f"data path {tmp_path / 'data.npz'} is a FIFO (named pipe)" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@needs_fifo
def test_a_fifo_device_or_huge_file_as_config_is_exit_2_without_blocking(tiny_idx: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "config.json")  # reading it would wait for a writer forever
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (2 << 20) + b"{}")
    for config, message in ((tmp_path / "config.json", "is not a regular file"), (Path("/dev/zero"), "is not a regular file"),
                            (big, "is 2,097,154 bytes, more than a config can be")):
        proc = within(60, lambda: run_cli([*FAST, "--data", str(tiny_idx), "--config", str(config), "--output-dir", "out"], tmp_path))
        assert proc.returncode == 2 and f"config file {config} {message}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Case 6: sizes are checked before anything is allocated


def forged_model(model_file: Path, path: Path, **changes: Any) -> Path:
    """``model_file`` saved again as ``path`` (.pth or .safetensors) with ``changes`` to its state and a
    fresh, valid checksum: what anyone can do, since the checksum has no key."""
    from cnn_finetune.files.checkpoint import load_checkpoint, save_checkpoint, save_safetensors

    state = {**load_checkpoint(model_file), **changes}
    if path.suffix == ".safetensors":
        save_safetensors(state, path)
    else:
        save_checkpoint(state, path)
    return path


def test_a_model_file_claiming_width_1500_is_refused_before_the_model_is_built(digits, model_file: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from cnn_finetune.files.checkpoint import load_checkpoint
    from cnn_finetune.tools.export import main as export_main

    params = load_checkpoint(model_file)["arch_params"]
    image = png_folder(tmp_path / "imgs", digits, per_class=1) / "0" / "0.png"
    for suffix in (".safetensors", ".pth"):
        forged = forged_model(model_file, tmp_path / f"wide{suffix}", arch_params={**params, "width": 1500})
        code, _, err = predict(capsys, "--model", str(forged), str(image))
        assert code == 2 and f"model file {forged} says width=1500, outside 1 to 512" in err and "nothing was built" in err, err
    forged = forged_model(model_file, tmp_path / "odd.safetensors", arch_params={**params, "depth": 7})
    assert export_main(["--model", str(forged), "--output-dir", str(tmp_path / "exp")]) == 2
    assert f"model file {forged} has unusable architecture parameters" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_an_npz_whose_header_claims_a_billion_images_is_exit_2(tmp_path: Path) -> None:
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(liar, "w") as z:  # under 1 KB, claiming 784 GB
        z.writestr("x_train.npy", npy_header((10**9, 28, 28)) + bytes(100))
        z.writestr("y_train.npy", npy_header((10**9,)) + bytes(100))
    assert liar.stat().st_size < 1000
    proc = run_cli([*FAST, "--data", str(liar), "--output-dir", "out"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"x_train in {liar}: its header claims shape (1000000000, 28, 28) of uint8, 784 GB, but the file holds 100 data bytes" \
        in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_npz_zip_bomb_is_refused_before_it_is_unpacked(tmp_path: Path) -> None:
    bomb, n = tmp_path / "bomb.npz", 350_000  # 274 MB of blank images packed into about 270 KB
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x_test.npy", "w", force_zip64=True) as member:
            member.write(npy_header((n, 28, 28)))
            for _ in range(n // 1000):
                member.write(bytes(784 * 1000))
        z.writestr("y_test.npy", npy_header((n,)) + bytes(n))
    assert bomb.stat().st_size < 2_000_000
    proc = run_cli([*FAST, "--data", str(bomb) + ":test", "--output-dir", "out"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"x_test in {bomb}: its header claims shape ({n}, 28, 28) of uint8, 0.274 GB, packed into" in proc.stderr
    assert "a zip bomb of blank images, not a data set; refused before unpacking" in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Case 7: a damaged data cache is noticed, reported and rebuilt


def test_a_damaged_cache_is_rebuilt_not_used(model_file: Path, tiny_idx: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from cnn_finetune.files.checkpoint import load_checkpoint
    from cnn_finetune.tools.evaluate import main as evaluate_main

    cache = tmp_path / "cache"
    monkeypatch.setenv("CNN_FINETUNE_CACHE", str(cache))

    def evaluate(name: str) -> tuple[dict, str]:
        assert evaluate_main(["--model", str(model_file), "--data", str(tiny_idx), "--output-dir", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name / "evaluation.json").read_text()), capsys.readouterr().err

    first, _ = evaluate("first")
    [file] = cache.glob("*.pt")
    labels = load_checkpoint(file)["labels"]
    data = file.read_bytes()
    at = data.find(labels.numpy().tobytes())  # torch.save stores tensors uncompressed
    assert at > 0
    flipped = labels.clone()
    flipped[:50] = (flipped[:50] + 1) % 10  # 50 of 400 labels now wrong
    file.write_bytes(data[:at] + flipped.numpy().tobytes() + data[at + len(flipped.numpy().tobytes()):])
    second, err = evaluate("second")
    assert f"warning: data cache {file} cannot be used ({file} fails its checksum" in err and "rebuilding it from the sources" in err
    assert second["accuracy"] == first["accuracy"] and second["predictions"] == first["predictions"]
    assert torch.equal(load_checkpoint(file)["labels"], labels)  # replaced by a file that verifies
    third, err = evaluate("third")
    assert "data cache" not in err and third["accuracy"] == first["accuracy"]


# ------------------------------------------------------------------------------------------------
# Case 8: the safetensors checksum covers the metadata; normalisation and NaN weights are checked


def resaved(exported: Path, path: Path, **meta: Any) -> Path:
    """``exported`` with metadata entries replaced (JSON-encoded), weights and checksum as they were:
    an edit by hand or by another tool."""
    from safetensors.torch import load, save

    data = exported.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    header.update({k: json.dumps(v) for k, v in meta.items()})
    path.write_bytes(save(load(data), metadata=header))
    return path


@pytest.fixture(scope="module")
def exported(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cnn_finetune.tools.export import main

    out = tmp_path_factory.mktemp("hostile_export")
    assert main(["--model", str(model_file), "--output-dir", str(out), "--no-onnx"]) == 0
    return out / "best_model_finetuned.safetensors"


def test_edited_safetensors_metadata_fails_the_checksum(digits, exported: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from cnn_finetune.tools.export import main as export_main

    capsys.readouterr()
    meta = json.loads(json.loads(exported.read_bytes()[8:8 + int.from_bytes(exported.read_bytes()[:8], "little")])
                      ["__metadata__"]["class_names"])
    image = png_folder(tmp_path / "imgs", digits, per_class=1) / "0" / "0.png"
    assert predict(capsys, "--model", str(exported), str(image))[0] == 0
    edits = {"swapped": {"class_names": [meta[1], meta[0], *meta[2:]]}, "mean": {"normalization": {"mean": 0.5, "std": 0.3}}}
    for name, edit in edits.items():
        bad = resaved(exported, tmp_path / f"{name}.safetensors", **edit)
        code, _, err = predict(capsys, "--model", str(bad), str(image))
        assert code == 2 and f"{bad} fails its checksum: its weights or metadata" in err, err
        assert export_main(["--model", str(bad), "--output-dir", str(tmp_path / "re")]) == 2
        assert "fails its checksum" in capsys.readouterr().err
    assert not (tmp_path / "re").exists()


def test_a_safetensors_file_of_the_previous_format_is_refused_clearly(exported: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load, save

    from cnn_finetune.files.checkpoint import content_digest

    data = exported.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    weights = load(data)
    old = tmp_path / "old.safetensors"  # as version 1 wrote it: the digest over the weights only
    old.write_bytes(save(weights, metadata={**header, "cnn_finetune": "cnn_finetune/safetensors/1", "sha256": content_digest(weights)}))
    code, _, err = predict(capsys, "--model", str(old), str(tmp_path))
    assert code == 2 and "written by an earlier version of this program (cnn_finetune/safetensors/1)" in err
    assert "export it again from its .pth with export.py" in err


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("norm", [{"mean": 0.13, "std": 0.0}, {"mean": float("nan"), "std": 0.3}])
def test_a_model_with_std_0_or_a_nan_mean_is_exit_2(digits, model_file: Path, tmp_path: Path, suffix: str, norm: dict,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    forged = forged_model(model_file, tmp_path / f"norm{suffix}", normalization=norm)
    image = png_folder(tmp_path / "imgs", digits, per_class=1) / "0" / "0.png"
    code, records, err = predict(capsys, "--model", str(forged), str(image))
    assert code == 2 and records == [] and f"model file {forged} has an unusable normalisation" in err, err


def test_a_safetensors_base_model_with_nan_weights_is_exit_2_like_its_pth(model_file: Path, tiny_idx: Path,
                                                                          tmp_path: Path) -> None:
    from cnn_finetune.files.checkpoint import load_checkpoint

    weights = dict(load_checkpoint(model_file)["model"])
    key = next(k for k, v in weights.items() if k.startswith("features.") and v.is_floating_point())
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    for suffix in (".pth", ".safetensors"):
        base = forged_model(model_file, tmp_path / f"nan{suffix}", model=weights)
        proc = run_cli([*FAST, "--data", str(tiny_idx), "--base-model", str(base), "--output-dir", f"out{suffix}"], tmp_path)
        assert proc.returncode == 2 and f"base model {base} holds NaN/Inf weights" in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / f"out{suffix}").exists()


# ------------------------------------------------------------------------------------------------
# Case 9: CSV cells over the csv module's limit, labels past int()'s limit, labels that are not text;
# quoted cells read as CSV quotes them (case 11's label "a,b")

HEADER = "label," + ",".join(f"pixel{i}" for i in range(784))
HUGE = "x" * 200_000  # over the csv module's 131,072 characters
LONG_NUMBER = "1" * 5000  # over int()'s 4,300 digits


def pixel_row(label: object, image: np.ndarray) -> str:
    return ",".join([str(label), *map(str, image.ravel().tolist())])


def test_csv_cells_and_labels_past_the_limits_are_skipped_rows(digits, model_file: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = digits
    rows = [pixel_row(lab, img) for img, lab in zip(images, labels)]
    train = tmp_path / "train.csv"
    train.write_text("\n".join([HEADER, *rows[:200], pixel_row(LONG_NUMBER, images[0]), pixel_row(f'"{HUGE}"', images[1]),
                                *rows[200:]]) + "\n")
    proc = run_cli([*FAST, "--epochs", "1", "--data", str(train), "--output-dir", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = report_of(tmp_path / "out")
    assert report["num_images"] == 400 and report["class_names"] == [str(d) for d in range(10)]
    assert [s["reason"] for s in report["skipped"]] == [
        "line 202: label of 5,000 characters ('11111111111111111111'...); a class name has at most 255",
        "line 203: label of 200,000 characters ('xxxxxxxxxxxxxxxxxxxx'...); a class name has at most 255"]
    # A CSV whose first line holds a cell over the csv module's limit: one error line in predict.py,
    # the other files still predicted; evaluate.py and training refuse it by name.
    big = tmp_path / "big.csv"
    big.write_text(pixel_row(f'"{HUGE}"', images[0]) + "\n")
    good = tmp_path / "good.csv"
    good.write_text("\n".join(rows[:3]) + "\n")
    code, records, err = predict(capsys, "--model", str(model_file), str(big), str(good))
    assert code == 0 and "Traceback" not in err and [r["file"] for r in records] == [str(big), *(f"{good}:{n}" for n in (1, 2, 3))]
    assert records[0]["error"].startswith(f"{big} is not a CSV of 28x28 images") and all(r["error"] is None for r in records[1:])
    proc = run_cli([*FAST, "--data", str(big), "--output-dir", "big_out"], tmp_path)
    assert proc.returncode == 2 and f"{big} is not a CSV of 28x28 images" in proc.stderr and "Traceback" not in proc.stderr


def test_labels_csv_rows_past_the_limits_are_skipped(digits, tmp_path: Path) -> None:
    root = png_folder(tmp_path / "flat", digits)
    lines = ["filename,label"] + [f"{c}/{i}.png,{c}" for c in (0, 1) for i in range(12)]
    lines[5] = f"0/4.png,{LONG_NUMBER}"
    lines.insert(8, f"{HUGE},3")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    proc = run_cli([*FAST, "--epochs", "1", "--data", str(root), "--output-dir", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = report_of(tmp_path / "out")
    assert report["num_images"] == 23 and report["class_names"] == ["0", "1"]
    reasons = [s["reason"] for s in report["skipped"]]
    assert "line 6: 0/4.png: label of 5,000 characters ('11111111111111111111'...); a class name has at most 255" in reasons
    assert "line 9: a cell of over 131,072 characters: not a file name and a label" in reasons


def test_npz_labels_past_int_limits_or_not_utf8_are_skipped(digits, tmp_path: Path) -> None:
    images, labels = digits
    names = np.array([str(v).encode() for v in labels], dtype="S5000")
    names[3], names[7] = LONG_NUMBER.encode(), b"\xff\xfe7"
    path = tmp_path / "data.npz"
    np.savez(path, x_train=images, y_train=names)
    proc = run_cli([*FAST, "--epochs", "1", "--data", str(path), "--output-dir", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = report_of(tmp_path / "out")
    assert report["num_images"] == 398 and report["class_names"] == [str(d) for d in range(10)]
    assert [s["reason"] for s in report["skipped"]] == [
        "x_train[3]: label of 5,000 characters ('11111111111111111111'...); a class name has at most 255",
        "x_train[7]: label y_train[7] is bytes that are not UTF-8 text; save class names as UTF-8 (or class numbers)"]


def test_a_quoted_label_with_a_comma_is_a_class_name(digits, tmp_path: Path) -> None:
    images, labels = digits
    lines = [HEADER] + [pixel_row('"a,b"' if lab == 3 else lab, img) for img, lab in zip(images, labels)]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    proc = run_cli([*FAST, "--epochs", "1", "--data", str(tmp_path / "train.csv"), "--output-dir", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = report_of(tmp_path / "out")
    assert report["num_skipped"] == 0 and report["class_counts"]["a,b"] == 40 and "3" not in report["class_names"]


# ------------------------------------------------------------------------------------------------
# Case 11: labels lists that reach outside their folder, what a listed entry is, big ICC profiles,
# too many threads


def test_labels_csv_rows_outside_its_folder_are_skipped_with_a_warning(digits, tmp_path: Path) -> None:
    root = png_folder(tmp_path / "flat", digits)
    secret = tmp_path / "secret.png"  # beside the data folder: a labels list must not reach it
    Image.fromarray(digits[0][0]).save(secret)
    (root / "link.png").symlink_to(secret)
    (root / "sub").mkdir()
    lines = ["filename,label"] + [f"{c}/{i}.png,{c}" for c in (0, 1) for i in range(12)]
    lines += ["../secret.png,0", f"{secret},1", "link.png,0", "sub,1", "0/../../secret.png,0"]
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.png")
        lines.append("pipe.png,1")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    proc = within(60, lambda: run_cli([*FAST, "--epochs", "1", "--data", str(root), "--output-dir", "out"], tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = report_of(tmp_path / "out")
    assert report["num_images"] == 24
    reasons = {s["reason"] for s in report["skipped"]}
    real_root = os.path.realpath(root)
    for line, how in ((26, "../secret.png is a path that climbs out of the folder"), (27, f"{secret} is an absolute path"),
                      (28, "link.png is a symbolic link that leads out of the folder"),
                      (30, "0/../../secret.png is a path that climbs out of the folder")):
        assert f"line {line}: {how} ({os.path.realpath(secret)}); list only files inside {real_root}, or copy them there" in reasons
    assert f"{root}/labels.csv: 4 row(s) name files outside {root}, skipped" in proc.stderr
    by_path = {s["path"]: s["reason"] for s in report["skipped"]}
    assert by_path[str(root / "sub")] == "a folder, not an image file: skipped without opening it (listed on line 29 of labels.csv)"
    if hasattr(os, "mkfifo"):
        assert by_path[str(root / "pipe.png")] == ("a FIFO (named pipe), not an image file: skipped without opening it "
                                                   "(listed on line 31 of labels.csv)")


def test_a_png_with_a_10_mb_icc_profile_gets_the_right_reason(digits, tmp_path: Path) -> None:
    root = png_folder(tmp_path / "data", digits)
    icc = root / "1" / "icc.png"
    Image.fromarray(digits[0][0]).save(icc, icc_profile=os.urandom(10 << 20))
    proc = run_cli([*FAST, "--epochs", "1", "--data", str(root), "--output-dir", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [entry] = report_of(tmp_path / "out")["skipped"]
    assert entry == {"path": str(icc), "reason": "a metadata chunk (ICC colour profile or text) unpacks to more than Pillow's limit "
                     "of 1,048,576 bytes: a damaged or hostile file, not decoded; save the image again without its profile"}


def test_more_threads_than_cores_are_capped_with_a_warning(tiny_idx: Path, tmp_path: Path) -> None:
    from cnn_finetune.runtime import available_cores

    proc = run_cli([*FAST, "--epochs", "1", "--data", str(tiny_idx), "--num-threads", "4096", "--output-dir", "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cores = available_cores()
    warning = (f"warning: --num-threads 4096 is more than the {cores} CPU core(s) this process may use; using {cores} "
               "(more threads than cores only slow torch down)")
    assert proc.stderr.count(warning) == 1, proc.stderr[-2000:]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_model_with_nan_weights_is_exit_2_for_predict_not_nan_answers(digits, model_file: Path, tmp_path: Path, suffix: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cnn_finetune.files.checkpoint import load_checkpoint

    weights = dict(load_checkpoint(model_file)["model"])
    weights["head.bias"] = weights["head.bias"].clone()
    weights["head.bias"][0] = float("inf")
    forged = forged_model(model_file, tmp_path / f"nanmodel{suffix}", model=weights)
    image = png_folder(tmp_path / "imgs", digits, per_class=1) / "0" / "0.png"
    code, records, err = predict(capsys, "--model", str(forged), str(image))
    assert code == 2 and records == [] and f"model file {forged} holds NaN/Inf weights" in err, err
