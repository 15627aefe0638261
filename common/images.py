"""Image files: which names count as images, and reading one as RGB."""
from __future__ import annotations

import numpy as np
from PIL import Image

# Extensions PIL reads that image datasets use (lower case; compare with name.lower()): the
# list of torchvision's ImageFolder, which the original evaluation used.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SIXTEEN_BIT = 257.0  # 65535 / 255: a 16-bit sample to 8 bits


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _to_8_bit(img: Image.Image) -> Image.Image:
    """Grayscale with more than 8 bits as 8-bit 'L'. PIL's convert() clips such values to
    255, so a 16-bit PNG became white. Integer modes (I;16*, and I, which PNG and TIFF
    readers also use for 16-bit samples) are scaled from 0..65535; float images (F)
    from 0..1 when their values lie there (the usual float convention), else like I."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
        values = values * 255.0
    else:
        values = values / SIXTEEN_BIT
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def open_rgb(path: str) -> Image.Image:
    """The image at `path` as RGB (grayscale of any bit depth, CMYK, RGBA and palette images
    converted). Raises what PIL raises for a missing, truncated or unreadable file."""
    with Image.open(path) as img:
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            return _to_8_bit(img).convert("RGB")
        return img.convert("RGB")
