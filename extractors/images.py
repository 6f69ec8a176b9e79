"""Decode image files into upright 8-bit RGB arrays for the feature extractors.

Shapes: H and W are the upright height and width in pixels. `decode_image` returns
`pixels` as uint8 (H, W, 3) in RGB channel order.

Every failure becomes an `ImageDecodeError` whose `reason` is one of
`DECODE_FAILURE_REASONS`, so a pipeline stage can record it per image and go on.
The conversion rules for each stored mode are listed in `decode_image` and in
docs/images.md.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest accepted width * height (100 megapixels), checked from the file header."""

DECODE_FAILURE_REASONS = (
    "not-found",
    "unreadable",
    "empty-file",
    "not-an-image",
    "truncated",
    "corrupt",
    "too-many-pixels",
    "unsupported-mode",
)

# Pillow 13.0 reports a file that ends early as "image file is truncated" or
# "Truncated File Read" (PIL/ImageFile.py).
# NOTE: if other code sets PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True, Pillow pads the
# missing data instead of raising, and a truncated file decodes without error.
_TRUNCATION_MARKER = "truncated"

_EXIF_ORIENTATION_TAG = 0x0112

# Exceptions that Pillow's format plugins raise on malformed data. MemoryError is not
# among them, so running out of memory still stops the caller.
_DECODER_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
)

# Modes converted with Pillow's own `convert("RGB")`: the colour channels are kept
# as stored and an alpha channel is dropped without compositing.
_DIRECT_RGB_MODES = frozenset({"1", "L", "RGB", "RGBX", "CMYK", "YCbCr"})
_ALPHA_MODES = frozenset({"LA", "RGBA", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageDecodeError(ValueError):
    """An image file that cannot be decoded.

    Attributes:
        reason: short machine-friendly cause, one of `DECODE_FAILURE_REASONS`.
        path: the file that failed.
        detail: the cause in words, also part of `str(error)`.
    """

    def __init__(self, reason: str, path: str | os.PathLike, detail: str) -> None:
        if reason not in DECODE_FAILURE_REASONS:
            raise ValueError(
                f"Unknown decode failure reason {reason!r}; use one of {DECODE_FAILURE_REASONS}."
            )
        self.reason = reason
        self.path = Path(path)
        self.detail = detail
        super().__init__(f"Cannot decode image {str(self.path)!r} ({reason}): {detail}")

    def __reduce__(self):
        # Keep reason, path and detail when the error crosses a process boundary (Ray tasks).
        return (type(self), (self.reason, self.path, self.detail))


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image.

    Attributes:
        pixels: uint8 (H, W, 3) RGB, C-contiguous, with any EXIF rotation applied.
        height: H, the upright height in pixels.
        width: W, the upright width in pixels.
    """

    pixels: np.ndarray
    height: int
    width: int


def decode_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode one image file into an upright uint8 RGB array.

    Rules, in order:
    - The pixel count is read from the header and checked against `max_pixels`
      before any pixel data is decoded. Pillow's process-wide Image.MAX_IMAGE_PIXELS
      is raised to `max_pixels` when lower, so Pillow neither warns nor rejects first.
    - Multi-frame files (animated GIF, multi-page TIFF) give their first frame.
    - EXIF orientation (values 2 to 8) is applied, so the returned size is the upright size.
    - L, 1, CMYK and YCbCr are converted to RGB by Pillow (grey is replicated to 3 channels).
    - Modes with alpha (RGBA, LA, P with transparency, PA) drop the alpha channel and keep
      the stored colour values, without compositing on a background. OpenCV's
      `cv2.imread` with its default IMREAD_COLOR flag does the same (its PNG reader
      strips alpha), and bottom-up-attention's generate_tsv.py reads images with it,
      so region features stay comparable with the reference ones.
    - 16-bit greyscale (I;16 and variants, or I with values in 0..65535) is scaled to
      8 bits as round(value / 257), so 65535 maps to 255 and nothing is clipped.
      16-bit colour PNGs arrive as 8-bit RGB from Pillow, which keeps the high byte.
    - Other modes (F, I with values outside 0..65535, LAB, HSV) are rejected.

    Args:
        path: image file; the format is detected from the content, not the extension.
        max_pixels: largest accepted width * height, a positive int. Defaults to
            DEFAULT_MAX_PIXELS (100 megapixels).

    Returns:
        DecodedImage with pixels uint8 (H, W, 3) RGB.

    Raises:
        ValueError: when `max_pixels` is not a positive int.
        ImageDecodeError: when the file is missing, unreadable, empty, not an image,
            truncated, corrupt, too large or in an unsupported mode. `.reason` names the cause.
    """
    _validate_max_pixels(max_pixels)
    path = Path(path)
    _check_file(path)
    _allow_pixels_in_pillow(max_pixels)

    try:
        with Image.open(path) as image:
            _check_pixel_count(image, path, max_pixels)
            image.load()
            image = _apply_exif_orientation(image, path)
            pixels = _to_rgb_array(image, path)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError("too-many-pixels", path, str(error)) from error
    except UnidentifiedImageError as error:
        raise ImageDecodeError(
            "not-an-image", path, "the content matches no image format that Pillow reads."
        ) from error
    except FileNotFoundError as error:
        raise ImageDecodeError("not-found", path, "the file disappeared while reading.") from error
    except PermissionError as error:
        raise ImageDecodeError("unreadable", path, f"permission denied ({error}).") from error
    except _DECODER_ERRORS as error:
        raise _classify_decoder_error(error, path) from error

    height, width = pixels.shape[:2]
    return DecodedImage(pixels=pixels, height=height, width=width)


def _validate_max_pixels(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(
            f"max_pixels must be a positive int, got {max_pixels!r}; "
            f"the default is {DEFAULT_MAX_PIXELS} (100 megapixels)."
        )


def _check_file(path: Path) -> None:
    """Raise ImageDecodeError for a missing, unreadable or zero-byte file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError as error:
        raise ImageDecodeError("not-found", path, "no such file; check the path.") from error
    except OSError as error:
        raise ImageDecodeError("unreadable", path, f"cannot stat the file ({error}).") from error

    if path.is_dir():
        raise ImageDecodeError("unreadable", path, "the path is a folder, not an image file.")

    if size == 0:
        raise ImageDecodeError("empty-file", path, "the file has 0 bytes.")


def _allow_pixels_in_pillow(max_pixels: int) -> None:
    """Raise Pillow's process-wide bomb limit to `max_pixels` when it is lower.

    Pillow warns above Image.MAX_IMAGE_PIXELS (89,478,485 pixels in Pillow 13.0)
    and raises DecompressionBombError above twice that, whatever the caller asks for.
    Raising the limit lets `max_pixels` decide. A scoped warnings filter would not do,
    because warnings.catch_warnings changes process-wide state and is not thread-safe.
    The limit is only ever raised, never lowered.
    """
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is None or max_pixels <= pillow_limit:
        return

    logger.debug("Raising PIL.Image.MAX_IMAGE_PIXELS from %d to %d.", pillow_limit, max_pixels)
    Image.MAX_IMAGE_PIXELS = max_pixels


def _check_pixel_count(image: Image.Image, path: Path, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too-many-pixels",
            path,
            f"the header declares {width}x{height} = {width * height} pixels, more than "
            f"max_pixels={max_pixels}; raise max_pixels to accept it.",
        )


def _apply_exif_orientation(image: Image.Image, path: Path) -> Image.Image:
    """Rotate or mirror per the EXIF orientation tag; keep the stored pixels if EXIF is broken."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, struct.error) as error:
        logger.warning("Ignoring unreadable EXIF data in %s: %s", path, error)
        return image

    if orientation == 1:
        return image

    if orientation not in range(2, 9):
        logger.warning("Ignoring invalid EXIF orientation %r in %s.", orientation, path)
        return image

    return ImageOps.exif_transpose(image)


def _to_rgb_array(image: Image.Image, path: Path) -> np.ndarray:
    """Convert a loaded Pillow image to uint8 (H, W, 3) RGB per the mode rules."""
    # NOTE: embedded ICC profiles are not applied, so profiled photos keep their stored values.
    mode = image.mode

    if mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode

    if mode in _DIRECT_RGB_MODES:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))

    if mode in _ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
        return np.ascontiguousarray(rgba[:, :, :3])

    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image, path)

    raise ImageDecodeError(
        "unsupported-mode",
        path,
        f"Pillow mode {mode!r} is not supported; convert the file to 8-bit RGB, grey "
        "or 16-bit grey first.",
    )


def _sixteen_bit_to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageDecodeError(
            "unsupported-mode",
            path,
            f"mode {image.mode!r} holds values from {values.min()} to {values.max()}, "
            "outside the 16-bit range 0..65535; convert the file to 8 or 16 bits first.",
        )

    grey = ((values + 128) // 257).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def _classify_decoder_error(error: BaseException, path: Path) -> ImageDecodeError:
    message = str(error) or type(error).__name__
    if _TRUNCATION_MARKER in message.lower():
        return ImageDecodeError("truncated", path, f"the file ends early ({message}).")

    return ImageDecodeError(
        "corrupt", path, f"Pillow failed to decode the data ({type(error).__name__}: {message})."
    )
