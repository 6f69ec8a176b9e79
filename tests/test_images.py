"""Tests for extractors.images.decode_image on real files written by tests/imagecases.py."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagecases
from extractors.images import (
    DECODE_FAILURE_REASONS,
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageDecodeError,
    decode_image,
)

logger = logging.getLogger(__name__)

# JPEG is lossy; flat colour blocks come back within this many levels per channel.
JPEG_TOLERANCE = 12


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("cases")
    return folder, imagecases.write_bad_inputs(folder)


def assert_close(actual: np.ndarray, expected: tuple[int, ...], tolerance: int) -> None:
    difference = np.abs(actual.astype(int) - np.array(expected, dtype=int))
    assert difference.max() <= tolerance, f"{actual.tolist()} is not within {tolerance} of {expected}"


def test_cases_match_expected_outcomes(cases):
    folder, expected = cases
    sizes = imagecases.expected_upright_sizes()

    for image_id, outcome in sorted(expected.items()):
        if outcome == imagecases.SKIPPED:
            continue
        if outcome == imagecases.OK:
            decoded = decode_image(folder / image_id)
            assert (decoded.height, decoded.width) == sizes[image_id], image_id
            assert decoded.pixels.shape == (decoded.height, decoded.width, 3), image_id
            assert decoded.pixels.dtype == np.uint8, image_id
            assert decoded.pixels.flags["C_CONTIGUOUS"], image_id
        else:
            with pytest.raises(ImageDecodeError) as raised:
                decode_image(folder / image_id)
            assert raised.value.reason == outcome, image_id


def test_every_ok_case_has_a_size(cases):
    _, expected = cases
    ok_ids = {image_id for image_id, outcome in expected.items() if outcome == imagecases.OK}

    assert ok_ids == set(imagecases.expected_upright_sizes())


@pytest.mark.parametrize(
    ("orientation", "marker_corner"),
    [(6, "top-right"), (8, "bottom-left")],
)
def test_exif_orientation_is_applied(tmp_path, orientation, marker_corner):
    path = tmp_path / f"exif_{orientation}.jpg"
    imagecases.write_exif_jpeg(path, orientation)
    stored_width, stored_height = imagecases.EXIF_STORED_SIZE

    decoded = decode_image(path)

    assert (decoded.height, decoded.width) == (stored_width, stored_height)
    corners = {
        "top-left": decoded.pixels[2, 2],
        "top-right": decoded.pixels[2, -3],
        "bottom-left": decoded.pixels[-3, 2],
        "bottom-right": decoded.pixels[-3, -3],
    }
    for corner, pixel in corners.items():
        expected = imagecases.MARKER_RGB if corner == marker_corner else imagecases.BACKGROUND_RGB
        assert_close(pixel, expected, JPEG_TOLERANCE)


def test_exif_orientation_one_keeps_stored_layout(tmp_path):
    path = tmp_path / "exif_1.jpg"
    imagecases.write_exif_jpeg(path, 1)

    decoded = decode_image(path)

    stored_width, stored_height = imagecases.EXIF_STORED_SIZE
    assert (decoded.height, decoded.width) == (stored_height, stored_width)
    assert_close(decoded.pixels[2, 2], imagecases.MARKER_RGB, JPEG_TOLERANCE)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    imagecases.write_cmyk_jpeg(path)
    assert Image.open(path).mode == "CMYK"

    decoded = decode_image(path)

    assert_close(decoded.pixels[12, 4], (255, 0, 0), JPEG_TOLERANCE)
    assert_close(decoded.pixels[12, 28], (0, 0, 255), JPEG_TOLERANCE)


@pytest.mark.parametrize("image_id", ["grey_l.png", "grey_alpha_la.png"])
def test_grey_is_replicated_to_three_channels(cases, image_id):
    folder, _ = cases
    assert Image.open(folder / image_id).mode in ("L", "LA")

    decoded = decode_image(folder / image_id)

    assert np.all(decoded.pixels == 90)


def test_palette_without_transparency(cases):
    folder, _ = cases
    first, second = imagecases.palette_colours()

    decoded = decode_image(folder / "palette.png")

    assert decoded.pixels[0, 0].tolist() == list(first)
    assert decoded.pixels[1, 1].tolist() == list(second)


def test_palette_transparency_keeps_stored_colour(cases):
    folder, _ = cases
    assert "transparency" in Image.open(folder / "palette_transparent.png").info
    first, second = imagecases.palette_colours()

    decoded = decode_image(folder / "palette_transparent.png")

    assert decoded.pixels[0, 0].tolist() == list(first)
    assert decoded.pixels[1, 1].tolist() == list(second)


def test_rgba_drops_alpha_without_compositing(cases):
    folder, _ = cases

    decoded = decode_image(folder / "rgba.png")

    assert np.array_equal(decoded.pixels, imagecases.rgba_pixels()[:, :, :3])
    # The fully transparent pixel keeps its stored blue, as cv2.imread(IMREAD_COLOR) does.
    assert decoded.pixels[1, 0].tolist() == [0, 0, 255]


def test_sixteen_bit_grey_divides_by_257(cases):
    folder, _ = cases
    assert Image.open(folder / "grey_16bit.png").mode.startswith("I")

    decoded = decode_image(folder / "grey_16bit.png")

    expected = [round(value / 257) for value in imagecases.SIXTEEN_BIT_VALUES]
    assert decoded.pixels[0, :, 0].tolist() == expected
    assert decoded.pixels[0, :, 0].tolist() == [0, 4, 128, 255]
    assert np.array_equal(decoded.pixels[..., 0], decoded.pixels[..., 2])


def test_sixteen_bit_rgb_within_one_level(tmp_path):
    path = tmp_path / "rgb16.png"
    samples = imagecases.write_sixteen_bit_rgb_png(path)

    decoded = decode_image(path)

    expected = np.round(samples / 257.0)
    assert np.abs(decoded.pixels.astype(float) - expected).max() <= 1


def test_mode_i_in_sixteen_bit_range_is_scaled(tmp_path):
    path = tmp_path / "mode_i.tif"
    Image.fromarray(np.array([[0, 257 * 10, 65535]], dtype=np.int32)).save(path)
    assert Image.open(path).mode == "I"

    decoded = decode_image(path)

    assert decoded.pixels[0, :, 1].tolist() == [0, 10, 255]


def test_mode_i_out_of_range_is_unsupported(tmp_path):
    path = tmp_path / "mode_i_large.tif"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(path)

    with pytest.raises(ImageDecodeError) as raised:
        decode_image(path)

    assert raised.value.reason == "unsupported-mode"
    assert "70000" in str(raised.value)


def test_float_mode_is_unsupported(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((4, 4), dtype=np.float32)).save(path)

    with pytest.raises(ImageDecodeError) as raised:
        decode_image(path)

    assert raised.value.reason == "unsupported-mode"
    assert "'F'" in str(raised.value)


def test_animated_gif_gives_first_frame(tmp_path):
    path = tmp_path / "animated.gif"
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)

    decoded = decode_image(path)

    assert (decoded.height, decoded.width) == (6, 8)
    assert decoded.pixels[3, 3].tolist() == [255, 0, 0]


@pytest.mark.parametrize(("width", "height"), [(1, 1), (10, 10), (4000, 50), (50, 4000)])
def test_extreme_sizes_decode(tmp_path, width, height):
    path = tmp_path / f"size_{width}x{height}.png"
    imagecases.write_two_colour_image(path, width, height)

    decoded = decode_image(path)

    assert decoded.pixels.shape == (height, width, 3)
    assert decoded.pixels[0, 0].tolist() == list(imagecases.MARKER_RGB)


def test_header_size_checked_before_pixels(cases, monkeypatch):
    folder, _ = cases
    # With Pillow's own bomb check off, only the header check can stop this file,
    # whose pixel data is one row: decoding it would report "truncated" instead.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)

    with pytest.raises(ImageDecodeError) as raised:
        decode_image(folder / "bomb_50000x50000.png")

    assert raised.value.reason == "too-many-pixels"
    assert "50000x50000" in str(raised.value)
    assert "max_pixels" in str(raised.value)


def test_pillow_bomb_error_is_mapped(cases):
    folder, _ = cases
    assert Image.MAX_IMAGE_PIXELS is not None

    with pytest.raises(ImageDecodeError) as raised:
        decode_image(folder / "bomb_50000x50000.png", max_pixels=DEFAULT_MAX_PIXELS)

    assert raised.value.reason == "too-many-pixels"


def test_max_pixels_is_configurable(tmp_path):
    path = tmp_path / "forty_by_fifty.png"
    imagecases.write_two_colour_image(path, 40, 50)

    assert decode_image(path, max_pixels=2000).width == 40
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(path, max_pixels=1999)
    assert raised.value.reason == "too-many-pixels"
    assert "40x50" in str(raised.value)


def test_max_pixels_above_pillow_limit(tmp_path, monkeypatch):
    path = tmp_path / "hundred.png"
    imagecases.write_two_colour_image(path, 100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)

    decoded = decode_image(path, max_pixels=20_000)

    assert decoded.width == 100
    assert Image.MAX_IMAGE_PIXELS == 20_000


@pytest.mark.parametrize("bad_value", [0, -5, 1.5, True, "100"])
def test_invalid_max_pixels_raises(tmp_path, bad_value):
    path = tmp_path / "one.png"
    imagecases.write_two_colour_image(path, 1, 1)

    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        decode_image(path, max_pixels=bad_value)


def test_missing_file_reason(tmp_path):
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(tmp_path / "absent.jpg")

    assert raised.value.reason == "not-found"
    assert "absent.jpg" in str(raised.value)


def test_folder_is_unreadable(tmp_path):
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(tmp_path)

    assert raised.value.reason == "unreadable"


def test_corrupt_png_data(tmp_path):
    path = tmp_path / "corrupt.png"
    imagecases.write_png_chunks(path, 4, 4, 8, 2, idat=b"not zlib data at all")

    with pytest.raises(ImageDecodeError) as raised:
        decode_image(path)

    assert raised.value.reason == "corrupt"


def test_error_message_names_file_and_reason(cases):
    folder, _ = cases

    with pytest.raises(ImageDecodeError) as raised:
        decode_image(folder / "empty.jpg")

    message = str(raised.value)
    assert "empty.jpg" in message
    assert "(empty-file)" in message
    assert message.endswith(".")
    assert isinstance(raised.value, ValueError)
    assert raised.value.path == folder / "empty.jpg"


def test_error_survives_pickling(cases):
    folder, _ = cases
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(folder / "text_named.jpg")

    restored = pickle.loads(pickle.dumps(raised.value))

    assert restored.reason == "not-an-image"
    assert str(restored) == str(raised.value)


def test_unknown_reason_is_rejected():
    with pytest.raises(ValueError, match="Unknown decode failure reason"):
        ImageDecodeError("odd", "x.jpg", "detail")


def test_only_decode_errors_escape(cases):
    folder, expected = cases
    image_ids = [image_id for image_id, outcome in expected.items() if outcome != imagecases.SKIPPED]
    image_ids += ["notes.txt", "meta.json"]

    for image_id in image_ids:
        try:
            result = decode_image(folder / image_id)
        except ImageDecodeError as error:
            assert error.reason in DECODE_FAILURE_REASONS, image_id
        else:
            assert isinstance(result, DecodedImage), image_id


def test_good_images_decode_deterministically(tmp_path):
    first = imagecases.write_good_images(tmp_path / "first", 6, seed=3)
    second = imagecases.write_good_images(tmp_path / "second", 6, seed=3)
    assert first == second

    for image_id in first:
        first_decoded = decode_image(tmp_path / "first" / image_id)
        second_decoded = decode_image(tmp_path / "second" / image_id)
        assert np.array_equal(first_decoded.pixels, second_decoded.pixels), image_id
        assert 48 <= first_decoded.height <= 200, image_id
        assert 48 <= first_decoded.width <= 200, image_id
        assert first_decoded.pixels.std() > 5, image_id


def test_real_photos_match_recorded_size(sample_data):
    data = sample_data
    captions_path = data / "captions.jsonl"
    if not captions_path.is_file():
        pytest.skip(f"captions.jsonl not found in {data}; set CMSEI_SAMPLE_DATA")

    records = [json.loads(line) for line in captions_path.read_text(encoding="utf-8").splitlines()]
    coco = [record for record in records if record.get("dataset") == "coco"][:5]
    flickr = [record for record in records if record.get("dataset") == "flickr8k"][:3]
    assert coco, "no COCO records in captions.jsonl"

    for record in coco:
        decoded = decode_image(data / "images" / record["image"])
        assert (decoded.height, decoded.width) == (record["height"], record["width"]), record["image"]
        assert decoded.pixels.std() > 10, record["image"]

    for record in flickr:
        decoded = decode_image(data / "images" / record["image"])
        assert max(decoded.height, decoded.width) <= 200, record["image"]
