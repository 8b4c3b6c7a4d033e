"""One image file -> one 28x28 MNIST-style digit: formats, colour modes, polarity, layout, bad files.

Every image is drawn here with Pillow and written to ``tmp_path``; expectations are pixel values,
bounding boxes and centres of mass, compared with a reference computed from the same drawing.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cnn_finetune.data.imageprep import (
    BOX,
    SIDE,
    UnusableImage,
    load_image_file,
    normalise_polarity,
    preprocess_pil,
    to_grayscale,
)


def draw_seven(size: tuple[int, int], ink: int = 0, background: int = 255, mode: str = "L") -> Image.Image:
    """A '7' (top bar + diagonal, asymmetric on purpose) filling most of a ``size`` image, no anti-aliasing."""
    w, h = size
    img = Image.new(mode, size, background)
    d = ImageDraw.Draw(img)
    stroke = max(1, min(w, h) // 10)
    d.line((w * 0.2, h * 0.15, w * 0.8, h * 0.15), fill=ink, width=stroke)
    d.line((w * 0.8, h * 0.15, w * 0.4, h * 0.85), fill=ink, width=stroke)
    return img


def ink_box_and_centre(out: np.ndarray, threshold: float = 0.2 * 255) -> tuple[int, int, float, float]:
    """(height, width) of the ink bounding box and the (row, col) centre of mass of a 28x28 digit."""
    ys, xs = np.nonzero(out > threshold)
    rows, cols = np.indices(out.shape)
    total = float(out.astype(np.float64).sum())
    cy = float((rows * out).sum() / total)
    cx = float((cols * out).sum() / total)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1), cy, cx


def draw_blob(size: tuple[int, int]) -> Image.Image:
    """A dark filled ellipse over the middle 80% of a white image of any size, even 5 x 5 or 1000 x 37."""
    w, h = size
    img = Image.new("L", size, 255)
    ImageDraw.Draw(img).ellipse((w * 0.1, h * 0.1, w * 0.9 - 1, h * 0.9 - 1), fill=0)
    return img


def border(out: np.ndarray) -> np.ndarray:
    """The outer one-pixel frame of an image, flattened."""
    return np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])


def assert_mnist_like(out: np.ndarray) -> None:
    """Bright strokes on a black background, ink box of ~20 px on its long side, centred by mass on (14, 14)."""
    assert out.shape == (SIDE, SIDE) and out.dtype == np.uint8
    # Centring by mass may push a lopsided digit against an edge (as in MNIST), so the frame is
    # mostly, not entirely, black.
    assert np.median(border(out)) == 0 and (out == 0).mean() > 0.5, "the background must be black"
    assert out.max() >= 200, "the strokes must be bright"
    h, w, cy, cx = ink_box_and_centre(out)
    assert BOX - 2 <= max(h, w) <= BOX + 1, (h, w)
    assert abs(cy - 14) <= 1.0 and abs(cx - 14) <= 1.0, (cy, cx)


def save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


# ------------------------------------------------------------------------------------------------
# Layout: crop, fit into 20x20, centre by mass


@pytest.mark.parametrize("size", [(200, 120), (120, 200), (64, 64), (28, 28), (2000, 1500)])
def test_dark_digit_on_white_becomes_mnist_layout(tmp_path: Path, size: tuple[int, int]) -> None:
    out = load_image_file(save(draw_seven(size), tmp_path / "seven.png"))
    assert_mnist_like(out)


@pytest.mark.parametrize("size", [(1000, 37), (37, 1000), (5, 5), (7, 3), (3, 200)])
def test_odd_sizes(tmp_path: Path, size: tuple[int, int]) -> None:
    out = load_image_file(save(draw_blob(size), tmp_path / "blob.png"))
    assert_mnist_like(out)
    h, w, _, _ = ink_box_and_centre(out)
    long_side_is_width = size[0] >= size[1]
    assert (w if long_side_is_width else h) == BOX


def test_aspect_ratio_is_kept() -> None:
    # A 100 x 50 (w x h) dark rectangle on white: its 20-px fit is 20 wide and 10 high.
    img = Image.new("L", (300, 200), 255)
    ImageDraw.Draw(img).rectangle((100, 75, 199, 124), fill=0)
    out = preprocess_pil(img)
    h, w, cy, cx = ink_box_and_centre(out, threshold=127)
    assert (h, w) == (10, 20)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    assert (out[out > 127] == 255).all()  # a solid block stays solid after anti-aliased resizing


def test_tiny_5x5_image_is_enlarged_to_20px() -> None:
    arr = np.zeros((5, 5), np.uint8)
    arr[1:4, 1] = 255
    arr[3, 1:4] = 255  # an 'L' of 3x3 pixels on black
    out = preprocess_pil(Image.fromarray(arr))
    assert_mnist_like(out)


def test_centre_of_mass_not_box_centre_is_centred() -> None:
    # A heavy block at the left and a thin tail at the right: the box centre and mass centre differ.
    img = Image.new("L", (100, 100), 0)
    d = ImageDraw.Draw(img)
    d.rectangle((0, 35, 29, 64), fill=255)
    d.rectangle((30, 45, 99, 54), fill=255)
    out = preprocess_pil(img)
    h, w, cy, cx = ink_box_and_centre(out)
    assert w == BOX
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    xs = np.nonzero(out.max(axis=0) > 50)[0]
    box_centre = (xs.min() + xs.max()) / 2
    assert box_centre - 13.5 >= 1.5, "the box must sit off-centre, towards the light tail"


# ------------------------------------------------------------------------------------------------
# Polarity


def test_normalise_polarity_modes() -> None:
    dark_on_white = np.full((10, 10), 250.0, np.float32)
    dark_on_white[4:6, 4:6] = 5.0
    bright_on_dark = 255.0 - dark_on_white
    np.testing.assert_array_equal(normalise_polarity(dark_on_white, "auto"), bright_on_dark)
    np.testing.assert_array_equal(normalise_polarity(bright_on_dark, "auto"), bright_on_dark)
    np.testing.assert_array_equal(normalise_polarity(bright_on_dark, "invert"), dark_on_white)
    np.testing.assert_array_equal(normalise_polarity(dark_on_white, "keep"), dark_on_white)
    with pytest.raises(ValueError, match="polarity"):
        normalise_polarity(dark_on_white, "flip")


@pytest.mark.parametrize("background", [255, 0])
def test_auto_polarity_gives_same_digit_for_either_input_polarity(background: int) -> None:
    reference = preprocess_pil(draw_seven((90, 70)))  # dark on white
    out = preprocess_pil(draw_seven((90, 70), ink=255 - background, background=background))
    np.testing.assert_array_equal(out, reference)


@pytest.mark.parametrize("polarity, expect_inverse", [("auto", True), ("invert", True), ("keep", False)])
def test_processed_28x28_only_changes_gray_and_polarity(polarity: str, expect_inverse: bool) -> None:
    rng = np.random.default_rng(0)
    arr = np.full((SIDE, SIDE), 240, np.uint8)
    arr[5:23, 8:20] = rng.integers(0, 120, (18, 12))  # dark, textured ink on a light background
    out = preprocess_pil(Image.fromarray(arr), polarity=polarity, light=True)
    np.testing.assert_array_equal(out, 255 - arr if expect_inverse else arr)


def test_processed_28x28_rgb_is_converted_to_luminance() -> None:
    rng = np.random.default_rng(1)
    rgb = np.zeros((SIDE, SIDE, 3), np.uint8)
    rgb[6:22, 6:22] = rng.integers(60, 256, (16, 16, 3))
    img = Image.fromarray(rgb)
    out = preprocess_pil(img, light=True)
    np.testing.assert_array_equal(out, np.asarray(img.convert("L")))


def test_light_path_does_not_apply_to_other_sizes() -> None:
    out = preprocess_pil(draw_seven((60, 40)), light=True)
    assert_mnist_like(out)


# ------------------------------------------------------------------------------------------------
# Colour modes


def rgba_stroke(stroke: tuple[int, int, int], hidden: tuple[int, int, int]) -> Image.Image:
    """An opaque '7' in ``stroke`` colour on fully transparent pixels whose (invisible) colour is ``hidden``."""
    img = Image.new("RGBA", (80, 80), hidden + (0,))
    mask = draw_seven((80, 80), ink=255, background=0)
    img.paste(Image.new("RGBA", (80, 80), stroke + (255,)), mask=mask)
    return img


@pytest.mark.parametrize("stroke", [(0, 0, 0), (255, 255, 255)], ids=["dark-stroke", "bright-stroke"])
@pytest.mark.parametrize("hidden", [(0, 0, 0), (255, 255, 255)], ids=["black-transparent", "white-transparent"])
def test_rgba_on_transparent_background_gives_bright_strokes_on_dark(tmp_path: Path, stroke: tuple, hidden: tuple) -> None:
    path = save(rgba_stroke(stroke, hidden), tmp_path / "alpha.png")
    assert Image.open(path).mode == "RGBA"
    out = load_image_file(path)
    reference = preprocess_pil(draw_seven((80, 80)))
    np.testing.assert_array_equal(out, reference)


def test_rgba_partial_alpha_is_composited() -> None:
    # Dark ink at half opacity on a transparent background reads as mid-grey on white.
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((1, 1), (0, 0, 0, 128))
    img.putpixel((2, 2), (0, 0, 0, 255))
    gray = to_grayscale(img)
    assert gray[0, 0] == 255.0 and gray[2, 2] == 0.0
    assert gray[1, 1] == pytest.approx(255 * (1 - 128 / 255), abs=0.01)


def palette_image(transparent: bool) -> Image.Image:
    """A 'P' image: index 0 background (white, or transparent), index 1 a black '7'."""
    mask = np.asarray(draw_seven((80, 80), ink=1, background=0))
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette([255, 255, 255, 0, 0, 0] + [0, 0, 0] * 254)
    if transparent:
        img.info["transparency"] = 0
    return img


@pytest.mark.parametrize("transparent", [False, True], ids=["opaque", "transparent"])
@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_images(tmp_path: Path, transparent: bool, fmt: str) -> None:
    img = palette_image(transparent)
    path = save(img, tmp_path / f"pal.{fmt}", **({"transparency": 0} if transparent else {}))
    reopened = Image.open(path)
    assert reopened.mode == "P" and (("transparency" in reopened.info) == transparent)
    np.testing.assert_array_equal(load_image_file(path), preprocess_pil(draw_seven((80, 80))))


def test_sixteen_bit_values_are_rescaled_not_clipped(tmp_path: Path) -> None:
    arr = np.full((SIDE, SIDE), 1000, np.uint16)
    arr[5:10, 5:20] = 65535
    arr[12:17, 5:20] = 40000
    arr[19:24, 5:20] = 20000
    path = save(Image.fromarray(arr), tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    out = load_image_file(path, light=True)
    expected = np.rint(arr / 257.0).astype(np.uint8)  # 65535 -> 255, 40000 -> 156, 20000 -> 78, 1000 -> 4
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_sixteen_bit_raw_image_gets_mnist_layout(tmp_path: Path, ext: str) -> None:
    mask = np.asarray(draw_seven((90, 60), ink=255, background=0)) > 0
    arr = np.where(mask, 30000, 500).astype(np.uint16)  # all of it far above 255: clipping would blank it
    path = save(Image.fromarray(arr), tmp_path / f"deep.{ext}")
    assert Image.open(path).mode == "I;16"
    out = load_image_file(path)
    assert_mnist_like(out)
    np.testing.assert_allclose(out, preprocess_pil(draw_seven((90, 60))), atol=2)


# ------------------------------------------------------------------------------------------------
# File formats


@pytest.mark.parametrize(
    "ext, kwargs, exact",
    [
        ("png", {}, True),
        ("bmp", {}, True),
        ("gif", {}, True),
        ("tiff", {}, True),
        ("webp", {"lossless": True}, True),
        ("webp", {"quality": 90}, False),
        ("jpg", {"quality": 90}, False),
    ],
)
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_formats(tmp_path: Path, ext: str, kwargs: dict, exact: bool, mode: str) -> None:
    drawing = draw_seven((120, 90)).convert(mode)
    path = save(drawing, tmp_path / f"digit.{ext}", **kwargs)
    out = load_image_file(path)
    reference = preprocess_pil(draw_seven((120, 90)))
    assert_mnist_like(out)
    if exact:
        np.testing.assert_array_equal(out, reference)
    else:  # lossy: the same digit up to compression noise
        assert np.abs(out.astype(int) - reference).mean() < 6


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    first = draw_seven((80, 80))
    second = Image.new("L", (80, 80), 255)
    ImageDraw.Draw(second).rectangle((35, 5, 45, 75), fill=0)  # a '1'
    path = tmp_path / "anim.gif"
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    out = load_image_file(path)
    np.testing.assert_array_equal(out, preprocess_pil(first))
    assert not np.array_equal(out, preprocess_pil(second))


# ------------------------------------------------------------------------------------------------
# Unusable files: a reason for the report, never a crash


def truncated(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty file"),
        ("notes.png", b"this is a text file, not a picture\n", "not an image"),
        ("half.png", truncated(draw_seven((64, 64)).convert("RGB"), "PNG"), "truncated or corrupt"),
        ("half.jpg", truncated(draw_seven((64, 64)).convert("RGB"), "JPEG"), "truncated or corrupt"),
    ],
)
def test_unusable_files_raise_with_reason(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnusableImage, match=reason):
        load_image_file(path)


@pytest.mark.parametrize("size, light", [((50, 40), False), ((SIDE, SIDE), False), ((SIDE, SIDE), True)])
@pytest.mark.parametrize("level", [255, 0, 128])
def test_blank_images_are_unusable(tmp_path: Path, size: tuple[int, int], light: bool, level: int) -> None:
    path = save(Image.new("L", size, level), tmp_path / "blank.png")
    with pytest.raises(UnusableImage, match="blank"):
        load_image_file(path, light=light)


def test_thin_stroke_from_a_large_image_keeps_full_contrast() -> None:
    # A 1-pixel line across a 1000 x 400 image shrinks far below one pixel of width; its ink is
    # rescaled to the full range, as MNIST digits have, instead of coming out faint.
    arr = np.full((400, 1000), 255, np.uint8)
    arr[200, 50:950] = 0
    arr[150:250, 500] = 0
    out = preprocess_pil(Image.fromarray(arr))
    assert out.max() == 255


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    from cnn_finetune.data.imageprep import UnusableImage

    path = save(draw_seven((120, 100)), tmp_path / "seven.png")
    assert load_image_file(path, max_pixels=12_000).shape == (SIDE, SIDE)
    with pytest.raises(UnusableImage, match=r"^image too large: 120 x 100 = 12,000 pixels, over the limit of 11,999 "):
        load_image_file(path, max_pixels=11_999)


@pytest.mark.parametrize("size", [(SIDE, SIDE), (40, 30)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_float_image_with_non_finite_pixels_is_unusable_with_that_reason(tmp_path: Path, size: tuple[int, int], bad: float) -> None:
    """Found by tests/test_fuzz.py: such a TIFF was reported as "blank" or "truncated or corrupt"."""
    from cnn_finetune.data.imageprep import UnusableImage

    arr = np.full(size[::-1], 10.0, np.float32)
    arr[3:9, 4:10] = bad
    path = tmp_path / "float.tif"
    Image.fromarray(arr, "F").save(path)
    with pytest.raises(UnusableImage, match="^float image with NaN or infinite pixel values$"):
        load_image_file(path, light=True)
