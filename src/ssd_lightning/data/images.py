"""Image decoding to the sample contract: uint8 HWC RGB, EXIF orientation applied.

The fast path is OpenCV (``cv2.imdecode`` with ``IMREAD_COLOR``, about 0.7 ms for a 640x480 JPEG):
it applies the EXIF orientation, expands grey to 3 channels, drops alpha, converts CMYK JPEGs
and scales 16-bit PNGs to 8 bits. OpenCV decodes a truncated JPEG without an error (it fills the
missing rows with grey and prints a warning), so a JPEG whose bytes do not end with the EOI marker
takes the strict Pillow path instead, which raises on truncation but still accepts files with
trailing data after EOI. Pillow is also the fallback for anything OpenCV cannot decode.
"""

from __future__ import annotations

import io
import os
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
# Images above this many pixels are bad samples (data.max_image_pixels): 100 megapixels decode
# to 300 MB of RGB; OpenCV refuses files above 2^30 pixels with an error that names no file.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000


class ImageReadError(OSError):
    """An image file is missing, unreadable, truncated or not an image; the message names it."""


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than the configured limit; the message names it."""


def read_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode an image file to RGB.

    Args:
        path: Image file (JPEG, PNG, BMP, WebP, TIFF, ...).
        max_pixels: Refuse images with more pixels (checked on the header, before decoding);
            None for no limit.

    Returns:
        The pixels with the EXIF orientation applied; grey, RGBA, CMYK and 16-bit images are
        converted to 8-bit RGB (alpha is dropped, not composited).

    Shape:
        - Output: (H, W, 3) uint8, RGB.

    Raises:
        ImageReadError: if the file is missing, truncated or cannot be decoded.
        ImageTooLargeError: if it has more than ``max_pixels`` pixels.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageReadError(f"{os.fspath(path)}: cannot read image file: {e.strerror or e}") from e
    if not data:
        raise ImageReadError(f"{os.fspath(path)}: image file is empty")
    if max_pixels is not None:
        _check_pixels(_header_size(io.BytesIO(data), path), max_pixels, path)
    if not (data.startswith(_JPEG_SOI) and not _ends_with_eoi(data)):
        try:
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:  # e.g. a header OpenCV refuses; Pillow decides below
            bgr = None
        if bgr is not None:
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return _decode_with_pil(data, path)


def check_image_file(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[int, int]:
    """Setup-time check without decoding: readable header, pixel limit, not truncated.

    Truncation is detected for JPEG (no End-Of-Image marker) and PNG (no IEND chunk), the
    formats whose end is marked; the header gives the size and format of every other.

    Returns:
        (height, width) after EXIF orientation, as ``read_image`` would return them.

    Raises:
        ImageReadError: empty, missing, not an image, or truncated (the message says which).
        ImageTooLargeError: more than ``max_pixels`` pixels.
    """
    size = read_image_size(path)
    if max_pixels is not None:
        _check_pixels(size, max_pixels, path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
            tail = f.read()
    except OSError as e:
        raise ImageReadError(f"{os.fspath(path)}: cannot read image file: {e.strerror or e}") from e
    if head.startswith(_JPEG_SOI) and not _ends_with_eoi(tail):
        raise ImageReadError(f"{os.fspath(path)}: truncated JPEG (no End-Of-Image marker)")
    if head.startswith(_PNG_SIGNATURE) and not tail.rstrip(b"\x00").endswith(_PNG_IEND):
        raise ImageReadError(f"{os.fspath(path)}: truncated PNG (no IEND chunk)")
    return size


def _check_pixels(size: tuple[int, int], max_pixels: int, path: str | os.PathLike[str]) -> None:
    height, width = size
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"{os.fspath(path)}: image is {width}x{height} ({height * width / 1e6:.0f} "
            f"megapixels), above the limit of {max_pixels / 1e6:.0f} (data.max_image_pixels)"
        )


def _ends_with_eoi(data: bytes) -> bool:
    """Whether JPEG bytes end with the End-Of-Image marker (ignoring zero/whitespace padding)."""
    return data[-64:].rstrip(b"\x00\r\n \t").endswith(_JPEG_EOI)


def _decode_with_pil(data: bytes, path: str | os.PathLike[str]) -> np.ndarray:
    """Strict decoding with Pillow: raises on truncated files."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I"):
                # 16-bit grey: Pillow's convert("RGB") clips at 255; scale like OpenCV does.
                grey = (np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
            return np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{os.fspath(path)}: image too large to decode: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{os.fspath(path)}: cannot decode image: {e}") from e


def read_image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Size of an image after EXIF orientation, from its header only (about 40 us).

    Returns:
        (height, width) as ``read_image`` would return them.

    Raises:
        ImageReadError: if the file is missing or its header is not a known image format.
    """
    return _header_size(path, path)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation from the header; PNG's ``getexif`` would decode the whole image."""
    if img.format != "PNG":
        return img.getexif().get(0x0112, 1)
    exif = Image.Exif()
    if "exif" in img.info:  # an eXIf chunk before the pixel data
        exif.load(img.info["exif"])
    return exif.get(0x0112, 1)


def _header_size(source: str | os.PathLike[str] | io.BytesIO, path: str | os.PathLike[str]):
    """(height, width) after EXIF orientation from the header of a file or bytes."""
    try:
        with warnings.catch_warnings():  # the pixel limit is ours (max_pixels), not Pillow's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                orientation = _orientation(img)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{os.fspath(path)}: image too large to decode: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{os.fspath(path)}: cannot read image header: {e}") from e
    # EXIF orientations 5..8 swap width and height.
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)
