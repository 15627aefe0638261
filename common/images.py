"""Image files: which names count as images, and reading one as RGB."""
from __future__ import annotations

from PIL import Image

# Extensions PIL reads that image datasets use (lower case; compare with name.lower()).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def open_rgb(path: str) -> Image.Image:
    """The image at `path` as RGB (grayscale, CMYK, RGBA and palette images converted).
    Raises what PIL raises for a missing, truncated or unreadable file."""
    with Image.open(path) as img:
        return img.convert("RGB")
