"""Image files to pixel arrays, one rule for training (``data.source = "images"``) and serving (image bodies).

The rule: EXIF orientation is applied; transparent pixels (an alpha channel, or a PNG's transparent palette entries or
single transparent colour) are laid on white; colour goes to one channel by ITU-R
601-2 luma (``L = 0.299 R + 0.587 G + 0.114 B``, Pillow's ``convert("L")``) or gray to three by repeating it;
16-bit grayscale is brought to 0..255. An image whose size differs from (H, W) is centre-cropped to the aspect ratio
H:W and resized with a Lanczos filter (Pillow's ``ImageOps.fit``), so nothing is stretched. Pixels stay 0..255.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what Pillow is allowed to decode
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp")
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than ``open_image`` was allowed to decode: ``pixels`` of them, and
    ``size`` (W, H) where the header's size is known (not for those Pillow itself refuses, above 2 * MAX_IMAGE_PIXELS)."""

    def __init__(self, pixels: int, size: tuple[int, int] | None, limit: int):
        self.pixels, self.size, self.limit = pixels, size, limit
        # what the header declares, in words: '13000x13000 pixels (169.0 megapixels)'
        self.declared = f"{size[0]}x{size[1]} pixels ({pixels / 1e6:.1f} megapixels)" if size else f"{pixels / 1e6:.1f} megapixels"
        super().__init__(f"it declares {self.declared}, more than the {limit / 1e6:g} megapixels allowed")


def open_image(source: str | Path | bytes, max_pixels: int | None = None):
    """A decoded Pillow image from a file or bytes; OSError, ValueError or SyntaxError when it is not a readable image,
    ImageTooLarge (before decoding anything) when its header declares more than ``max_pixels`` (None: Pillow's limit)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:  # above 2 * Image.MAX_IMAGE_PIXELS Pillow refuses the header itself
        declared = re.search(r"\((\d+) pixels\)", str(e))
        if max_pixels is not None and declared:
            raise ImageTooLarge(int(declared.group(1)), None, max_pixels) from None
        raise ValueError(str(e)) from None
    except UnidentifiedImageError:
        if isinstance(source, str | Path):
            raise
        # Pillow's message names the stream object (<_io.BytesIO object at 0x...>), which says nothing to a client.
        raise UnidentifiedImageError("format not recognised") from None
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageTooLarge(image.width * image.height, image.size, max_pixels)
    try:
        image.load()  # decode now: a truncated or corrupt file fails here, not later
    except Image.DecompressionBombError as e:
        raise ValueError(str(e)) from None
    return ImageOps.exif_transpose(image)


def is_gray(image) -> bool:
    """Whether an image holds no colour by its mode (a palette counts as gray when every entry is)."""
    if image.mode in GRAY_MODES:
        return True
    if image.mode in ("P", "PA"):
        palette = np.asarray(image.getpalette() or [], dtype=np.uint8)
        rgb = palette[: len(palette) // 3 * 3].reshape(-1, 3)
        return bool((rgb == rgb[:, :1]).all())
    return False


def to_pixels(image, size: tuple[int, int], channels: int) -> np.ndarray:
    """uint8 pixels of ``image`` at ``size`` (H, W): (H, W) for one channel, (3, H, W) for three."""
    from PIL import Image, ImageOps

    if image.mode.startswith("I") or image.mode == "F":  # 16-bit or float gray: Pillow's convert("L") would clip at 255
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = Image.fromarray(np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8), "L")
        key = image.info.get("transparency")  # a PNG's transparent gray value, in the 16-bit range
        image = gray if key is None else Image.merge("LA", [gray, Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")])
    # "transparency" is a PNG's tRNS: transparent palette entries (P) or one transparent colour (1, L, RGB), which
    # convert("RGBA") turns into alpha like the palette's.
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("L" if channels == 1 else "RGB")
    height, width = size
    if image.size != (width, height):
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def image_input_shape(size: tuple[int, int], channels: int) -> tuple[int, ...]:
    """A version's input_shape: (H, W) for one channel, (3, H, W) for three."""
    return tuple(size) if channels == 1 else (channels, *size)


def size_and_channels(input_shape: tuple[int, ...]) -> tuple[tuple[int, int], int]:
    """The inverse of ``image_input_shape``."""
    if len(input_shape) == 2:
        return (int(input_shape[0]), int(input_shape[1])), 1
    return (int(input_shape[1]), int(input_shape[2])), int(input_shape[0])
