"""Property-based fuzzing of everything that reads a user's input: the config file and ``--set``
values, IDX files, image files, file and folder names (any bytes), and ``TRAIN_FAULTS``.

The property everywhere: an input gives exit 0, or exit 2 with a message that names it; never a
traceback. The entry points are the real ones: ``cli.main`` in this process for the config and the
flags (with a data path that does not exist, so that a valid config stops at the data, cheaply),
``data_loader.load_dataset`` for data (which may raise only ``UserError``), and a few end-to-end
training runs on fuzzed image folders. In CI the ``ci`` profile of ``tests/conftest.py`` runs a
bounded, fixed set of examples (``derandomize``); ``HYPOTHESIS_PROFILE=long`` (and ``FUZZ_EXAMPLES=N``)
explores more locally. Every problem the fuzzing found is kept below as an ``@example``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import math
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, run_cli_in_process

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cnn_finetune.files.checkpoint import atomic_write_json
from cnn_finetune.config import MAX_SEED, TrainConfig
from cnn_finetune.data.loader import IDX_DTYPES, load_dataset, stratified_split
from cnn_finetune.errors import UserError
from cnn_finetune.training.faults import KINDS, FaultInjector
from cnn_finetune.data.imageprep import IMAGE_EXTENSIONS
from cnn_finetune.log import printable
from cnn_finetune.training.mechanisms import mix_seed

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
MISSING_DATA = "no_such_data"


def names_of(*items: object) -> list[str]:
    """Ways a message may name an input: as typed, quoted, shown escaped, or as the path it makes."""
    out = []
    for item in items:
        text = str(item)
        out += [text, repr(item), printable(text), printable(repr(item))]
        if isinstance(item, str) and item and "\0" not in item:
            out.append(str(Path(item)))
    return [n for n in out if n]


def assert_exit_2_naming(proc, *inputs: object) -> None:
    """Exit 2, a one-line error that names one of ``inputs``, and no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
    assert any(n in err for n in names_of(*inputs)), err[-3000:]


# --- config file and --set values ----------------------------------------------------------------

EDGE_NUMBERS = st.sampled_from([0, 1, -1, 0.5, -0.0, 2**31, 2**63 - 1, 2**63, 2**64, 10**23, 10**400, 1e300,
                                float("nan"), float("inf"), float("-inf")])
SURROGATE_TEXT = st.binary(max_size=12).map(os.fsdecode)  # what a non-UTF-8 file name or argv becomes in Python
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), EDGE_NUMBERS, st.text(max_size=16),
                         SURROGATE_TEXT, st.sampled_from(["cuda", "cuda:7", "auto", "cpu", "none", "", ".", "\0", "\ud800"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=4)
CONFIG_KEYS = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12), SURROGATE_TEXT)


def fuzz_cli(args: list[str], **env: str):
    """``cli.main`` in a fresh temporary folder, with a data path that does not exist. The last ``--set``
    wins over the fuzzed ones: ``--set data=null`` would otherwise train on the built-in sample."""
    with tempfile.TemporaryDirectory() as work:
        return run_cli_in_process([*args, "--base-model", "none", "--output-dir", "out", "--set", f"data={MISSING_DATA}"],
                                  Path(work), **env)


@given(values=st.dictionaries(CONFIG_KEYS, JSON_VALUES, max_size=6))
@example(values={"lr": 10**400})  # float(int) overflowed: OverflowError traceback
@example(values={"seed": 10**23})
@example(values={"width": 30000})
@example(values={"num_threads": 2**40})  # torch.set_num_threads: ValueError traceback
@example(values={"output_dir": "a\0b"})
@example(values={"cache_dir": "\ud800"})
def test_any_config_file_is_used_or_refused_by_name(values: dict) -> None:
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "cfg.json").write_text(json.dumps(values))  # ensure_ascii: lone surrogates survive as \\udXXX
        proc = run_cli_in_process(["--config", "cfg.json", "--data", MISSING_DATA, "--base-model", "none"], Path(work))
    assert_exit_2_naming(proc, MISSING_DATA, "cfg.json", *values, *[v for v in values.values() if isinstance(v, str)])


@given(raw=st.binary(max_size=200) | st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")))
@example(raw=b'{"lr": 0.1, "data": "caf\xe9"}')  # Latin-1: UnicodeDecodeError traceback
def test_any_config_file_bytes_are_used_or_refused_by_name(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "cfg.json").write_bytes(raw)
        proc = run_cli_in_process(["--config", "cfg.json", "--data", MISSING_DATA, "--base-model", "none"], Path(work))
    assert_exit_2_naming(proc, MISSING_DATA, "cfg.json")


SET_ITEMS = st.one_of(
    st.tuples(CONFIG_KEYS, JSON_VALUES.map(json.dumps)).map("=".join),
    st.tuples(CONFIG_KEYS, st.text(max_size=12) | SURROGATE_TEXT).map("=".join),
    st.text(max_size=12) | SURROGATE_TEXT,
)


@given(items=st.lists(SET_ITEMS, min_size=1, max_size=3))
@example(items=["lr=1" + "0" * 400])
@example(items=['output_dir="a\\u0000b"'])
def test_any_set_value_is_used_or_refused_by_name(items: list[str]) -> None:
    proc = fuzz_cli([arg for item in items for arg in ("--set", item)])
    keys = [item.partition("=")[0].strip() for item in items]
    values = [item.partition("=")[2] for item in items]
    assert_exit_2_naming(proc, MISSING_DATA, *items, *keys, *values)


FLAG_VALUES = st.one_of(st.integers().map(str), st.floats().map(str), EDGE_NUMBERS.map(str), st.text(max_size=8), SURROGATE_TEXT)


@given(flag=st.sampled_from(["--epochs", "--batch-size", "--lr", "--width", "--seed", "--patience", "--keep-best", "--num-threads",
                             "--val-fraction", "--cooldown", "--checkpoint-every-steps", "--min-delta", "--device", "--polarity"]),
       value=FLAG_VALUES)
@example(flag="--seed", value=str(10**23))
@example(flag="--width", value="30000")
def test_any_flag_value_is_used_or_refused_by_name(flag: str, value: str) -> None:
    proc = fuzz_cli([flag, value])
    if proc.returncode == 2 and "usage:" in proc.stderr:  # argparse: a value of the wrong type or choice, named by argparse
        assert flag in proc.stderr and "Traceback" not in proc.stderr
    else:
        assert_exit_2_naming(proc, MISSING_DATA, flag.lstrip("-").replace("-", "_"), value)


# --- TRAIN_FAULTS ---------------------------------------------------------------------------------------

FAULT_ITEMS = st.one_of(
    st.tuples(st.sampled_from(KINDS) | st.text(max_size=6), st.integers(-3, 2**70).map(str) | st.text(max_size=4),
              st.none() | st.integers(-3, 2**70).map(str) | st.text(max_size=3))
    .map(lambda t: f"{t[0]}@{t[1]}" + (f"-{t[2]}" if t[2] is not None else "")),
    st.text(max_size=10),
)


@given(items=st.lists(FAULT_ITEMS, max_size=4))
@example(items=["kill@0-99999999999"])  # built a set of 10^11 steps: memory exhausted
@example(items=["nan@3-100000"])
def test_any_train_faults_string_is_parsed_or_refused_by_name(items: list[str]) -> None:
    spec = ",".join(items)
    try:
        faults = FaultInjector(spec)
    except UserError as err:
        pieces = [piece.strip() for piece in spec.split(",")]  # an item may hold commas itself
        assert str(err).startswith("TRAIN_FAULTS: ") and any(repr(piece) in str(err) for piece in pieces), str(err)
        return
    for kind in KINDS:  # membership answers at once, however wide the ranges
        faults._take(kind, 2**69)
        assert isinstance(2**69 in faults.planned[kind], bool)


@settings(max_examples=8)
@given(items=st.lists(FAULT_ITEMS, min_size=1, max_size=3))
def test_train_faults_through_the_command_line(items: list[str]) -> None:
    spec = ",".join(items)
    proc = fuzz_cli([], TRAIN_FAULTS=spec)
    assert_exit_2_naming(proc, MISSING_DATA, "TRAIN_FAULTS")


# --- seeds ------------------------------------------------------------------------------------------------


@given(seed=st.integers(0, MAX_SEED), epoch=st.integers(0, 10**6), step=st.integers(0, 10**6))
def test_every_seed_in_range_works_for_the_split_and_the_draws(seed: int, epoch: int, step: int) -> None:
    import torch

    assert TrainConfig(seed=seed).seed == seed
    labels = torch.arange(12) % 3
    train, val = stratified_split(labels, 0.3, seed)
    assert sorted(train.tolist() + val.tolist()) == list(range(12))
    for parts in [(seed, 0x1417), (seed, epoch, 0xE90C), (seed, epoch, step)]:
        value = mix_seed(*parts)
        assert 0 <= value < 2**63
        torch.Generator().manual_seed(value)


# --- IDX files --------------------------------------------------------------------------------------------


@st.composite
def idx_bytes(draw: st.DrawFn, count: int | None, images: bool) -> bytes:
    """An IDX file: often a plausible one (``count`` images or labels of any type and value), else any header."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    if count is not None and draw(st.booleans()):
        code = 0x08 if images else draw(st.sampled_from(sorted(IDX_DTYPES)))
        dims = [count, 28, 28] if images else [count]
    else:
        code = draw(st.sampled_from(sorted(IDX_DTYPES)) | st.integers(0, 255))
        dims = draw(st.lists(st.integers(0, 6) | st.sampled_from([28, 2**31, 2**32 - 1]), max_size=4))
    header = bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    itemsize = np.dtype(IDX_DTYPES[code]).itemsize if code in IDX_DTYPES else 1
    expected = math.prod(dims) * itemsize
    size = draw(st.sampled_from(["exact", "short", "long", "any"]))
    n = {"exact": expected, "short": expected - 1, "long": expected + 3}.get(size, draw(st.integers(0, 3000)))
    n = max(0, min(n, 20_000))
    if not images and code in (0x0D, 0x0E) and draw(st.booleans()):  # float labels: whole numbers, NaN, huge
        values = np.array([rng.choice([0.0, 1.0, 2.0, float("nan"), 1e30, -1.0, 0.5]) for _ in range(max(0, n // itemsize))])
        body = values.astype(IDX_DTYPES[code]).tobytes()
    else:
        body = rng.randbytes(n)
    raw = draw(st.sampled_from([b"", b"\x12\x34", b"\x1f\x8b"])) + header + body if draw(st.integers(0, 9)) == 0 else header + body
    return gzip.compress(raw, compresslevel=1) if draw(st.booleans()) else raw


@st.composite
def idx_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    count = draw(st.none() | st.integers(0, 6))
    return draw(idx_bytes(count, images=True)), draw(idx_bytes(count, images=False))


@given(pair=idx_pairs())
@example(pair=(bytes.fromhex("00000803 00000000 0000001c 0000001c"), bytes.fromhex("00000801 00000000")))  # 0 images
@example(pair=(bytes.fromhex("00000803 00000002 0000001c 0000001c") + bytes(1568),
               bytes.fromhex("0000080d 00000002") + np.array([0, np.nan], ">f4").tobytes()))  # NaN label
@example(pair=(bytes.fromhex("00000803 00000002 0000001c 0000001c") + bytes(1568),
               bytes.fromhex("0000080c 00000002") + np.array([0, 2**31 - 1], ">i4").tobytes()))  # huge label
@example(pair=(bytes.fromhex("00000802 ffffffff ffffffff") + bytes(10), bytes.fromhex("00000801 ffffffff")))  # absurd header
def test_any_idx_pair_loads_or_is_refused_naming_the_file(pair: tuple[bytes, bytes]) -> None:
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        (folder / "train-images-idx3-ubyte").write_bytes(pair[0])
        (folder / "train-labels-idx1-ubyte").write_bytes(pair[1])
        try:
            ds = load_dataset(folder / "train-images-idx3-ubyte", use_cache=False)
        except UserError as err:
            assert str(folder) in str(err), str(err)
            return
        assert ds.images.shape[1:] == (1, 28, 28) and len(ds.labels) == ds.images.shape[0] > 0
        assert ds.labels.min() >= 0 and ds.labels.max() < len(ds.class_names)


# --- image files --------------------------------------------------------------------------------------------

MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I", "F", "I;16", "CMYK", "YCbCr", "PA"]
FORMATS = {"PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "JPEG": ".jpg"}
MAGIC = [b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"\xff\xd8\xff"]


@st.composite
def image_file(draw: st.DrawFn) -> tuple[str, bytes]:
    """(extension, bytes): an image of any mode, size and format, cut short or not, or bytes that only look like one."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    kind = draw(st.sampled_from(["image", "image", "truncated", "magic", "random", "float"]))
    ext = draw(st.sampled_from(sorted(IMAGE_EXTENSIONS)))
    if kind == "float":  # 32-bit float TIFF, with NaN, infinities or huge values
        values = rng.choice([0.0, 1.0, 255.0, 1e30, -1e30, np.nan, np.inf, -np.inf], size=(draw(st.integers(1, 40)), draw(st.integers(1, 40))))
        buf = io.BytesIO()
        Image.fromarray(values.astype(np.float32), "F").save(buf, format="TIFF")
        return ".tif", buf.getvalue()
    if kind == "random":
        return ext, rng.bytes(draw(st.integers(0, 300)))
    if kind == "magic":
        return ext, draw(st.sampled_from(MAGIC)) + rng.bytes(draw(st.integers(0, 300)))
    size = (draw(st.integers(1, 80)), draw(st.integers(1, 80)))
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    try:
        img = img.convert(draw(st.sampled_from(MODES)))
        buf = io.BytesIO()
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):  # this mode cannot be written in this format: plain RGB then
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(buf, format=fmt)
    data = buf.getvalue()
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return draw(st.sampled_from([FORMATS[fmt], ext])), data


def two_good_classes(root: Path, per_class: int = 2) -> None:
    for c in ("b_good", "c_good"):
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            arr = np.zeros((28, 28), np.uint8)
            arr[6:22, 10 + k:14 + k] = 255
            arr[6:10, 8:20] = 200 if c == "b_good" else 0
            Image.fromarray(arr).save(root / c / f"{k}.png")


@given(files=st.lists(image_file(), min_size=1, max_size=4), section=st.sampled_from(["", "raw", "processed"]))
def test_any_image_file_is_used_or_skipped_with_a_reason(files: list[tuple[str, bytes]], section: str) -> None:
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "data"
        two_good_classes(root / section)
        (root / section / "a_fuzz").mkdir()
        for k, (ext, data) in enumerate(files):
            (root / section / "a_fuzz" / f"{k}{ext}").write_bytes(data)
        ds = load_dataset(root, use_cache=False, workers=1)  # two good classes: never refused
        assert len(ds) + len(ds.skipped) == 4 + len(files)
        assert all(s["reason"] and str(root) in s["path"] for s in ds.skipped)
        assert set(ds.class_names) >= {"b_good", "c_good"}


@settings(max_examples=3)
@given(files=st.lists(image_file(), min_size=1, max_size=3))
def test_fuzzed_image_folders_train_end_to_end(files: list[tuple[str, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "data"
        two_good_classes(root, per_class=8)
        (root / "a_fuzz").mkdir()
        for k, (ext, data) in enumerate(files):
            (root / "a_fuzz" / f"{k}{ext}").write_bytes(data)
        proc = run_cli_in_process([*FAST, "--epochs", "1", "--batch-size", "8", "--width", "4", "--base-model", "none",
                                   "--data", "data", "--output-dir", "out"], Path(work))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and (Path(work) / "out" / "model_card.md").exists()


# --- file and folder names: any bytes -------------------------------------------------------------------

NAME_BYTES = st.binary(min_size=1, max_size=24).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@given(classes=st.lists(NAME_BYTES, min_size=1, max_size=3, unique=True), files=st.lists(NAME_BYTES, min_size=1, max_size=3, unique=True))
@example(classes=[b"cl\xffass", b"good"], files=[b"bad\xfe"])
@example(classes=[b"$^$", b"a_b", b"back\\slash"], files=[b"x"])
def test_any_file_or_folder_name_is_kept_and_reported(classes: list[bytes], files: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as work:
        root = os.path.join(os.fsencode(work), b"data")
        for c in classes:
            for k, f in enumerate(files):
                path = os.path.join(root, c, f + b".png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                arr = np.zeros((28, 28), np.uint8)
                arr[5:23, 8 + k:12 + k] = 255
                Image.fromarray(arr).save(os.fsdecode(path))
        visible = sorted(os.fsdecode(c) for c in classes if not c.startswith(b"."))
        cache = Path(work) / "cache"
        try:
            first = load_dataset(os.fsdecode(root), cache_dir=cache)
        except UserError as err:  # fewer than two visible classes (or no visible file): named, exit 2
            assert len(visible) < 2 or all(f.startswith(b".") for f in files), str(err)
            assert os.fsdecode(root) in str(err) or printable(os.fsdecode(root)) in str(err)
            return
        second = load_dataset(os.fsdecode(root), cache_dir=cache)
        assert first.class_names == second.class_names == [c for c in visible]
        assert second.cache == "hit" and first.fingerprint() == second.fingerprint()
        atomic_write_json(Path(work) / "report.json", first.report())  # JSON for people: always encodable
        report = json.loads((Path(work) / "report.json").read_text(encoding="utf-8"))
        assert report["class_names"] == [printable(c) for c in visible]


# --- model files: safetensors metadata, forged with a valid checksum ---------------------------------------

ARCH_VALUES = st.one_of(st.integers(-3, 3), st.sampled_from([0, 4, 1500, 512, 513, 10**9, 2**63, True]), JSON_SCALARS)
NORM_VALUES = st.sampled_from([0.0, -1.0, 1e-300, 1e300, float("nan"), float("inf"), 0.3, "0.3", None, True])
METADATA_EDITS = st.fixed_dictionaries({}, optional={
    "arch_params": st.fixed_dictionaries({"num_classes": ARCH_VALUES, "width": ARCH_VALUES}, optional={
        "bn_ghost_size": ARCH_VALUES, "depth": ARCH_VALUES}) | JSON_VALUES,
    "normalization": st.fixed_dictionaries({"mean": NORM_VALUES, "std": NORM_VALUES}) | JSON_VALUES,
    "class_names": st.lists(st.text(max_size=4), max_size=12) | JSON_VALUES,
    "arch": st.sampled_from(["cnn_v2", "resnet"]) | JSON_VALUES,
    "config": JSON_VALUES,
})


def small_model_state() -> dict:
    """The state of a model file of this program: a width-4 CNN v2 for ten classes."""
    from cnn_finetune.model.cnn import ARCH, build_model

    model = build_model(10, width=4, bn_ghost_size=32)
    return {"model": model.state_dict(), "arch": ARCH, "arch_params": {"num_classes": 10, "width": 4, "bn_ghost_size": 32},
            "class_names": [str(d) for d in range(10)], "normalization": {"mean": 0.13, "std": 0.31}, "config": {}}


@given(edits=METADATA_EDITS)
@example(edits={"arch_params": {"num_classes": 10, "width": 1500, "bn_ghost_size": 32}})  # built 2.6 GB before refusing
@example(edits={"normalization": {"mean": 0.13, "std": 0.0}})  # "nan%" predictions
@example(edits={"normalization": {"mean": float("nan"), "std": 0.3}})
@example(edits={"normalization": {"mean": 0.0, "std": 1e-300}})  # float32 makes it 0: NaN probabilities
@example(edits={"normalization": [None]})  # AttributeError traceback
@example(edits={"arch_params": {"num_classes": 10**9, "width": 4}})
@example(edits={"arch_params": {"num_classes": 10, "width": 4, "depth": 3}})
def test_any_safetensors_metadata_is_used_or_refused_by_name(edits: dict) -> None:
    from cnn_finetune.files.checkpoint import save_safetensors
    from cnn_finetune.tools.inference import load_inference_model, predict_proba

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "model.safetensors"
        save_safetensors({**small_model_state(), **edits}, path)
        try:
            model, meta = load_inference_model(path)
        except UserError as err:
            assert str(path) in str(err), str(err)
            return
        probs = predict_proba(model, meta, torch.zeros((2, 1, 28, 28), dtype=torch.uint8))
        assert probs.shape == (2, len(meta["class_names"])) and bool(probs.isfinite().all())


# --- .npz files: any .npy header -------------------------------------------------------------------------

NPY_SHAPES = st.lists(st.sampled_from([0, 1, 2, 3, 28, 784, 10**9, 2**62, -1]), max_size=4).map(tuple)
NPY_DESCRS = st.sampled_from(["|u1", "<f4", "<f8", "<i8", "|b1", "|S3", "<U2", "|O", "<c8", "|V4", "bogus"])


@st.composite
def npy_member(draw: st.DrawFn) -> bytes:
    """An .npy file: a header of any shape and type (lying or not) and some data bytes."""
    header = repr({"descr": draw(NPY_DESCRS), "fortran_order": draw(st.booleans()), "shape": draw(NPY_SHAPES)}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    data = draw(st.sampled_from([b"", bytes(784), bytes(2 * 784), b"\xff" * 100])) + draw(st.binary(max_size=16))
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


@given(x=npy_member(), y=npy_member() | st.none(), compress=st.booleans())
@example(x=b"\x93NUMPY\x01\x00" + (76).to_bytes(2, "little") + repr({"descr": "|u1", "fortran_order": False, "shape": (10**9, 28, 28)}).encode().ljust(75) + b"\n",
         y=None, compress=False)  # a 922-byte file claiming 10^9 images: _ArrayMemoryError traceback
@example(x=b"\x93NUMPY\x01\x00" + (76).to_bytes(2, "little") + repr({"descr": "|u1", "fortran_order": False, "shape": (2, 28, 28)}).encode().ljust(75) + b"\n" + bytes(1568),
         y=b"\x93NUMPY\x01\x00" + (76).to_bytes(2, "little") + repr({"descr": "|S2", "fortran_order": False, "shape": (2,)}).encode().ljust(75) + b"\n" + b"\xff\xfe12",
         compress=True)  # labels that are not UTF-8: UnicodeDecodeError traceback
def test_any_npz_header_loads_or_is_refused_naming_the_file(x: bytes, y: bytes | None, compress: bool) -> None:
    import zipfile

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "data.npz"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
            z.writestr("x_train.npy", x)
            if y is not None:
                z.writestr("y_train.npy", y)
        try:
            ds = load_dataset(path, use_cache=False)
        except UserError as err:
            assert str(path) in str(err), str(err)
            return
        assert ds.images.shape[1:] == (1, 28, 28) and len(ds.labels) == ds.images.shape[0] > 0
        assert all(s["reason"] and str(path) in s["path"] for s in ds.skipped)


# --- FIFOs where files belong ------------------------------------------------------------------------------

FIFO_PLACES = ["class_image", "idx_labels", "listed_image", "labels_csv", "data_path", "cache_file"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes (FIFOs) need a POSIX system")
@given(place=st.sampled_from(FIFO_PLACES), name=st.sampled_from(["x.png", "a.jpg", "train-labels-idx1-ubyte.gz", "labels.csv"]))
@example(place="class_image", name="x.png")  # opened by the cache key's hash: training hung forever
@example(place="idx_labels", name="train-labels-idx1-ubyte.gz")
def test_a_fifo_anywhere_in_the_data_never_blocks(place: str, name: str) -> None:
    import threading

    from cnn_finetune.data.loader import write_idx

    with tempfile.TemporaryDirectory() as work:
        root, cache = Path(work) / "data", Path(work) / "cache"
        root.mkdir()
        if place == "idx_labels":
            write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8))
            os.mkfifo(root / "train-labels-idx1-ubyte.gz")
            data = root / "train-images-idx3-ubyte.gz"
        elif place == "data_path":
            os.mkfifo(root / name)
            data = root / name
        else:
            two_good_classes(root)
            data = root
            if place == "class_image":
                os.mkfifo(root / "b_good" / name)
            elif place in ("listed_image", "labels_csv"):
                flat = Path(work) / "flat"
                two_good_classes(flat)
                data = flat
                if place == "labels_csv":
                    os.mkfifo(flat / "labels.csv")
                else:
                    name = name if name != "labels.csv" else "x.png"  # the list itself is written below
                    os.mkfifo(flat / name)
                    (flat / "labels.csv").write_text(f"b_good/0.png,b\nb_good/1.png,b\nc_good/0.png,c\nc_good/1.png,c\n{name},c\n")
            else:  # a FIFO where the data cache's file will be looked for
                load_dataset(root, cache_dir=cache)
                [file] = cache.glob("*.pt")
                file.unlink()
                os.mkfifo(file)
        outcome: dict = {}

        def load() -> None:
            try:
                outcome["ds"] = load_dataset(data, cache_dir=cache)
            except UserError as err:
                outcome["err"] = err

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), f"blocked on the FIFO ({place}, {name})"
        if "err" in outcome:
            assert "FIFO" in str(outcome["err"]) or str(root) in str(outcome["err"]), str(outcome["err"])
        else:
            assert "ds" in outcome and len(outcome["ds"]) >= 4


# --- forged checkpoints: every field is input ---------------------------------------------------------------
# The checksum of a checkpoint has no key: anyone can edit a field and compute it again. A forged
# checkpoint_last.pth is used when its fields are plausible, else refused like a damaged one (the run
# continues from checkpoint_prev.pth); never a traceback, and no file outside the output folder is
# ever deleted, moved or written, whatever a field names.

CHECKPOINT_FIELDS = ["best_keeper.entries.0.file", "best_keeper.entries.0.epoch", "best_keeper.entries.0.metric",
                     "best_keeper.entries.0.tiebreak", "best_keeper.entries", "best_keeper.mode", "position.epoch",
                     "position.step", "position.global_step", "position.steps_per_epoch", "early_stopping.wait",
                     "early_stopping.best", "early_stopping.best_epoch", "micro_batching.parts", "micro_batching.clean_steps",
                     "nan_guard.lr_scale", "nan_guard.rollbacks", "timing.epoch_elapsed", "normalization.std",
                     "normalization.mean", "schedule", "schedule.0.1", "world_size", "finished", "history", "events", "kind",
                     "init", "config.epochs", "config.output_dir", "config.data", "accumulators.seen", "fine_tuning",
                     "optimizer.state", "optimizer.param_groups", "arch_params.width", "class_names", "model", "label_review",
                     "label_review.margin_sum", "label_review.times_seen", "automatic",
                     "automatic.feature_lr_scale"]
# "@name" stands for a path next to the output folder, resolved per example.
OUTSIDE = ["@notes.txt", "@home/.ssh/id_ed25519", "../notes.txt", "best_epoch001_/../../notes.txt", "checkpoint_last.pth",
           "config_finetuned.json", "best_epoch001_val_acc0.5000.pth", ".", "", "/"]
FORGED_VALUES = st.one_of(st.sampled_from([*OUTSIDE, -1, 0, 1, 2, 50, 2**63, -(2**63), 10**30, 0.0, -1.0, 1e308, float("nan"),
                                           float("inf"), float("-inf"), None, True, False, [], {}, [[0, 1]], [[5, 2]],
                                           {"reason": "completed", "epoch": 99, "detail": "forged"}]),
                          st.integers(), st.floats(), st.text(max_size=8))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory, tiny_idx: Path) -> tuple[Path, list[str]]:
    """A FAST run stopped by SIGINT after step 14 of 18: checkpoint_last.pth at step 14, checkpoint_prev.pth at 12."""
    from conftest import run_cli

    work = tmp_path_factory.mktemp("stopped")
    args = [*FAST, "--keep-best", "1", "--data", str(tiny_idx), "--output-dir", "out"]
    proc = run_cli(args, cwd=work, faults="sigint@14")
    assert proc.returncode == 130, proc.stderr[-2000:]
    return work / "out", args


def _set_field(state: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        state = state[int(key)] if isinstance(state, list) else state[key]
    state[int(last) if isinstance(state, list) else last] = value


@given(forgeries=st.lists(st.tuples(st.sampled_from(CHECKPOINT_FIELDS), FORGED_VALUES), min_size=1, max_size=3))
@example(forgeries=[("best_keeper.entries.0.file", "@home/.ssh/id_ed25519"), ("best_keeper.entries.0.metric", -1.0)])
@example(forgeries=[("best_keeper.entries.0.file", "../notes.txt"), ("best_keeper.entries.0.metric", -1.0)])
@example(forgeries=[("position.epoch", -1)])  # ZeroDivisionError, then a retry
@example(forgeries=[("position.step", 50)])  # an untrained epoch reported "completed"
@example(forgeries=[("label_review.margin_sum", [])])  # a KeyError/TypeError when the totals were restored
@example(forgeries=[("label_review", {})])
@settings(max_examples=6)
def test_a_forged_checkpoint_field_is_used_or_refused_never_acted_on_outside(stopped_run, forgeries) -> None:
    import hashlib
    import shutil

    import torch

    from cnn_finetune.files.checkpoint import content_digest

    source, args = stopped_run
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        shutil.copytree(source, root / "out")
        for rel, text in {"notes.txt": "mine", "home/.ssh/id_ed25519": "key", "home/.bashrc": "rc"}.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        payload = torch.load(root / "out" / "checkpoint_last.pth", weights_only=True)
        for dotted, value in forgeries:
            value = str(root / value[1:]) if isinstance(value, str) and value.startswith("@") else value
            with contextlib.suppress(KeyError, IndexError, TypeError, ValueError):  # a forged parent may be gone
                _set_field(payload["state"], dotted, value)
        payload["sha256"] = content_digest(payload["state"])
        torch.save(payload, root / "out" / "checkpoint_last.pth")

        def outside() -> dict[str, str]:
            return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
                    for p in sorted(root.rglob("*")) if p.relative_to(root).parts[0] not in ("out", "cache")}

        before = outside()
        proc = run_cli_in_process(args, root)
        assert proc.returncode in (0, 2), (proc.returncode, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert outside() == before
        assert not [p for p in root.iterdir() if p.name.startswith("out.old-")]
