"""Readers of the data formats that are tables rather than image files, or lists of image files.

* a Kaggle-style CSV of pixels: one image per row, 784 pixel values 0-255 (row by row), with or
  without a label column; a header is optional (``label,pixel0,...,pixel783``). Without a header a
  row of 785 values has its label first (the Kaggle and Fashion-MNIST layout), a row of 784 none;
* a NumPy ``.npz`` with ``x_train``/``y_train`` (and ``x_test``/``y_test``), as Keras' ``mnist.npz``:
  images ``(N, 28, 28)``, ``(N, 28, 28, 1)``, ``(N, 1, 28, 28)`` or ``(N, 784)``, one label per image;
* a labels CSV of a flat image folder: ``filename,label`` rows (header optional), file names
  relative to the CSV's folder.

Pixels of a CSV or ``.npz`` are used as they are, like IDX files: bright strokes on a dark
background, as in MNIST. A bad row (wrong length, a pixel that is not a number or outside 0-255, a
missing label) is skipped and reported with its line (CSV) or index (``.npz``); a bad *source* (not
readable, a header or shape that fits no layout, arrays that do not match) raises ``DataError``
naming the file. These readers return plain arrays; ``data_loader`` turns them into a ``Dataset``.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError
from ..files.kinds import open_regular
from ..runtime import physical_memory
from .imageprep import SIDE

PIXELS = SIDE * SIDE
LABEL_COLUMN = "label"
LABELS_CSV = "labels.csv"  # the labels file a flat image folder holds
NPZ_PARTS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
_CHUNK = 4096  # CSV lines parsed at once: bounds the float64 copy to about 25 MB
_FILE_WORDS, _LABEL_WORDS = {"filename", "file", "image", "path"}, {"label", "class"}
# A class name is a folder name elsewhere (255 bytes on every common file system); a longer label is
# a damaged row, and one of over 4,300 digits cannot even be read as a number (Python's int limit).
MAX_LABEL_CHARS = 255


@dataclass
class Table:
    """Images read from one file, with where each came from and the rows that were skipped."""

    images: np.ndarray  # uint8, N x 28 x 28
    labels: list[str] | None  # a class name per image; None when the file has no labels
    positions: list[int]  # line (CSV) or index (.npz) of each image
    bad: list[tuple[int, str]] = field(default_factory=list)  # (position, reason) of skipped rows
    where: str = "line {}"  # how a position reads in a message

    def skipped(self, path: Path) -> list[dict[str, str]]:
        """The skipped rows as data-report entries: the file and, in the reason, the row."""
        return [{"path": str(path), "reason": f"{self.where.format(pos)}: {reason}"} for pos, reason in self.bad]


def is_csv(path: Path) -> bool:
    """A ``.csv`` or ``.csv.gz`` file name."""
    name = path.name.lower()
    return name.endswith(".csv") or name.endswith(".csv.gz")


def open_maybe_gzip(path: Path) -> BinaryIO:
    """``path`` opened for reading bytes, decompressed on the fly when it is gzip (told by its first
    two bytes, not by its name), so that a reader can stop early without decompressing it whole."""
    fh = open_regular(path)  # a FIFO or a device raises NotRegularFile (an OSError) instead of blocking
    try:
        gz = fh.read(2) == b"\x1f\x8b"
        fh.seek(0)
    except BaseException:
        fh.close()
        raise
    if not gz:
        return fh
    stream = gzip.GzipFile(fileobj=fh, mode="rb")
    stream.myfileobj = fh  # type: ignore[attr-defined]  # closed with the stream, as gzip.open(path) does
    return stream  # type: ignore[return-value]


def read_lines(path: Path) -> list[str]:
    """The text lines of a (possibly gzip-compressed) text file; errors name the file."""
    try:
        with open_maybe_gzip(path) as fh:
            raw = fh.read()
        return raw.decode("utf-8-sig").splitlines()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}", path=str(path)) from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text (UTF-8) CSV file", path=str(path)) from None


def csv_kind(path: Path) -> str:
    """``"labels"`` for a ``filename,label`` list (two columns), ``"pixels"`` for a CSV of pixels.

    Reads up to the first non-empty line only: a cached dataset is found without reading the file.
    """
    try:
        with io.TextIOWrapper(open_maybe_gzip(path), encoding="utf-8-sig", errors="replace") as text:
            first = next((line for line in text if line.strip()), "")
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}", path=str(path)) from None
    try:
        cells = len(next(csv.reader([first]), []))
    except csv.Error:  # a cell over the csv module's 131,072 characters: count the commas instead
        cells = first.count(",") + 1
    return "labels" if cells == 2 else "pixels"


def _cell(text: str) -> str:
    return text.strip().strip('"').strip()


def _class_name(text: str) -> str:
    """A label cell as a class name: integers written alike (``7``, ``07``, ``7.0`` are class ``7``)."""
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


def label_problem(name: str) -> str | None:
    """Why a class name read from a file cannot be one, or None (a missing label is the caller's case)."""
    if len(name) > MAX_LABEL_CHARS:
        return f"label of {len(name):,} characters ({name[:20]!r}...); a class name has at most {MAX_LABEL_CHARS}"
    return None


def _pixel_problem(values: np.ndarray) -> str | None:
    """Why a row of pixel values is unusable, or None."""
    bad = ~(np.isfinite(values) & (values >= 0) & (values <= 255) & (values == np.round(values)))
    if not bad.any():
        return None
    j = int(np.argmax(bad))
    return f"pixel {j} is {values[j]:g}: expected a whole number 0-255"


# ------------------------------------------------------------------------------------------------
# CSV of pixels


def _csv_layout(path: Path, numbered: list[tuple[int, str]]) -> tuple[int, int | None, list[tuple[int, str]]]:
    """(columns, label column or None, data lines) from the header or, without one, the first row."""
    if not numbered:
        raise DataError(f"{path} is empty; expected one image per row: label,pixel0,...,pixel783", path=str(path))
    cells = [_cell(c) for c in numbered[0][1].split(",")]
    try:
        [float(c) for c in cells]
        header = False
    except ValueError:
        header = True
    width = len(cells)
    if header:
        names = [c.lower() for c in cells]
        label = names.index(LABEL_COLUMN) if LABEL_COLUMN in names else None
    else:
        label = 0 if width == PIXELS + 1 else None
    if width - (label is not None) != PIXELS:
        what = f"its header has {width} columns" if header else f"its first row has {width} values"
        raise DataError(f"{path} is not a CSV of 28x28 images: {what}; expected 784 pixel values per row, with or "
                        f"without a '{LABEL_COLUMN}' column (Kaggle layout: label,pixel0,...,pixel783)", path=str(path))
    return width, label, numbered[1:] if header else numbered


def read_pixel_csv(path: Path) -> Table:
    """Read a CSV of pixels: every usable row, and the rows skipped with the reason."""
    numbered = [(i + 1, line) for i, line in enumerate(read_lines(path)) if line.strip()]
    width, label, data = _csv_layout(path, numbered)
    pixel_cols = [c for c in range(width) if c != label]
    table = Table(np.zeros((0, SIDE, SIDE), np.uint8), [] if label is not None else None, [])
    images: list[np.ndarray] = []
    for start in range(0, len(data), _CHUNK):
        images += _read_chunk(data[start:start + _CHUNK], width, label, pixel_cols, table)
    table.bad.sort()
    if images:
        table.images = np.stack(images)
    return table


def _read_chunk(chunk: list[tuple[int, str]], width: int, label: int | None, pixel_cols: list[int],
                out: Table) -> list[np.ndarray]:
    """Parse lines ``(number, text)`` into 28x28 images; labels, positions and bad rows go into ``out``.

    NumPy parses the whole chunk at once; a chunk with a cell that is not a number is parsed again
    row by row, so that only the bad row is skipped and its reason names the cell.
    """
    rows = []
    quoted: dict[int, str] = {}  # the label of a row whose cells are quoted (a label "a,b" holds a comma)
    for no, line in chunk:
        n = line.count(",") + 1
        if n != width and '"' in line:
            line, n, name = _unquoted(line, width, label)
            if name is not None:
                quoted[no] = name
        if n == width:
            rows.append((no, line))
        else:
            out.bad.append((no, f"{n} values; expected {width}" + (" (label + 784 pixels)" if label is not None else "")))
    try:
        values: list[np.ndarray | None] = list(np.loadtxt([line for _, line in rows], delimiter=",", quotechar='"',
                                                          dtype=np.float64, usecols=pixel_cols, ndmin=2)) if rows else []
    except ValueError:
        values = [_parse_row(line, pixel_cols) for _, line in rows]
    images = []
    for (no, line), row in zip(rows, values):
        problem = _row_problem(line, pixel_cols) if row is None else _pixel_problem(row)
        name = quoted[no] if no in quoted else _label_cell(line, label, width)
        if problem is None and label is not None:
            problem = label_problem(name) if name else "missing label"
        if problem is not None:
            out.bad.append((no, problem))
            continue
        images.append(row.astype(np.uint8).reshape(SIDE, SIDE))
        if out.labels is not None:
            out.labels.append(_class_name(name))
        out.positions.append(no)
    return images


def _unquoted(line: str, width: int, label: int | None) -> tuple[str, int, str | None]:
    """A row with quoted cells read as the csv module reads it: ``(line, cells, label)``, the line
    rebuilt without quotes (commas inside a cell become spaces), or the row unchanged when the csv
    module cannot read it either."""
    try:
        cells = next(csv.reader([line]), [])
    except csv.Error:
        return line, line.count(",") + 1, None
    if len(cells) != width:
        return line, len(cells), None
    name = _cell(cells[label]) if label is not None else None
    return ",".join(c.replace(",", " ") for c in cells), width, name


def _label_cell(line: str, label: int | None, width: int) -> str:
    # The label is first or last in every common layout: split off one cell, not all 785.
    if label is None:
        return ""
    if label == 0:
        return _cell(line.split(",", 1)[0])
    if label == width - 1:
        return _cell(line.rsplit(",", 1)[-1])
    return _cell(line.split(",")[label])


def _parse_row(line: str, pixel_cols: list[int]) -> np.ndarray | None:
    """One row's pixels as float64, or None when a cell is not a number (``_row_problem`` says which)."""
    cells = line.split(",")
    try:
        return np.array([float(_cell(cells[c])) for c in pixel_cols], dtype=np.float64)
    except ValueError:
        return None


def _row_problem(line: str, pixel_cols: list[int]) -> str:
    """The first cell of a row that is not a number, as a reason."""
    cells = line.split(",")
    for j, c in enumerate(pixel_cols):
        text = _cell(cells[c])
        try:
            float(text)
        except ValueError:
            return f"pixel {j} is {text!r}: not a number" if text else f"pixel {j} is empty"
    return "a pixel is not a number"


# ------------------------------------------------------------------------------------------------
# NumPy .npz


def read_npz(path: Path, part: str = "train") -> Table:
    """Read ``x_<part>`` and ``y_<part>`` of an ``.npz`` file (``part``: ``train`` or ``test``).

    Loaded with ``allow_pickle=False``: an ``.npz`` holding Python objects is refused, never run.
    A missing ``y_<part>`` gives a table without labels.
    """
    x_key, y_key = NPZ_PARTS[part]
    try:
        with open_regular(path) as fh, np.load(fh, allow_pickle=False) as npz:
            if x_key not in npz.files:
                held = ", ".join(npz.files) or "no arrays"
                raise DataError(f"{path} has no {x_key} array (it holds {held}); expected x_train/y_train, and "
                                "x_test/y_test for --test-data", path=str(path))
            keys = [x_key] + ([y_key] if y_key in npz.files else [])
            check_npz_sizes(path, npz.zip, keys)  # from the headers, before any array is allocated
            x = npz[x_key]
            y = npz[y_key] if y_key in npz.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"cannot read {path} as a NumPy .npz file ({type(err).__name__}: {err})", path=str(path)) from None
    x = _npz_images(path, x_key, x)
    labels = _npz_labels(path, y_key, y, len(x)) if y is not None else None
    bad_rows: list[tuple[int, str]] = []
    if x.dtype != np.uint8:  # other numbers must still be whole pixel values 0-255
        flat = x.reshape(len(x), -1)
        ok = (np.isfinite(flat) & (flat >= 0) & (flat <= 255) & (flat == np.round(flat))).all(axis=1)
        bad_rows = [(i, _pixel_problem(flat[i]) or "") for i in np.flatnonzero(~ok).tolist()]
    if labels is not None:
        bad_rows += [(i, _npz_label_problem(y_key, i, name)) for i, name in enumerate(labels)
                     if not name or label_problem(name) or name == _UNDECODABLE]
    skip = {i for i, _ in bad_rows}
    keep = [i for i in range(len(x)) if i not in skip]
    images = x[keep].astype(np.uint8) if skip or x.dtype != np.uint8 else x
    return Table(images, [labels[i] for i in keep] if labels is not None else None, keep,
                 sorted(bad_rows), where=f"{x_key}[{{}}]")


# Bytes labels are class names in UTF-8; a label that is not is skipped (this marks it: no text has it).
_UNDECODABLE = "\0undecodable"
# Deflate packs at most about 1,000:1, real image arrays 3-20:1. A member that unpacks to more than
# this many bytes at over _BOMB_RATIO:1 holds (nearly) blank images: a zip bomb, not a data set.
_BOMB_BYTES, _BOMB_RATIO = 256 << 20, 200


def _decoded(value: bytes | str) -> str:
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return _UNDECODABLE


def _npz_label_problem(key: str, i: int, name: str) -> str:
    if name == _UNDECODABLE:
        return f"label {key}[{i}] is bytes that are not UTF-8 text; save class names as UTF-8 (or class numbers)"
    return label_problem(name) or f"missing label ({key}[{i}] is NaN or empty)"


def check_npz_sizes(path: Path, archive: zipfile.ZipFile, keys: list[str]) -> None:
    """Refuse arrays of an ``.npz`` whose ``.npy`` headers claim more than the zip member holds, more
    than half of this machine's memory (as for IDX files), or that unpack like a zip bomb; reads only
    the headers. Raises ``DataError`` naming the file and the array."""
    limit, total = physical_memory() // 2, 0
    names = set(archive.namelist())
    for key in keys:
        info = archive.getinfo(f"{key}.npy" if f"{key}.npy" in names else key)
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read_header(member, max_header_size=10000)
            header_len = member.tell()
        need = math.prod(shape) * dtype.itemsize
        total += need
        where = f"{key} in {path}: its header claims shape {shape} of {dtype}, {need / 1e9:.3g} GB"
        if need > info.file_size - header_len:
            raise DataError(f"{where}, but the file holds {max(0, info.file_size - header_len):,} data bytes: the file is damaged "
                            "or not what its header says", path=str(path))
        if total > limit:
            raise DataError(f"{where}, more than half of this machine's memory ({limit * 2 / 1e9:.3g} GB): too large to load",
                            path=str(path))
        if need > _BOMB_BYTES and need > _BOMB_RATIO * max(1, info.compress_size):
            raise DataError(f"{where}, packed into {info.compress_size:,} bytes ({need // max(1, info.compress_size):,}:1): "
                            "a zip bomb of blank images, not a data set; refused before unpacking", path=str(path))


def _npz_images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """``x`` as N x 28 x 28; any other shape or a non-numeric type is bad input."""
    shape = tuple(x.shape)
    if x.ndim == 4 and shape[1:] in ((SIDE, SIDE, 1), (1, SIDE, SIDE)):
        x = x.reshape(shape[0], SIDE, SIDE)
    elif x.ndim == 2 and shape[1] == PIXELS:
        x = x.reshape(shape[0], SIDE, SIDE)
    elif not (x.ndim == 3 and shape[1:] == (SIDE, SIDE)):
        raise DataError(f"{key} in {path} has shape {shape}; expected images of (N, 28, 28), (N, 28, 28, 1) or (N, 784)",
                        path=str(path))
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{key} in {path} holds {x.dtype} values; expected pixel numbers 0-255", path=str(path))
    return x


def _npz_labels(path: Path, key: str, y: np.ndarray, n: int) -> list[str]:
    """One class name per image ('' where the label is missing)."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{key} in {path} has shape {tuple(y.shape)}; expected one label per image, shape ({n},) "
                        "(class indices, not one-hot rows)", path=str(path))
    if len(y) != n:
        raise DataError(f"{path} holds {n} images but {len(y)} labels in {key}; they must match one to one", path=str(path))
    if np.issubdtype(y.dtype, np.floating):
        return ["" if np.isnan(v) else _class_name(repr(float(v))) for v in y.tolist()]
    if np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_):
        return [str(int(v)) for v in y.tolist()]
    if y.dtype.kind in "US":
        return [_class_name(_decoded(v).strip()) for v in y.tolist()]
    raise DataError(f"{key} in {path} holds {y.dtype} values; expected class indices or names", path=str(path))


# ------------------------------------------------------------------------------------------------
# A flat image folder with a labels CSV


def _outside(file: Path, name: str, inside: str) -> str | None:
    """Why a listed ``name`` (``file`` once joined to the list's folder) reaches outside the folder
    ``inside`` (real path), or None. A labels list must not make training read arbitrary files:
    absolute names, ``..`` that climbs out, and symbolic links that lead out are all refused."""
    real = os.path.realpath(file)
    if real.startswith(inside.rstrip(os.sep) + os.sep):
        return None
    if os.path.isabs(name):
        how = "an absolute path"
    elif ".." in Path(name).parts:
        how = "a path that climbs out of the folder"
    else:
        how = "a symbolic link that leads out of the folder"
    return f"{name} is {how} ({real}); list only files inside {inside}, or copy them there"


def read_labels_csv(path: Path) -> tuple[list[tuple[int, Path, str]], list[dict[str, str]], set[Path]]:
    """Read a ``filename,label`` list: its ``(line, image file, class name)`` entries, its bad rows,
    and every file it names (bad rows included, so that such a file is not reported twice).

    File names are relative to the CSV's folder. A row without two cells, without a file name or
    without a label, and a file listed twice, are skipped with the reason.
    """
    entries: list[tuple[int, Path, str]] = []
    skipped: list[dict[str, str]] = []
    seen: dict[Path, int] = {}
    rows = _csv_rows(read_lines(path))
    if rows and rows[0][1] and rows[0][1][0].strip().lower() in _FILE_WORDS and rows[0][1][-1].strip().lower() in _LABEL_WORDS:
        rows = rows[1:]  # the header
    inside = os.path.realpath(path.parent)
    for no, row in rows:
        name, label = (row[0].strip(), row[1].strip()) if len(row) == 2 else ("", "")
        file = Path(os.path.normpath(path.parent / name)) if "\0" not in name else path.parent
        if not row:
            problem = f"a cell of over {csv.field_size_limit():,} characters: not a file name and a label"
        elif len(row) != 2:
            problem = f"{len(row)} values; expected filename,label"
        elif "\0" in name:
            problem = "the file name holds a NUL character"
        elif not name:
            problem = "no file name"
        elif (where := _outside(file, name, inside)) is not None:
            skipped.append({"path": str(path), "reason": f"line {no}: {where}", "outside": "1"})
            continue
        elif file in seen:
            problem = f"{name} is listed again (first on line {seen[file]})"
        elif not label or label_problem(label):
            seen[file] = no
            problem = f"{name}: {label_problem(label)}" if label else f"missing label for {name}"
        else:
            seen[file] = no
            entries.append((no, file, _class_name(label)))
            continue
        skipped.append({"path": str(path), "reason": f"line {no}: {problem}"})
    return entries, skipped, set(seen)


def _csv_rows(lines: list[str]) -> list[tuple[int, list[str]]]:
    """``(line number, cells)`` of the non-empty rows; a row the csv module cannot read (a cell over
    its size limit) is kept with no cells, so that the caller skips it with a reason."""
    reader = csv.reader(lines)
    rows: list[tuple[int, list[str]]] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error:
            rows.append((reader.line_num, []))
            continue
        if any(c.strip() for c in row):
            rows.append((reader.line_num, row))
