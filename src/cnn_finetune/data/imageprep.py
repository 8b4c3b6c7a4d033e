"""Turn one image file of any size, format and colour mode into a 28x28 MNIST-style digit.

MNIST was made by cropping each digit to its bounding box, fitting it into 20x20 with anti-aliasing
while keeping the aspect ratio, and pasting it into 28x28 so that its centre of mass sits in the
middle. Raw user images go through the same steps, so that a model trained on them sees what it
would see at prediction time. This module uses Pillow and NumPy only (no torch), so it is cheap to
run in worker threads and shared by training, evaluation and prediction.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from ..errors import NotRegularFile
from ..files.kinds import kind_of_mode, open_regular

SIDE = 28  # output side, pixels
BOX = 20  # the digit is fitted into a BOX x BOX square, as in MNIST
INK_THRESHOLD = 0.2  # share of the brightest ink above which a pixel counts for the bounding box
MIN_INK_RANGE = 12.0  # an image whose ink is fainter than this (0-255) is considered blank
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Decompression bombs: a 44 KB PNG can declare 13000 x 13000 pixels and take gigabytes to decode. An
# image over this many pixels is refused from its header, before decoding (48-50 MP phone photos pass;
# Pillow itself refuses anything over 2 x Image.MAX_IMAGE_PIXELS, about 179 MP, whatever the limit).
DEFAULT_MAX_PIXELS = 64_000_000
POLARITIES = ("auto", "invert", "keep")


class UnusableImage(Exception):
    """The file cannot be turned into a training image; the message is the reason for the report."""


def to_grayscale(img: Image.Image) -> np.ndarray:
    """Float32 luminance in [0, 255] for any Pillow mode; transparency composited on a background.

    A transparent background is replaced by the colour that contrasts with the visible strokes (white
    behind dark strokes, black behind bright ones), so drawings exported with alpha keep their ink.
    16- and 32-bit images are rescaled rather than clipped, so their full range maps onto 0-255.
    """
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img, dtype=np.float32) / 257.0
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():  # would read as "blank" or "corrupt" further down: say what it is
            raise UnusableImage("float image with NaN or infinite pixel values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 255:
            return arr.astype(np.float32)
        if hi - lo < 1e-12:
            return np.zeros(arr.shape, np.float32)
        return ((arr - lo) * (255.0 / (hi - lo))).astype(np.float32)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return np.asarray(img.convert("L"), dtype=np.float32)
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    gray = np.asarray(rgba.convert("L"), dtype=np.float32)
    if alpha.min() >= 1.0:
        return gray
    weight = alpha.sum()
    ink_mean = float((gray * alpha).sum() / weight) if weight > 0 else 0.0
    background = 255.0 if ink_mean < 128.0 else 0.0
    return gray * alpha + background * (1.0 - alpha)


def border_level(gray: np.ndarray) -> float:
    """Median of the outer frame of the image: the background level."""
    h, w = gray.shape
    k = max(1, min(h, w) // 20)
    frame = np.concatenate([gray[:k].ravel(), gray[-k:].ravel(), gray[:, :k].ravel(), gray[:, -k:].ravel()])
    return float(np.median(frame))


def normalise_polarity(gray: np.ndarray, polarity: str) -> np.ndarray:
    """Bright strokes on a dark background, as in MNIST; 'auto' decides from the border."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity={polarity!r}; choose one of {POLARITIES}")
    invert = polarity == "invert" or (polarity == "auto" and border_level(gray) > 127.5)
    return 255.0 - gray if invert else gray


def mnist_layout(ink: np.ndarray) -> np.ndarray:
    """Crop to the ink, fit into 20x20 keeping the aspect ratio, centre by mass in 28x28 (uint8)."""
    ink = np.clip(ink - border_level(ink), 0.0, None)
    peak = float(ink.max())
    if peak < MIN_INK_RANGE:
        raise UnusableImage("blank image: no strokes found")
    ink *= 255.0 / peak
    ys, xs = np.nonzero(ink > INK_THRESHOLD * 255.0)
    crop = ink[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8), mode="L").resize(
        size, Image.Resampling.LANCZOS, reducing_gap=3.0
    )
    small_arr = np.asarray(small, dtype=np.float32)
    # A thin stroke shrunk from a large photo comes out faint: restore full contrast, as MNIST's
    # digits have, so the model sees the same range whatever the source resolution.
    peak_small = float(small_arr.max())
    if 0 < peak_small < 255:
        small_arr = np.clip(np.rint(small_arr * (255.0 / peak_small)), 0, 255)
    total = float(small_arr.sum())
    if total <= 0:
        raise UnusableImage("blank image: no strokes left after resizing")
    rows, cols = np.indices(small_arr.shape)
    cy = float((rows * small_arr).sum() / total)
    cx = float((cols * small_arr).sum() / total)
    hh, ww = small_arr.shape
    oy = int(np.clip(round(SIDE / 2 - cy), 0, SIDE - hh))
    ox = int(np.clip(round(SIDE / 2 - cx), 0, SIDE - ww))
    out = np.zeros((SIDE, SIDE), np.uint8)
    out[oy: oy + hh, ox: ox + ww] = small_arr.astype(np.uint8)
    return out


def preprocess_pil(img: Image.Image, polarity: str = "auto", light: bool = False) -> np.ndarray:
    """A decoded image -> uint8 28x28. ``light``: the image is already 28x28 and only needs gray + polarity."""
    img = ImageOps.exif_transpose(img) or img
    gray = normalise_polarity(to_grayscale(img), polarity)
    if light and gray.shape == (SIDE, SIDE):
        out = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        # A uniform 28x28 file (e.g. an all-white one) would otherwise enter training as a black image.
        if int(out.max()) - int(out.min()) < MIN_INK_RANGE:
            raise UnusableImage("blank image: no strokes found")
        return out
    return mnist_layout(gray)


def load_image_file(path: Path, polarity: str = "auto", light: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode and preprocess one file; raises UnusableImage with a reason fit for the data report.

    Pillow reads only the header when it opens a file: an image of more than ``max_pixels`` pixels
    is refused at that point, before its pixels are decoded.
    """
    try:
        st = path.stat()
        what = kind_of_mode(st.st_mode)
        if what is not None:  # a FIFO or a device would block or never end: not opened
            raise UnusableImage(f"{what}, not an image file: skipped without opening it")
        if st.st_size == 0:
            raise UnusableImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd palettes; the result is what counts
            with open_regular(path) as fh, Image.open(fh) as img:
                img.seek(0)  # first frame of GIF/TIFF/WebP animations
                width, height = img.size
                if width * height > max_pixels:
                    raise UnusableImage(f"image too large: {width} x {height} = {width * height:,} pixels, over the limit of "
                                        f"{max_pixels:,} (max_image_pixels); not decoded")
                img.load()
                return preprocess_pil(img, polarity=polarity, light=light)
    except UnusableImage:
        raise
    except PermissionError:
        raise UnusableImage("permission denied (cannot read the file)") from None
    except NotRegularFile as err:  # swapped for a FIFO after the stat
        raise UnusableImage(f"{err.strerror}: skipped") from None
    except FileNotFoundError:
        raise UnusableImage("file not found (it vanished while the data was read)") from None
    except UnidentifiedImageError:
        raise UnusableImage("not an image: format not recognised") from None
    except Image.DecompressionBombError as err:
        raise UnusableImage(f"image too large: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        text = str(err) or type(err).__name__
        if "MAX_TEXT_CHUNK" in text:  # Pillow's only sign of it: a plain ValueError naming its limit
            raise UnusableImage("a metadata chunk (ICC colour profile or text) unpacks to more than Pillow's limit of "
                                f"{PngImagePlugin.MAX_TEXT_CHUNK:,} bytes: a damaged or hostile file, not decoded; "
                                "save the image again without its profile") from None
        raise UnusableImage(f"truncated or corrupt image: {text}") from None
