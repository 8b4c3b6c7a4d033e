"""Every supported data source -> ``uint8`` tensor ``N x 1 x 28 x 28``, labels and class names.

Sources:
  * image folders: ``root/raw/<class>/...`` and/or ``root/processed/<class>/...`` (the layout of
    the training guide), or a plain ``root/<class>/...`` tree;
  * IDX files (the MNIST format, plain or ``.gz``): an images file with its labels file beside it;
  * the built-in sample: 5,000 real MNIST training digits shipped inside this package (IDX files).

The data loader knows nothing of training. It caches preprocessed tensors (keyed by the files'
paths, sizes, modification times and a hash of their bytes, and by the preprocessing settings), and never stops because of
a bad file: such files are skipped and listed with the reason. Bad *sources* (missing path, no
usable image, a single class, IDX files that disagree) raise ``DataError`` naming the path.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np
import torch

from ..errors import DataError
from ..files.kinds import kind_of_mode, special_kind
from ..log import logger
from .formats import LABELS_CSV, NPZ_PARTS, csv_kind, is_csv, open_maybe_gzip, read_labels_csv, read_npz, read_pixel_csv
from .imageprep import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, SIDE, UnusableImage, load_image_file
from ..runtime import physical_memory

CACHE_VERSION = 5  # bump when preprocessing or the key changes, so old caches are not reused (3: content hashes, 4: checksummed files, 5: origins)
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
LAYOUT_SECTIONS = ("raw", "processed")
# IDX labels are class numbers: the class names are their values. More than 65,536 would make the
# classifier's head larger than the rest of the model; MNIST-style files use 0-9 or a few dozen.
MAX_IDX_LABEL = 65535
MIN_STD = 1e-6  # the smallest normalisation std: a one-colour data set must not divide by zero


@dataclass
class Dataset:
    """Preprocessed images of one source, ready for training or evaluation."""

    images: torch.Tensor  # uint8, N x 1 x 28 x 28, bright strokes on a dark background
    labels: torch.Tensor  # int64, N, indices into class_names
    class_names: list[str]
    source: str  # human-readable description of where the data came from
    kind: str  # "folder", "idx" or "builtin"
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"} of unusable files
    dropped_classes: list[str] = field(default_factory=list)  # class folders left without images
    ignored_files: int = 0  # files without an image extension
    cache: str = "off"  # "hit", "miss" or "off"
    # Where each image came from, for people (label_review.csv): its file, or FILE:LINE of a CSV,
    # FILE:x_train[i] of a .npz, FILE[i] of an IDX file. Not part of the fingerprint.
    origin: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.origin) != len(self.labels):  # e.g. made by hand: name the images by their position
            self.origin = [f"{self.source}[{i}]" for i in range(len(self.labels))]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_counts(self) -> dict[str, int]:
        """Number of images per class name."""
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, counts))

    def fingerprint(self) -> str:
        """SHA-256 of the pixels, labels and class names: identifies the data a model was trained on."""
        h = hashlib.sha256()
        h.update(json.dumps(self.class_names).encode())
        h.update(memoryview(self.images.contiguous().numpy()).cast("B"))  # no copy of the pixels
        h.update(self.labels.contiguous().numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def report(self) -> dict[str, Any]:
        """Plain-data summary for data_report.json and the model card."""
        return {
            "source": self.source,
            "kind": self.kind,
            "num_images": len(self),
            "class_names": list(self.class_names),
            "class_counts": self.class_counts(),
            "num_skipped": len(self.skipped),
            "skipped": list(self.skipped),
            "dropped_classes": list(self.dropped_classes),
            "ignored_files": self.ignored_files,
            "cache": self.cache,
        }


@dataclass
class SplitData:
    """Training and validation tensors (uint8 images on any device) with what travels with the model."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    class_names: list[str]
    mean: float
    std: float
    fingerprint: str
    train_origin: list[str] = field(default_factory=list)  # Dataset.origin of each training image
    # Validation images kept apart from the choice of the best epoch, to fit the temperature on
    # (``hold_out_for_calibration``); none: every validation image also selects.
    calibration: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def __post_init__(self) -> None:
        if len(self.train_origin) != len(self.train_labels):
            self.train_origin = [f"training image {i}" for i in range(len(self.train_labels))]
        if len(self.calibration) != len(self.val_labels):
            self.calibration = torch.zeros(len(self.val_labels), dtype=torch.bool)

    def hold_out_for_calibration(self, fraction: float, seed: int) -> None:
        """Keep ``fraction`` of each class's validation images apart for calibration (0: none)."""
        self.calibration = calibration_mask(self.val_labels, fraction, seed)

    def selection_part(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation images and labels that choose the best epoch (and stop the run early)."""
        keep = ~self.calibration
        return self.val_images[keep], self.val_labels[keep]


# ------------------------------------------------------------------------------------------------
# Entry point


def default_cache_dir() -> Path:
    """$CNN_FINETUNE_CACHE, else $XDG_CACHE_HOME/cnn_finetune, else ~/.cache/cnn_finetune."""
    if os.environ.get("CNN_FINETUNE_CACHE"):
        return Path(os.environ["CNN_FINETUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cnn_finetune"


def load_dataset(
    path: str | os.PathLike[str] | None,
    polarity: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    part: str = "train",
) -> Dataset:
    """Load any supported source; ``None`` means the built-in MNIST sample.

    Images of more than ``max_pixels`` pixels are skipped (and listed) without being decoded.
    ``part`` picks the arrays of an ``.npz`` file: ``"train"`` (``x_train``/``y_train``) or
    ``"test"`` (``x_test``/``y_test``); a path ending in ``:train`` or ``:test`` overrides it.
    Raises ``DataError`` (exit code 2 on the command line) for a missing path, a source without any
    usable image or without labels, a single class, or files that do not match each other.
    """
    cache = (Path(cache_dir) if cache_dir else default_cache_dir()) if use_cache else None
    if path is None:
        ds = _cached(_builtin_key(), cache, _load_builtin)
    else:
        root, part = _npz_part(Path(path), part)
        what = special_kind(root)
        if what not in (None, "a folder"):
            raise DataError(f"data path {root} is {what}, not a file or folder of data; pass a folder of class folders, an IDX "
                            "images file, a .npz, a CSV of pixels or a folder with a labels.csv", path=str(root))
        if not root.exists():
            raise DataError(f"data path {root} does not exist; pass a folder of class folders, an IDX images file, a .npz, "
                            "a CSV of pixels, a folder with a labels.csv, or omit --data for the built-in MNIST sample", path=str(root))
        ds = _load_path(root, polarity, cache, workers, part, max_pixels)
    _check_usable(ds)
    return ds


def _npz_part(path: Path, part: str) -> tuple[Path, str]:
    """``mnist.npz:test`` -> (``mnist.npz``, ``test``); any other path is kept as it is."""
    head, sep, tail = str(path).rpartition(":")
    if sep and tail in NPZ_PARTS and head.lower().endswith(".npz"):
        return Path(head), tail
    return path, part


def _load_path(root: Path, polarity: str, cache: Path | None, workers: int | None, part: str,
               max_pixels: int) -> Dataset:
    """Recognise the source at ``root`` and load it through the cache."""
    if root.is_file() and root.suffix.lower() == ".npz":
        return _cached(_files_key("npz", [root], part=part), cache, lambda: _load_npz(root, part))
    if root.is_file() and is_csv(root):
        if csv_kind(root) == "labels":
            return _load_listed_folder(root, polarity, cache, workers, max_pixels)
        return _cached(_files_key("csv", [root]), cache, lambda: _load_pixel_csv(root))
    if root.is_dir() and (root / LABELS_CSV).is_file():
        return _load_listed_folder(root / LABELS_CSV, polarity, cache, workers, max_pixels)
    idx_file = _find_idx_images(root)
    if idx_file is not None:
        return _cached(_idx_key(idx_file), cache, lambda: _load_idx(idx_file))
    if not root.is_dir():
        raise DataError(f"data path {root} is a file but not an IDX images file (e.g. train-images-idx3-ubyte.gz), nor a .npz "
                        "with x_train/y_train, a CSV of pixels (label,pixel0,...,pixel783) or a labels CSV (filename,label); "
                        "pass one of those or a folder of class folders", path=str(root))
    files, ignored, sections, class_dirs, unreadable = _scan_folder(root)
    ds = _cached({**_folder_key(root, files, class_dirs, polarity), "max_pixels": max_pixels}, cache,
                 lambda: _load_folder(root, files, sections, polarity, workers, max_pixels))
    ds.ignored_files = ignored
    ds.skipped = ds.skipped + [u for u in unreadable if u not in ds.skipped]
    return ds


def _labelled(images: np.ndarray, names: list[str], source: str, kind: str, skipped: list[dict[str, str]],
              numeric_order: bool = True, origin: list[str] | None = None) -> Dataset:
    """A dataset from uint8 ``N x 28 x 28`` images and a class name per image.

    Class names are sorted, integers by value (``"9"`` before ``"10"``, as IDX labels) unless
    ``numeric_order`` is off (class folders: sorted as text, as they always were).
    """
    def order(name: str) -> tuple[int, int, str]:
        number = name[1:] if name.startswith("-") else name
        return (0, int(name), "") if numeric_order and number.isdecimal() else (1, 0, name)

    class_names = sorted(set(names), key=order)
    index = {c: i for i, c in enumerate(class_names)}
    pixels = np.require(images, dtype=np.uint8, requirements=["C", "W"])  # torch wants writable memory
    return Dataset(torch.from_numpy(pixels).reshape(-1, 1, SIDE, SIDE), torch.tensor([index[n] for n in names], dtype=torch.int64),
                   class_names, source=source, kind=kind, skipped=skipped, origin=list(origin or []))


def _check_usable(ds: Dataset) -> None:
    if len(ds) == 0:
        detail = f" ({len(ds.skipped)} file(s) skipped as unusable, first: {ds.skipped[0]['path']}: {ds.skipped[0]['reason']})" if ds.skipped else ""
        raise DataError(f"no usable image in {ds.source}{detail}; expected images in <class>/ folders (PNG, JPEG, BMP, GIF, TIFF or WebP)")
    present = [n for n, c in ds.class_counts().items() if c > 0]
    if len(present) < 2:
        raise DataError(f"{ds.source} has a single class ({', '.join(present) or 'none'}); a classifier needs at least two class folders")


# ------------------------------------------------------------------------------------------------
# Cache


def _cached(key: dict[str, Any], cache_dir: Path | None, build: Any) -> Dataset:
    """Return the dataset for ``key`` from the cache, or build it and store it.

    A cache file is a checksummed checkpoint file (``files/checkpoint.py``): one whose bytes were
    damaged after it was written (a flipped label would silently change every result) fails its
    SHA-256, is reported once and rebuilt from the sources, and the new file replaces it atomically.
    """
    if cache_dir is None:
        return build()
    from ..files.checkpoint import load_checkpoint, save_checkpoint

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    file = cache_dir / f"{digest}.pt"
    if os.path.lexists(file):
        try:
            ds = _cached_dataset(load_checkpoint(file))
            ds.cache = "hit"
            return ds
        except Exception as err:  # a damaged cache only costs a rebuild
            logger.warning(f"data cache {file} cannot be used ({str(err).splitlines()[0][:200]}); rebuilding it from the sources")
    ds = build()
    ds.cache = "miss"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint({k: getattr(ds, k) for k in _CACHED_FIELDS}, file)
    except OSError as err:  # an unwritable cache folder must not stop training
        logger.warning(f"cannot write data cache in {cache_dir}: {err.strerror or err}")
    return ds


_CACHED_FIELDS = ("images", "labels", "class_names", "source", "kind", "skipped", "dropped_classes", "ignored_files", "origin")


def _cached_dataset(blob: dict[str, Any]) -> Dataset:
    """The dataset a verified cache file holds, its fields checked (a file that verifies may still be
    another program's, or an older layout); ``ValueError`` says what does not fit."""
    images, labels, names = blob.get("images"), blob.get("labels"), blob.get("class_names")
    if set(blob) != set(_CACHED_FIELDS) or not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor) \
            or not isinstance(names, list):
        raise ValueError(f"unexpected contents {sorted(blob)}")
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (1, SIDE, SIDE) \
            or labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise ValueError(f"images {images.dtype} {tuple(images.shape)}, labels {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < len(names)):
        raise ValueError(f"labels outside the {len(names)} classes")
    origin = blob.get("origin")
    if not isinstance(origin, list) or len(origin) != labels.shape[0] or not all(isinstance(o, str) for o in origin):
        raise ValueError("image origins do not match the images")
    return Dataset(**blob)


# ------------------------------------------------------------------------------------------------
# Image folders


def _scan_folder(root: Path) -> tuple[list[tuple[str, str, Path]], int, list[str], list[str], list[dict[str, str]]]:
    """List (section, class, file) for every image file; count files without an image extension.

    Also returns every class folder (``section/class``, empty ones included, so that adding one
    invalidates the cache) and the folders that could not be read (for the report).
    """
    sections = [s for s in LAYOUT_SECTIONS if (root / s).is_dir()]
    bases = [(s, root / s) for s in sections] if sections else [("", root)]
    files: list[tuple[str, str, Path]] = []
    ignored = 0
    class_dirs: list[str] = []
    unreadable: list[dict[str, str]] = []

    def on_error(err: OSError) -> None:
        unreadable.append({"path": str(err.filename), "reason": f"folder cannot be read: {err.strerror}"})

    for section, base in bases:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            class_dirs.append(f"{section}/{class_dir.name}")
            for dirpath, dirnames, filenames in os.walk(class_dir, onerror=on_error):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if name.startswith("."):
                        continue
                    file = Path(dirpath) / name
                    if file.suffix.lower() not in IMAGE_EXTENSIONS:
                        ignored += 1
                    elif (what := special_kind(file)) is not None:  # a FIFO would hang the first read
                        unreadable.append({"path": str(file), "reason": f"{what}, not an image file: skipped without opening it"})
                    else:
                        files.append((section, class_dir.name, file))
    if not class_dirs:
        where = " and ".join(str(b) for _, b in bases)
        raise DataError(f"no class folders in {where}; put each class's images in its own sub-folder, e.g. {bases[0][1] / '7' / 'img001.png'}")
    return files, ignored, sections, class_dirs, unreadable


def file_identity(path: Path) -> list[Any]:
    """Size, modification time and a fast hash of the bytes (BLAKE2b-128) of one file, for cache keys.

    The hash catches what size and time miss: a copy that keeps both (``cp -p``, ``rsync -a``, a
    restore from backup) with other pixels. ``[-1, -1, None]`` when the file cannot be read. Plain
    ``os`` calls on one descriptor: for thousands of small images this costs about as much again as
    the ``stat`` calls alone (threads only add lock contention when the files are in the page cache).
    """
    try:  # never blocks on a FIFO; the fstat below then refuses it without reading
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError:
        return [-1, -1, None]
    try:
        st = os.fstat(fd)
        if kind_of_mode(st.st_mode) is not None:
            return [-1, -1, None]
        h = hashlib.blake2b(digest_size=16)
        while chunk := os.read(fd, 1 << 24):
            h.update(chunk)
        return [st.st_size, st.st_mtime_ns, h.hexdigest()]
    except OSError:
        return [-1, -1, None]
    finally:
        os.close(fd)


def _folder_key(root: Path, files: list[tuple[str, str, Path]], class_dirs: list[str], polarity: str) -> dict[str, Any]:
    entries = [[str(file.relative_to(root)), *file_identity(file)] for _, _, file in files]
    return {"v": CACHE_VERSION, "kind": "folder", "root": str(root.resolve()), "polarity": polarity,
            "files": entries, "classes": sorted(class_dirs)}


def _load_folder(root: Path, files: list[tuple[str, str, Path]], sections: list[str],
                 polarity: str, workers: int | None, max_pixels: int) -> Dataset:
    all_classes = sorted({cls for base in ([root / s for s in sections] or [root])
                          for cls in (p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))})
    # Only processed/ images (and plain trees) that are already 28x28 skip the MNIST layout.
    images, label_names, skipped, kept = _prepare_images([(file, section != "raw", cls) for section, cls, file in files],
                                                         polarity, workers, max_pixels)
    layout = "+".join(sections) if sections else "class folders"
    ds = _labelled(images, label_names, f"{root} ({layout})", "folder", skipped, numeric_order=False,
                   origin=[str(f) for f in kept])
    ds.dropped_classes = [c for c in all_classes if c not in ds.class_names]
    return ds


def _prepare_images(files: list[tuple[Path, bool, str]], polarity: str, workers: int | None,
                    max_pixels: int) -> tuple[np.ndarray, list[str], list[dict[str, str]], list[Path]]:
    """Preprocess ``(file, light, class name)`` items: the usable images with their class names, the
    unusable files with the reason, and the files of the usable images."""
    def work(item: tuple[Path, bool, str]) -> np.ndarray | str:
        try:
            return load_image_file(item[0], polarity=polarity, light=item[1], max_pixels=max_pixels)
        except UnusableImage as err:
            return str(err)

    n_workers = workers or min(8, os.cpu_count() or 1)
    if n_workers > 1 and len(files) > 64:
        pool = ThreadPoolExecutor(n_workers)  # Pillow and NumPy release the GIL while decoding
        try:
            results = list(pool.map(work, files))
        finally:
            # On Ctrl+C the queued images are dropped: only those being decoded are waited for (a few
            # milliseconds), not the whole folder, as leaving a ``with`` block would.
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        results = [work(item) for item in files]
    arrays: list[np.ndarray] = []
    names: list[str] = []
    skipped: list[dict[str, str]] = []
    kept: list[Path] = []
    for (file, _light, cls), res in zip(files, results):
        if isinstance(res, str):
            skipped.append({"path": str(file), "reason": res})
        else:
            arrays.append(res)
            names.append(cls)
            kept.append(file)
    return (np.stack(arrays) if arrays else np.zeros((0, SIDE, SIDE), np.uint8)), names, skipped, kept


# ------------------------------------------------------------------------------------------------
# A flat image folder with a labels CSV, a CSV of pixels, a .npz


def _files_key(kind: str, paths: list[Path], **extra: Any) -> dict[str, Any]:
    """A cache key from the files' paths and identities (size, time, hash of the bytes) and ``extra`` settings."""
    return {"v": CACHE_VERSION, "kind": kind, "files": [[str(p.resolve()), *file_identity(p)] for p in paths], **extra}


def _load_listed_folder(labels_csv: Path, polarity: str, cache: Path | None, workers: int | None,
                        max_pixels: int) -> Dataset:
    """The images a ``filename,label`` CSV lists; listed files that are missing and image files
    beside them that are not listed are reported as skipped."""
    entries, skipped, named = read_labels_csv(labels_csv)
    outside = [s for s in skipped if s.get("outside")]
    if outside:  # a labels list names files for training; one that reaches elsewhere is refused row by row
        logger.warning(f"{labels_csv}: {len(outside)} row(s) name files outside {labels_csv.parent}, skipped: "
                       + "; ".join(s["reason"] for s in outside[:3]) + (" ..." if len(outside) > 3 else ""))
        skipped = [{"path": s["path"], "reason": s["reason"]} for s in skipped]
    present = [(f, label) for no, f, label in entries if f.is_file()]
    skipped += [{"path": str(f), "reason": f"{_listed_problem(f)} (listed on line {no} of {labels_csv.name})"}
                for no, f, _ in entries if not f.is_file()]
    for folder in sorted({labels_csv.parent} | {f.parent for f in named}):
        unlisted = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p not in named
                          and not p.name.startswith(".") and p.is_file()) if folder.is_dir() else []
        skipped += [{"path": str(p), "reason": f"no label: not listed in {labels_csv.name}"} for p in unlisted]
    key = _files_key("listed", [labels_csv] + [f for f, _ in present], polarity=polarity, max_pixels=max_pixels)

    def build() -> Dataset:
        # light: 28x28 images are used as they are; other sizes get the MNIST layout (as predict.py does).
        images, names, bad, kept = _prepare_images([(f, True, label) for f, label in present], polarity, workers, max_pixels)
        return _labelled(images, names, f"{labels_csv.parent} (images listed in {labels_csv.name})", "listed", bad,
                         origin=[str(f) for f in kept])

    ds = _cached(key, cache, build)
    ds.skipped = skipped + ds.skipped
    return ds


def _listed_problem(file: Path) -> str:
    """Why a file a labels CSV lists cannot be read: missing, or what it is instead of a file."""
    what = special_kind(file)
    if what is None:
        return "file not found" if not os.path.lexists(file) else "file not found (a broken symbolic link)"
    return f"{what}, not an image file: skipped without opening it"


def _load_pixel_csv(path: Path) -> Dataset:
    table = read_pixel_csv(path)
    if table.labels is None:
        raise DataError(f"{path} has no label column (784 values per row): training and evaluation need a label per image. "
                        "Add a 'label' column (Kaggle layout: label,pixel0,...,pixel783), or predict its images with "
                        "predict.py", path=str(path))
    return _labelled(table.images, table.labels, f"{path} (CSV of pixels)", "csv", table.skipped(path),
                     origin=[f"{path}:{pos}" for pos in table.positions])


def _load_npz(path: Path, part: str) -> Dataset:
    table = read_npz(path, part)
    x_key, y_key = NPZ_PARTS[part]
    if table.labels is None:
        raise DataError(f"{path} has {x_key} but no {y_key}: training and evaluation need a label per image; "
                        f"save the labels as {y_key} in the same file", path=str(path))
    return _labelled(table.images, table.labels, f"{path} ({x_key}/{y_key})", "npz", table.skipped(path),
                     origin=[f"{path}:{x_key}[{pos}]" for pos in table.positions])


# ------------------------------------------------------------------------------------------------
# IDX files


def _find_idx_images(root: Path) -> Path | None:
    """The IDX images file named by ``root``, or the single one inside the folder ``root``."""
    def is_idx_images(p: Path) -> bool:
        return "idx3" in p.name and "label" not in p.name
    if root.is_file():
        return root if ("idx" in root.name) else None
    if not root.is_dir():
        return None
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return None  # a folder of class folders
    candidates = sorted(p for p in root.iterdir() if p.is_file() and is_idx_images(p))
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise DataError(f"{root} holds several IDX images files ({names}); pass the one to use, e.g. --data {candidates[0]}")
    return candidates[0] if candidates else None


def idx_labels_path(images_path: Path) -> Path:
    """The labels file that belongs to an IDX images file (``...images-idx3...`` -> ``...labels-idx1...``)."""
    name = images_path.name
    for a, b in (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1"), ("images", "labels")):
        if a in name:
            guess = images_path.with_name(name.replace(a, b).replace("idx3", "idx1"))
            if guess.exists():
                return guess
            alt = guess.with_name(guess.name[:-3]) if guess.name.endswith(".gz") else guess.with_name(guess.name + ".gz")
            return alt if alt.exists() else guess
    raise DataError(f"cannot tell the labels file of IDX images file {images_path}; name them like train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz)")


def _idx_header(fh: BinaryIO, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    magic = fh.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); expected the MNIST format, e.g. train-images-idx3-ubyte.gz", path=str(path))
    raw_dims = fh.read(4 * magic[3])
    if len(raw_dims) < 4 * magic[3]:
        raise DataError(f"IDX file {path} is truncated inside its header", path=str(path))
    return np.dtype(IDX_DTYPES[magic[2]]), tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))


def read_idx_header(path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """The element type and dimensions an IDX file declares, reading only its header."""
    try:
        with open_maybe_gzip(path) as fh:  # a small .gz may hold a lot: read as a stream
            return _idx_header(fh, path)
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: damaged gzip data (not an OSError)
        raise DataError(f"cannot read IDX file {path}: {err}", path=str(path)) from None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzip) into an array; errors name the file and what is wrong.

    The header is checked before any data is read: sizes are computed exactly (no overflow), and a
    header that claims more data than half of this machine's memory is refused instead of allocated.
    The array is filled as the data arrives, so a header that lies costs no more than the real data.
    """
    try:
        with open_maybe_gzip(path) as fh:
            dtype, dims = _idx_header(fh, path)
            expected = math.prod(dims) * dtype.itemsize
            limit = physical_memory() // 2
            if expected > limit:
                raise DataError(f"IDX file {path}: its header claims {' x '.join(map(str, dims))} values of {dtype.itemsize} byte(s), "
                                f"{expected / 1e9:.3g} GB, more than half of this machine's memory ({limit * 2 / 1e9:.3g} GB): "
                                "the header is damaged or the file is too large to load", path=str(path))
            buf = np.empty(expected, dtype=np.uint8)
            got = _read_into(fh, memoryview(buf))
            extra = bool(fh.read(1))
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read IDX file {path}: {err}", path=str(path)) from None
    if got != expected or extra:
        have = f"{got} data bytes" if not extra else f"more than {expected} data bytes"
        raise DataError(f"IDX file {path} has {have} but its header ({' x '.join(map(str, dims))}) needs {expected}: the file is "
                        "truncated or not what its header says", path=str(path))
    return buf.view(dtype).reshape(dims)


def _read_into(fh: BinaryIO, view: memoryview, chunk: int = 1 << 24) -> int:
    """Fill ``view`` from ``fh`` in chunks; returns the number of bytes read (less at the end of the data)."""
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:got + chunk])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzip when the name ends in .gz)."""
    codes = {np.dtype(v).str: k for k, v in IDX_DTYPES.items()}
    arr = np.asarray(array)
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    code = codes.get(np.dtype(big.dtype).str)
    if code is None:  # falling back to the uint8 code would write a file that cannot be read back
        raise ValueError(f"IDX cannot store {arr.dtype} data; use uint8, int8, int16, int32, float32 or float64")
    data = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + big.tobytes()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _idx_key(images_path: Path) -> dict[str, Any]:
    labels_path = idx_labels_path(images_path)
    if not labels_path.exists():
        raise DataError(f"IDX images file {images_path} has no labels file beside it; expected {labels_path}")
    return _files_key("idx", [images_path, labels_path])


def _load_idx(images_path: Path) -> Dataset:
    labels_path = idx_labels_path(images_path)
    # The headers first: a shape or a count that cannot be right is refused before any data is read.
    (img_type, img_dims), (_, label_dims) = read_idx_header(images_path), read_idx_header(labels_path)
    if len(img_dims) != 3 or img_dims[1:] != (SIDE, SIDE) or img_type != np.uint8:
        raise DataError(f"IDX images file {images_path} holds {img_type} images of shape {img_dims[1:]}; expected unsigned bytes of shape 28 x 28",
                        path=str(images_path))
    if len(label_dims) != 1:
        raise DataError(f"IDX labels file {labels_path} has {len(label_dims)} dimensions; expected a flat list of labels", path=str(labels_path))
    if img_dims[0] != label_dims[0]:
        raise DataError(f"IDX images file {images_path} holds {img_dims[0]} images but labels file {labels_path} holds {label_dims[0]} labels; "
                        "they must match one to one", path=str(images_path))
    if img_dims[0] == 0:
        raise DataError(f"IDX images file {images_path} holds 0 images; pass a file with images", path=str(images_path))
    images = read_idx(images_path)
    labels = _class_numbers(read_idx(labels_path), labels_path)
    return _labelled(images, [str(int(v)) for v in labels.tolist()], str(images_path), "idx", [],
                     origin=[f"{images_path}[{i}]" for i in range(len(labels))])


def _class_numbers(labels: np.ndarray, path: Path) -> np.ndarray:
    """IDX labels as int64 class numbers; NaN, fractions and values outside 0..MAX_IDX_LABEL are refused."""
    bad = ~np.isfinite(labels) | (labels != np.round(labels)) if labels.dtype.kind == "f" else np.zeros(labels.shape, bool)
    bad |= (labels < 0) | (labels > MAX_IDX_LABEL)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"IDX labels file {path}: label {labels[i]} (position {i}) is not a class number; labels must be "
                        f"whole numbers from 0 to {MAX_IDX_LABEL}", path=str(path))
    return labels.astype(np.int64)


# ------------------------------------------------------------------------------------------------
# Built-in sample


BUILTIN_FILES = ("mnist_5k-images-idx3-ubyte.gz", "mnist_5k-labels-idx1-ubyte.gz")
BUILTIN_SOURCE = "built-in MNIST sample (5,000 digits of the MNIST training set)"


def builtin_sample_path() -> Path:
    """The packaged IDX images file of the built-in sample (its labels file lies beside it).

    The 5,000 digits ship inside the package (``cnn_finetune/data/``, with a README on their origin
    and licence), so the sample needs no other package and no download.
    """
    folder = Path(__file__).with_name("sample")
    for name in BUILTIN_FILES:
        if not (folder / name).is_file():
            raise DataError(f"the built-in MNIST sample {folder / name} is missing from the installed package; "
                            "reinstall cnn-finetune (pip install -r requirements.txt), or pass --data PATH")
    return folder / BUILTIN_FILES[0]


def _builtin_key() -> dict[str, Any]:
    # Size and digest, not the path and time: a reinstall of the same files keeps the cache valid,
    # and a changed file can never be taken for the old one.
    images = builtin_sample_path()
    files = []
    for path in (images, images.with_name(BUILTIN_FILES[1])):
        data = path.read_bytes()
        files.append([path.name, len(data), hashlib.sha256(data).hexdigest()])
    return {"v": CACHE_VERSION, "kind": "builtin", "files": files}


def _load_builtin() -> Dataset:
    ds = _load_idx(builtin_sample_path())
    return Dataset(ds.images, ds.labels, ds.class_names, source=BUILTIN_SOURCE, kind="builtin",
                   origin=[f"built-in sample[{i}]" for i in range(len(ds))])


# ------------------------------------------------------------------------------------------------
# Splits, statistics, class balance


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, stratified train/validation indices: the same seed and files give the same split.

    Every class with at least two images gives at least one to each side.
    """
    # A stream of its own, apart from training; wrapped to 64 bits so that every seed up to 2**63-1 works
    # (the same split as before for every seed that worked then).
    g = torch.Generator().manual_seed((seed * 7919 + 17) & 0xFFFFFFFFFFFFFFFF)
    train, val = [], []
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_val = int(round(idx.numel() * val_fraction))
        if idx.numel() >= 2:
            n_val = min(max(n_val, 1), idx.numel() - 1)
        else:
            n_val = 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values


def calibration_mask(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Seeded, stratified choice of ``fraction`` of each class's images (True: chosen).

    A class keeps at least one image unchosen, so every class still takes part in the selection; a
    class with a single image gives none.
    """
    mask = torch.zeros(len(labels), dtype=torch.bool)
    if fraction <= 0 or not labels.numel():
        return mask
    g = torch.Generator().manual_seed((seed * 104729 + 29) & 0xFFFFFFFFFFFFFFFF)  # a stream apart from the split's
    labels = labels.cpu()
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        n = min(int(round(idx.numel() * fraction)), idx.numel() - 1)
        if n > 0:
            mask[idx[torch.randperm(idx.numel(), generator=g)[:n]]] = True
    return mask


def normalization_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of the pixels (scaled to [0, 1]) of a uint8 image tensor.

    Computed exactly from the 256-bin histogram of the pixel values: no float copy of the data,
    whose 8 bytes per pixel would dominate the peak memory of loading a large dataset.
    """
    flat = images.reshape(-1)
    hist = torch.zeros(256, dtype=torch.float64)
    for start in range(0, flat.numel(), 1 << 22):  # bincount widens to int64: bound that copy to 32 MB
        hist += torch.bincount(flat[start:start + (1 << 22)], minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = float(hist.sum())
    mean = float((hist * values).sum()) / n
    var = float((hist * (values - mean) ** 2).sum()) / max(1.0, n - 1)
    return mean, max(var ** 0.5, MIN_STD)


def align_classes(ds: Dataset, class_names: list[str]) -> Dataset:
    """Re-express ``ds``'s labels in the order of ``class_names`` (e.g. a validation folder)."""
    unknown = [c for c in ds.class_names if c not in class_names]
    if unknown:
        raise DataError(f"{ds.source} has classes that the training data lacks: {', '.join(unknown)}; the validation classes must be a subset of {', '.join(class_names)}")
    mapping = torch.tensor([class_names.index(c) for c in ds.class_names], dtype=torch.int64)
    return Dataset(ds.images, mapping[ds.labels], list(class_names), ds.source, ds.kind,
                   ds.skipped, ds.dropped_classes, ds.ignored_files, ds.cache, ds.origin)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights, normalised so that a balanced dataset gives all ones."""
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    present = int((counts > 0).sum())  # absent classes weigh 0 and must not shrink the loss's scale
    weights = torch.where(counts > 0, counts.sum() / (present * counts.clamp_min(1)), torch.zeros_like(counts))
    return weights.to(torch.float32)


def summarize_counts(counts: dict[str, int], limit: int = 12) -> str:
    """``'0: 450, 1: 450, ...'`` with the imbalance ratio, for one log line."""
    items: Iterable[tuple[str, int]] = list(counts.items())
    text = ", ".join(f"{k}: {v}" for k, v in list(items)[:limit])
    if len(counts) > limit:
        text += f", ... ({len(counts)} classes)"
    values = [v for v in counts.values() if v > 0]
    if values and max(values) > 1.5 * min(values):
        text += f"  [imbalanced: largest/smallest = {max(values) / min(values):.1f}; see --balance]"
    return text
