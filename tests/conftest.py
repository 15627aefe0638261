"""Shared fixtures: everything a test needs is made here, offline, on the CPU."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Two cores are shared by the whole suite; more threads only thrash.
torch.set_num_threads(min(2, torch.get_num_threads()))


def write_image(path: str, seed: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> str:
    """A random image file in the given PIL mode (format from the extension)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


@pytest.fixture
def make_imagenet(tmp_path):
    """Build ``<root>/val/<folder>/*.png``; returns the root. Folders are WordNet IDs unless given."""

    def make(folders=("n01440764", "n02102040", "n03000684"), per_class: int = 3, name: str = "imagenet"):
        root = tmp_path / name
        for c, folder in enumerate(folders):
            d = root / "val" / folder
            d.mkdir(parents=True)
            for i in range(per_class):
                write_image(str(d / f"img_{i}.png"), seed=100 * c + i)
        return str(root)

    return make
