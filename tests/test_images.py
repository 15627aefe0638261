"""common/images.py: every file PIL reads becomes the RGB image it shows, high bit depths included."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.images import open_rgb

GRADIENT = (np.arange(48 * 64, dtype=np.int64).reshape(48, 64) * 21).clip(0, 65535)  # 0 .. 64491


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16B", ".tif"), ("I", ".tif")])
def test_16_bit_grayscale_is_scaled_not_white(tmp_path, mode, suffix):
    """A 16-bit grayscale PNG opens as I;16; clipping its values to 8 bits made it all white."""
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    image = Image.fromarray(GRADIENT.astype(dtype))
    assert image.mode == mode
    path = tmp_path / f"gray{suffix}"
    image.save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(open_rgb(str(path)))
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb[..., 0].astype(int) - np.round(GRADIENT / 257)).max() <= 1
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()


def test_float_image_in_0_1_is_scaled(tmp_path):
    values = (GRADIENT / 65535).astype(np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    rgb = np.asarray(open_rgb(str(path)))
    assert np.abs(rgb[..., 0].astype(int) - np.round(values * 255)).max() <= 1


def test_8_bit_images_are_unchanged(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for mode in ("RGB", "L", "P", "RGBA"):
        path = tmp_path / f"img_{mode}.png"
        Image.fromarray(pixels).convert(mode).save(path)
        expected = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(np.asarray(open_rgb(str(path))), expected), mode
