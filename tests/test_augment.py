"""Batched augmentation: shapes, determinism from the generator, and the geometry checked against Pillow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cnn_finetune.data.augment import AugmentParams, affine_matrices, augment_batch, normalize, to_unit

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def pattern() -> np.ndarray:
    """An asymmetric 28x28 uint8 pattern: any rotation or flip of it is a different image."""
    p = np.zeros((28, 28), np.uint8)
    p[4:9, 5:21] = 255  # top bar
    p[4:16, 5:9] = 200  # left leg
    p[18:22, 16:20] = 120  # a lighter dot, lower right
    return p


def batch_of(p: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(p)[None, None].expand(n, 1, -1, -1).contiguous()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), generator=gen(seed), dtype=torch.uint8)


def test_output_shape_dtype_range_and_input_untouched() -> None:
    images = random_images(64)
    before = images.clone()
    out = augment_batch(images, AugmentParams(rotation=20, translate=0.2, scale=0.2, noise=0.3), gen(1))
    assert out.shape == images.shape and out.dtype == torch.float32 and out.device == images.device
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0  # strong noise reaches both clamps
    assert torch.equal(images, before)


def test_same_seed_same_batch_other_seed_other_batch() -> None:
    images = random_images()
    params = AugmentParams()
    a = augment_batch(images, params, gen(7))
    b = augment_batch(images, params, gen(7))
    c = augment_batch(images, params, gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


def test_generator_state_carries_on_between_batches() -> None:
    # One generator for two steps gives two different batches, reproducible from the seed.
    images = random_images()
    g = gen(3)
    first, second = augment_batch(images, AugmentParams(), g), augment_batch(images, AugmentParams(), g)
    assert not torch.equal(first, second)
    g2 = gen(3)
    augment_batch(images, AugmentParams(), g2)
    assert torch.equal(augment_batch(images, AugmentParams(), g2), second)


def test_all_zero_params_is_plain_scaling() -> None:
    images = random_images()
    out = augment_batch(images, AugmentParams(rotation=0, translate=0, scale=0, noise=0), gen(0))
    assert torch.equal(out, images.to(torch.float32) / 255)
    assert torch.equal(to_unit(images), images.to(torch.float32) / 255)


def test_rotation_by_90_degrees_matches_rot90() -> None:
    # Rotation angles are uniform in [-90, 90]; in a large batch the extreme samples are within a
    # few hundredths of a degree of +-90, where the result must be the pattern turned by a quarter.
    n = 2000
    params = AugmentParams(rotation=90, translate=0, scale=0, noise=0)
    out = augment_batch(batch_of(pattern(), n), params, gen(5))
    theta = affine_matrices(n, params, gen(5), CPU)
    angles = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    ref = torch.from_numpy(pattern()).float() / 255
    i_pos, i_neg = int(angles.argmax()), int(angles.argmin())
    assert float(angles[i_pos]) > 89.8 and float(angles[i_neg]) < -89.8
    # Positive angles turn counter-clockwise (as Pillow's Image.rotate and np.rot90 do).
    assert float((out[i_pos, 0] - torch.rot90(ref, 1, (0, 1))).abs().max()) < 0.01
    assert float((out[i_neg, 0] - torch.rot90(ref, -1, (0, 1))).abs().max()) < 0.01
    assert float((out[i_pos, 0] - torch.rot90(ref, -1, (0, 1))).abs().max()) > 0.5


def pillow_affine(p: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Pillow's bilinear affine warp with the same meaning as ``F.affine_grid(align_corners=False)``.

    ``theta`` maps output to input in [-1, 1] coordinates; in pixel-edge coordinates X = (u + 1) W / 2
    (which Pillow uses) that is X_in = A X_out + W/2 (1 - A 1 + t).
    """
    w = p.shape[1]
    a, t = theta[:, :2], theta[:, 2]
    data = (a[0, 0], a[0, 1], w / 2 * (1 - a[0, 0] - a[0, 1] + t[0]),
            a[1, 0], a[1, 1], w / 2 * (1 - a[1, 0] - a[1, 1] + t[1]))
    img = Image.fromarray(p).transform((w, w), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)
    return np.asarray(img, np.float32) / 255


@pytest.mark.parametrize("params", [
    AugmentParams(rotation=30, translate=0, scale=0, noise=0),
    AugmentParams(rotation=0, translate=0.2, scale=0, noise=0),
    AugmentParams(rotation=0, translate=0, scale=0.3, noise=0),
    AugmentParams(rotation=15, translate=0.1, scale=0.1, noise=0),
], ids=["rotate", "translate", "scale", "all"])
def test_geometry_matches_pillow_and_respects_the_limits(params: AugmentParams) -> None:
    n = 48
    out = augment_batch(batch_of(pattern(), n), params, gen(11))
    theta = affine_matrices(n, params, gen(11), CPU).double()
    # the drawn transforms stay within the requested strengths and use most of the range
    angles = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0])).abs()
    zoom = 1 / torch.linalg.det(theta[:, :, :2]).sqrt()
    shift = theta[:, :, 2].abs() / 2  # fraction of the side
    for value, limit in ((angles, params.rotation), ((zoom - 1).abs(), params.scale), (shift, params.translate)):
        assert float(value.max()) <= limit + 1e-6
        assert float(value.max()) >= 0.8 * limit
    # and each sample is exactly that warp, as Pillow computes it (Pillow works in 8 bits: ~1/255)
    for i in range(n):
        ref = pillow_affine(pattern(), theta[i].numpy())
        assert np.abs(out[i, 0].numpy() - ref).max() <= 1.5 / 255, i


@pytest.mark.parametrize("std", [0.02, 0.05, 0.1])
def test_noise_has_the_requested_std(std: float) -> None:
    params = AugmentParams(rotation=0, translate=0, scale=0, noise=std)
    grey = torch.full((128, 1, 28, 28), 128, dtype=torch.uint8)  # blank mid-grey: no clamping
    noise = augment_batch(grey, params, gen(2)) - 128 / 255
    assert float(noise.std()) == pytest.approx(std, rel=0.02)
    assert abs(float(noise.mean())) < 0.05 * std
    # On a black background the clamp keeps only the positive half: a rectified Gaussian.
    black = augment_batch(torch.zeros_like(grey), params, gen(2))
    assert float(black.mean()) == pytest.approx(std / math.sqrt(2 * math.pi), rel=0.03)
    assert float((black == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_normalize() -> None:
    x = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(normalize(x, 0.5, 0.25), torch.tensor([-2.0, 0.0, 2.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_images_device() -> None:
    images = random_images().cuda()
    params = AugmentParams()
    a = augment_batch(images, params, torch.Generator(device="cuda").manual_seed(4))
    b = augment_batch(images, params, torch.Generator(device="cuda").manual_seed(4))
    assert a.device.type == "cuda" and torch.equal(a, b)


@pytest.mark.parametrize("shape", [(7, 28, 28), (3, 17, 40)])
def test_sampling_grid_equals_affine_grid(shape: tuple[int, int, int]) -> None:
    from cnn_finetune.data.augment import AugmentParams, affine_matrices, sampling_grid

    b, h, w = shape
    g = torch.Generator().manual_seed(5)
    theta = affine_matrices(b, AugmentParams(rotation=30, translate=0.2, scale=0.3), g, torch.device("cpu"))
    expected = torch.nn.functional.affine_grid(theta, [b, 1, h, w], align_corners=False)
    torch.testing.assert_close(sampling_grid(theta, h, w), expected, atol=1e-6, rtol=0)


# --- elastic distortions (Simard et al. 2003) -------------------------------------------------------


def test_elastic_off_draws_no_random_number_and_changes_nothing() -> None:
    # Off (the default), the batch and the generator's state are those of the affine-only code, whatever
    # the smoothing: the default run stays bit for bit what it was before elastic distortions existed.
    images = random_images()
    for params in (AugmentParams(), AugmentParams(elastic=0.0, elastic_sigma=9.0)):
        g_ref, g = gen(4), gen(4)
        ref = augment_batch(images, AugmentParams(15.0, 0.12, 0.15, 0.05), g_ref)
        assert torch.equal(augment_batch(images, params, g), ref)
        assert torch.equal(g.get_state(), g_ref.get_state())


def test_a_vanishing_elastic_field_leaves_the_affine_warp() -> None:
    # The field is drawn after the affine parameters and added to the same sampling grid (one resampling):
    # scaled towards 0 the result is the affine-only batch, and at full strength it is not.
    images = batch_of(pattern(), 16)
    affine = AugmentParams(rotation=20, translate=0.1, scale=0.1, noise=0)
    plain = augment_batch(images, affine, gen(9))
    tiny = augment_batch(images, AugmentParams(20, 0.1, 0.1, 0, elastic=1e-6), gen(9))
    strong = augment_batch(images, AugmentParams(20, 0.1, 0.1, 0, elastic=34), gen(9))
    assert float((tiny - plain).abs().max()) < 1e-5
    assert float((strong - plain).abs().max()) > 0.3
    # the same generator state gives the same distorted batch; another state another one
    assert torch.equal(strong, augment_batch(images, AugmentParams(20, 0.1, 0.1, 0, elastic=34), gen(9)))
    assert float((strong - augment_batch(images, AugmentParams(20, 0.1, 0.1, 0, elastic=34), gen(10))).abs().max()) > 0.3


def test_elastic_smoothing_is_the_zero_padded_gaussian_convolution() -> None:
    from cnn_finetune.data.augment import gaussian_matrix

    sigma, radius = 4.0, 12
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
    kernel /= kernel.sum()
    field = torch.rand(3, 1, 28, 28, generator=gen(1)) * 2 - 1
    conv = torch.nn.functional.conv2d(field, kernel.view(1, 1, 1, -1), padding=(0, radius))
    conv = torch.nn.functional.conv2d(conv, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    rows, cols = gaussian_matrix(28, sigma, CPU), gaussian_matrix(28, sigma, CPU)
    torch.testing.assert_close(rows @ field @ cols.T, conv, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha, sigma", [(34.0, 4.0), (8.0, 2.0)])
def test_elastic_field_has_the_expected_size_in_pixels(alpha: float, sigma: float) -> None:
    # Away from the border each displacement is a sum of uniform [-1, 1] values (variance 1/3) weighted
    # by the 2-D kernel k_i k_j: its std is alpha * sqrt(sum k_i^2 k_j^2 / 3) = alpha * sum(k^2) / sqrt(3) pixels.
    from cnn_finetune.data.augment import elastic_field

    params = AugmentParams(elastic=alpha, elastic_sigma=sigma)
    field = elastic_field(400, 28, 28, params, gen(3), CPU)  # (B, H, W, [x, y]) in [-1, 1] units
    assert field.shape == (400, 28, 28, 2)
    pixels = field * 14  # a pixel is 2 / 28
    radius = math.ceil(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
    k /= k.sum()
    expected = alpha * float((k ** 2).sum()) / math.sqrt(3)
    inner = pixels[:, radius:28 - radius, radius:28 - radius]  # no zero padding within reach
    for axis in range(2):
        assert float(inner[..., axis].std()) == pytest.approx(expected, rel=0.05)
        assert abs(float(inner[..., axis].mean())) < 0.05 * expected
    # the field is smooth: neighbours move nearly together, unlike the raw per-pixel draw
    neighbours = torch.corrcoef(torch.stack([pixels[:, 10:18, 10, 0].flatten(), pixels[:, 10:18, 11, 0].flatten()]))[0, 1]
    assert float(neighbours) > 0.9
