"""Reading any image a user has into the encoder's RGB input.

Greyscale, 16-bit, CMYK, palette and alpha images become RGB; EXIF rotation
is applied; animated files give their first frame; a pixel limit guards
against decompression bombs. Every failure is an `ImageError` naming the file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import CapkitError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k; Pillow's own default is 89M and only warns


class ImageError(CapkitError):
    """One image could not be used; extraction reports it and goes on."""


@dataclass(frozen=True, eq=False)
class ImageBytes:
    """An encoded image held in memory (an upload), with the name its errors and results go by.

    Compared by identity, not content: two uploads may share a name, or bytes.
    """

    name: str     # shown in messages and results: "upload.jpg", "request 3, image 2"
    data: bytes   # the file's bytes, any format `decode_image` reads


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders into a sorted list of image files.

    A folder contributes its files with an image suffix (not recursive); a file
    is taken as given, whatever its suffix. A missing path is an error.
    """
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            try:
                out.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
            except OSError as e:
                raise CapkitError(f"{item}: cannot list the folder ({e.strerror or e})") from None
        elif item.exists():
            out.append(item)
        else:
            raise CapkitError(f"{item}: no such file or folder")
    return out


def decode_image(data: bytes, size: int, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to a (size, size, 3) uint8 array, squashed like Keras's `load_img`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        Image.MAX_IMAGE_PIXELS = None  # we apply our own, settable limit below
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(
                f"{name}: {w}x{h} pixels is over the limit of {max_pixels:,}",
                hint="raise it with --max-pixels if you trust this file",
            )
        if getattr(img, "is_animated", False):
            img.seek(0)
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # DCT-domain downscale: far less to decode for big photos
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read") from None
    except Exception as e:  # damaged files make Pillow raise anything (OverflowError from a bad TIFF tag, ...)
        raise ImageError(f"{name}: unreadable image ({e or type(e).__name__})") from None


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Composite transparency on white: what a viewer shows, not black garbage.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def read_image(path: str | Path, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`decode_image` of a file; permissions and I/O errors become `ImageError`."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    return decode_image(data, size, str(path), max_pixels)
