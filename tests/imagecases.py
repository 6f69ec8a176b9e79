"""Write real image files for tests: hard decoding cases and small ordinary pictures.

`write_bad_inputs` fills a folder with one file per decoding or discovery case and
returns the outcome that `extractors.images.decode_image` and
`pipeline.inputs.discover_images` must produce for each image id. Extraction tests
reuse it, so the mapping must stay exact. `write_good_images` writes small varied
JPEG and PNG pictures for quick end-to-end runs.

Pixel arrays here are uint8 (H, W, 3) RGB unless a function documents another shape.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

OK = "ok"
SKIPPED = "skipped"

EXIF_ORIENTATION_TAG = 0x0112

# Stored (not upright) size of the EXIF cases, as (width, height).
EXIF_STORED_SIZE = (60, 30)

BOMB_SIDE = 50_000

MARKER_RGB = (255, 0, 0)
BACKGROUND_RGB = (0, 0, 255)

# Values of the 16-bit grey case, one per column; round(v / 257) gives 0, 4, 128, 255.
SIXTEEN_BIT_VALUES = (0, 1000, 257 * 128, 65535)

HIDDEN_FILE = ".hidden.jpg"


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Write one file per hard input case into `folder`.

    The folder gets a hidden file (`.hidden.jpg`) too. Discovery never lists hidden
    files, so it is not in the returned mapping.

    Args:
        folder: target folder; created when missing. Existing files of the same names
            are replaced.

    Returns:
        {image_id: expected outcome}, where the image id is the POSIX path relative to
        `folder` and the outcome is "ok" (decodes), "skipped" (discovery lists it as a
        SkippedFile) or the `ImageDecodeError.reason` that decoding raises.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    write_truncated_jpeg(folder / "truncated.jpg")
    expected["truncated.jpg"] = "truncated"
    write_truncated_png(folder / "truncated.png")
    expected["truncated.png"] = "truncated"
    (folder / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty-file"
    (folder / "text_named.jpg").write_text("This is a text file, not a JPEG.\n", encoding="utf-8")
    expected["text_named.jpg"] = "not-an-image"
    write_png_header_only(folder / "bomb_50000x50000.png", BOMB_SIDE, BOMB_SIDE)
    expected["bomb_50000x50000.png"] = "too-many-pixels"

    for image_id, writer in _decodable_cases().items():
        path = folder / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
        expected[image_id] = OK

    _replace_symlink(folder / "link_to_a.jpg", "a.jpg")
    expected["link_to_a.jpg"] = OK

    (folder / "notes.txt").write_text("Notes that sit beside the images.\n", encoding="utf-8")
    expected["notes.txt"] = SKIPPED
    (folder / "meta.json").write_text('{"source": "imagecases"}\n', encoding="utf-8")
    expected["meta.json"] = SKIPPED

    write_pattern_image(folder / HIDDEN_FILE, 20, 20, seed=99)
    return expected


def expected_upright_sizes() -> dict[str, tuple[int, int]]:
    """Return {image_id: (height, width)} after decoding, for every "ok" case of write_bad_inputs."""
    exif_width, exif_height = EXIF_STORED_SIZE
    return {
        "cmyk.jpg": (24, 32),
        "grey_l.png": (20, 30),
        "grey_alpha_la.png": (20, 30),
        "palette.png": (2, 2),
        "palette_transparent.png": (2, 2),
        "grey_16bit.png": (1, len(SIXTEEN_BIT_VALUES)),
        "rgb_16bit.png": (3, 5),
        "rgba.png": (2, 2),
        "exif_orientation_6.jpg": (exif_width, exif_height),
        "exif_orientation_8.jpg": (exif_width, exif_height),
        "tiny_1x1.png": (1, 1),
        "small_10x10.jpg": (10, 10),
        "wide_4000x50.jpg": (50, 4000),
        "café_日本.jpg": (40, 56),
        "a.jpg": (48, 64),
        "a.png": (64, 48),
        "UPPER.JPG": (32, 32),
        "png_named.jpg": (16, 24),
        "nested/deep/inner.png": (36, 28),
        "link_to_a.jpg": (48, 64),
    }


def write_good_images(folder: Path, n: int, seed: int) -> list[str]:
    """Write `n` small real pictures (shapes over noise), alternating JPEG and PNG.

    Sizes vary between 48 and 200 pixels per side. The same seed writes the same pixels.

    Args:
        folder: target folder; created when missing.
        n: number of pictures, >= 0.
        seed: random seed.

    Returns:
        The image ids (file names relative to `folder`), sorted.

    Raises:
        ValueError: when `n` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image_ids = []

    for index in range(n):
        extension = "jpg" if index % 2 == 0 else "png"
        image_id = f"good_{index:04d}.{extension}"
        width, height = (int(side) for side in rng.integers(48, 201, size=2))
        write_pattern_image(folder / image_id, width, height, seed=int(rng.integers(2**31)))
        image_ids.append(image_id)

    return sorted(image_ids)


def write_pattern_image(path: Path, width: int, height: int, seed: int) -> np.ndarray:
    """Write a picture of random shapes over a noisy gradient; the format follows the suffix.

    Returns:
        The uint8 (height, width, 3) pixels before compression.
    """
    rng = np.random.default_rng(seed)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    gradient = base + 50.0 * ys - 30.0 * xs + rng.normal(0.0, 12.0, size=(height, width, 3))
    image = Image.fromarray(np.clip(gradient, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        x1, x2 = sorted(int(v) for v in rng.integers(0, width, size=2))
        y1, y2 = sorted(int(v) for v in rng.integers(0, height, size=2))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x1, y1, x2, y2), fill=colour)
        else:
            draw.rectangle((x1, y1, x2, y2), fill=colour)

    _save(image, path)
    return np.asarray(image)


def write_two_colour_image(path: Path, width: int, height: int) -> None:
    """Write a BACKGROUND_RGB picture whose top-left quadrant is MARKER_RGB."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND_RGB
    pixels[: max(1, height // 2), : max(1, width // 2)] = MARKER_RGB
    _save(Image.fromarray(pixels), path)


def write_exif_jpeg(path: Path, orientation: int) -> None:
    """Write a EXIF_STORED_SIZE JPEG whose stored top-left quadrant is the marker colour."""
    width, height = EXIF_STORED_SIZE
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND_RGB
    pixels[: height // 2, : width // 2] = MARKER_RGB
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)


def write_cmyk_jpeg(path: Path) -> None:
    """Write a 32x24 CMYK JPEG: left half pure red (C=0, M=Y=255), right half pure blue."""
    image = Image.new("CMYK", (32, 24), (255, 255, 0, 0))
    image.paste((0, 255, 255, 0), (0, 0, 16, 24))
    image.save(path, format="JPEG", quality=95)


def write_sixteen_bit_grey_png(path: Path) -> None:
    """Write a 1-row 16-bit greyscale PNG holding SIXTEEN_BIT_VALUES."""
    values = np.array([SIXTEEN_BIT_VALUES], dtype=np.uint16)
    Image.fromarray(values).save(path, format="PNG")


def write_sixteen_bit_rgb_png(path: Path) -> np.ndarray:
    """Write a 5x3 16-bit RGB PNG by hand (Pillow cannot save one).

    Returns:
        The stored uint16 (3, 5, 3) samples.
    """
    rng = np.random.default_rng(16)
    samples = rng.integers(0, 65536, size=(3, 5, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + samples[row].astype(">u2").tobytes() for row in range(3))
    write_png_chunks(path, width=5, height=3, bit_depth=16, colour_type=2, idat=zlib.compress(rows))
    return samples


def write_png_header_only(path: Path, width: int, height: int) -> None:
    """Write a tiny 8-bit RGB PNG whose IHDR claims width x height but whose data is one row."""
    one_row = b"\x00" + b"\x80" * 3 * min(width, 16)
    write_png_chunks(path, width, height, bit_depth=8, colour_type=2, idat=zlib.compress(one_row))


def write_png_chunks(
    path: Path, width: int, height: int, bit_depth: int, colour_type: int, idat: bytes
) -> None:
    """Write a PNG from a hand-built IHDR (valid CRC), one IDAT chunk and IEND."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n"
    data += _png_chunk(b"IHDR", header)
    data += _png_chunk(b"IDAT", idat)
    data += _png_chunk(b"IEND", b"")
    Path(path).write_bytes(data)


def write_truncated_jpeg(path: Path) -> None:
    """Write a 64x48 noisy JPEG cut to half its bytes, so its header is whole but its scan is not."""
    _write_truncated(Path(path), "whole.jpg", seed=7)


def write_truncated_png(path: Path) -> None:
    """Write a 64x48 noisy PNG cut to half its bytes."""
    _write_truncated(Path(path), "whole.png", seed=8)


def _write_truncated(path: Path, whole_suffix: str, seed: int) -> None:
    whole_path = path.with_name(f"{path.stem}.{whole_suffix}")
    write_pattern_image(whole_path, 64, 48, seed=seed)
    data = whole_path.read_bytes()
    whole_path.unlink()
    path.write_bytes(data[: len(data) // 2])


def _decodable_cases() -> dict[str, object]:
    """Map image id -> writer for each case that must decode."""

    def grey(mode: str):
        def write(path: Path) -> None:
            value = (90,) if mode == "L" else (90, 30)
            Image.new(mode, (30, 20), value).save(path, format="PNG")

        return write

    return {
        "cmyk.jpg": write_cmyk_jpeg,
        "grey_l.png": grey("L"),
        "grey_alpha_la.png": grey("LA"),
        "palette.png": lambda path: _write_palette_png(path, transparent=False),
        "palette_transparent.png": lambda path: _write_palette_png(path, transparent=True),
        "grey_16bit.png": write_sixteen_bit_grey_png,
        "rgb_16bit.png": write_sixteen_bit_rgb_png,
        "rgba.png": _write_rgba_png,
        "exif_orientation_6.jpg": lambda path: write_exif_jpeg(path, 6),
        "exif_orientation_8.jpg": lambda path: write_exif_jpeg(path, 8),
        "tiny_1x1.png": lambda path: write_two_colour_image(path, 1, 1),
        "small_10x10.jpg": lambda path: write_pattern_image(path, 10, 10, seed=10),
        "wide_4000x50.jpg": lambda path: write_pattern_image(path, 4000, 50, seed=40),
        "café_日本.jpg": lambda path: write_pattern_image(path, 56, 40, seed=5),
        "a.jpg": lambda path: write_pattern_image(path, 64, 48, seed=1),
        "a.png": lambda path: write_pattern_image(path, 48, 64, seed=2),
        "UPPER.JPG": lambda path: write_pattern_image(path, 32, 32, seed=3),
        "png_named.jpg": lambda path: Image.new("RGB", (24, 16), (10, 200, 30)).save(path, "PNG"),
        "nested/deep/inner.png": lambda path: write_pattern_image(path, 28, 36, seed=4),
    }


def palette_colours() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Return the two palette entries of the palette cases; entry 0 is the transparent one."""
    return (200, 10, 10), (10, 10, 200)


def rgba_pixels() -> np.ndarray:
    """Return the uint8 (2, 2, 4) RGBA pixels of rgba.png, including a fully transparent pixel."""
    return np.array(
        [
            [[255, 0, 0, 255], [0, 255, 0, 128]],
            [[0, 0, 255, 0], [250, 240, 10, 10]],
        ],
        dtype=np.uint8,
    )


def _write_palette_png(path: Path, transparent: bool) -> None:
    first, second = palette_colours()
    image = Image.new("P", (2, 2), 0)
    image.putpalette(list(first) + list(second))
    image.putpixel((1, 1), 1)
    if transparent:
        image.save(path, format="PNG", transparency=0)
    else:
        image.save(path, format="PNG")


def _write_rgba_png(path: Path) -> None:
    Image.fromarray(rgba_pixels()).save(path, format="PNG")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _replace_symlink(link: Path, target: str) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)


def _save(image: Image.Image, path: Path) -> None:
    suffix = Path(path).suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        image.save(path, format="JPEG", quality=92)
    else:
        image.save(path, format="PNG")
