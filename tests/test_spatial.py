"""Tests of graphs.spatial: the 11 spatial relation classes, their properties and speed paths.

The oracle below labels one pair at a time with plain float comparisons and no angle.
It is exact for integer coordinates, which is what most property tests draw.
"""

from __future__ import annotations

import base64
import csv
import math
import sys
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from graphs.spatial import (
    INSIDE,
    NONE,
    OVERLAP,
    RELATION_NAMES,
    COVER,
    inverse_labels,
    relation_labels,
    relation_labels_batch,
)

DIR_0_45, DIR_45_90, DIR_90_135, DIR_135_180 = 4, 5, 6, 7
DIR_180_225, DIR_225_270, DIR_270_315, DIR_315_360 = 8, 9, 10, 11


def oracle_label(box_i, box_j, image_size, min_size=1.0) -> int:
    """Label one ordered pair by the definitions in graphs.spatial, without tolerances."""
    x1i, y1i, x2i, y2i = box_i
    x1j, y1j, x2j, y2j = box_j
    x2i, y2i = max(x2i, x1i + min_size), max(y2i, y1i + min_size)
    x2j, y2j = max(x2j, x1j + min_size), max(y2j, y1j + min_size)

    i_in_j = x1i >= x1j and y1i >= y1j and x2i <= x2j and y2i <= y2j
    j_in_i = x1j >= x1i and y1j >= y1i and x2j <= x2i and y2j <= y2i
    if i_in_j and j_in_i:
        return OVERLAP
    if i_in_j:
        return INSIDE
    if j_in_i:
        return COVER

    intersection = max(0.0, min(x2i, x2j) - max(x1i, x1j)) * max(0.0, min(y2i, y2j) - max(y1i, y1j))
    areas = (x2i - x1i) * (y2i - y1i) + (x2j - x1j) * (y2j - y1j)
    dx = (x1j + x2j) - (x1i + x2i)  # doubled centre offsets, y pointing up
    dy = (y1i + y2i) - (y1j + y2j)
    if 3 * intersection >= areas or (dx == 0 and dy == 0):
        return OVERLAP

    height, width = image_size
    if dx * dx + dy * dy >= height * height + width * width:
        return NONE
    return DIR_0_45 + oracle_sector(dx, dy)


def oracle_sector(dx: float, dy: float) -> int:
    """Return the 45-degree sector 0..7 of a non-zero vector, each closed at its start."""
    if dx > 0 and dy >= 0:
        return 0 if dy < dx else 1
    if dx <= 0 and dy > 0:
        return 2 if -dx < dy else 3
    if dx < 0 and dy <= 0:
        return 4 if -dy < -dx else 5
    return 6 if dx < -dy else 7


def oracle_labels(boxes, image_size, min_size=1.0) -> np.ndarray:
    boxes = [list(map(float, box)) for box in boxes]
    labels = np.zeros((len(boxes), len(boxes)), dtype=np.uint8)
    for i, box_i in enumerate(boxes):
        for j, box_j in enumerate(boxes):
            if i != j:
                labels[i, j] = oracle_label(box_i, box_j, image_size, min_size)
    return labels


def box_at(center_x: float, center_y: float, half: float = 5.0) -> list[float]:
    return [center_x - half, center_y - half, center_x + half, center_y + half]


def pair_at_angle(degrees: float, distance: float = 100.0, center=(400.0, 300.0)) -> np.ndarray:
    """Return two small boxes, the second one's centre at ``degrees`` (y up) from the first's."""
    radians = math.radians(degrees)
    x, y = center
    return np.array([box_at(x, y), box_at(x + distance * math.cos(radians), y - distance * math.sin(radians))])


@st.composite
def integer_scenes(draw, max_boxes: int = 7):
    """Draw (boxes (N, 4) int, (height, width)) with boxes partly outside and degenerate."""
    height = draw(st.integers(16, 900))
    width = draw(st.integers(16, 900))
    count = draw(st.integers(0, max_boxes))
    xs = st.integers(-width // 4, width + width // 4)
    ys = st.integers(-height // 4, height + height // 4)
    boxes = [[draw(xs), draw(ys), draw(xs), draw(ys)] for _ in range(count)]
    return np.array(boxes, dtype=np.int64).reshape(count, 4), (height, width)


def test_relation_names_cover_11_classes_and_none():
    assert len(RELATION_NAMES) == 12
    assert RELATION_NAMES[:4] == ("none", "inside", "cover", "overlap")
    assert RELATION_NAMES[4] == "dir_0_45"
    assert RELATION_NAMES[11] == "dir_315_360"


def test_inverse_labels_table():
    labels = np.arange(12)
    assert inverse_labels(labels).tolist() == [0, 2, 1, 3, 8, 9, 10, 11, 4, 5, 6, 7]


def test_inverse_labels_rejects_out_of_range():
    with pytest.raises(ValueError, match="0..11"):
        inverse_labels(np.array([0, 12]))


@pytest.mark.parametrize("sector", range(8))
def test_direction_of_each_sector(sector):
    boxes = pair_at_angle(45 * sector + 20)
    labels = relation_labels(boxes, (600, 800))
    assert labels[0, 1] == DIR_0_45 + sector
    assert labels[1, 0] == DIR_0_45 + (sector + 4) % 8


def test_containment_and_far_pairs():
    boxes = np.array([[100, 100, 200, 200], [120, 130, 150, 160], [700, 500, 720, 520]])
    labels = relation_labels(boxes, (600, 800))
    assert labels[1, 0] == INSIDE
    assert labels[0, 1] == COVER
    assert labels[0, 2] == NONE
    assert labels[2, 0] == NONE
    assert np.diag(labels).tolist() == [0, 0, 0]


def test_shared_edges_count_as_within():
    boxes = np.array([[0, 0, 100, 100], [0, 0, 100, 40], [60, 20, 100, 100]])
    labels = relation_labels(boxes, (480, 640))
    assert labels[1, 0] == INSIDE
    assert labels[2, 0] == INSIDE
    assert labels[0, 1] == COVER
    assert labels[0, 2] == COVER


def test_identical_boxes_overlap_both_ways():
    boxes = np.array([[10, 20, 110, 220], [10, 20, 110, 220]], dtype=np.float32)
    labels = relation_labels(boxes, (480, 640))
    assert labels[0, 1] == OVERLAP
    assert labels[1, 0] == OVERLAP


def test_iou_of_exactly_half_is_overlap():
    # Intersection 2, union 4.
    boxes = np.array([[0, 0, 3, 1], [1, 0, 4, 1]], dtype=np.float64)
    assert relation_labels(boxes, (100, 100))[0, 1] == OVERLAP
    assert relation_labels(boxes / 3, (100 / 3, 100 / 3), min_size=1 / 3)[0, 1] == OVERLAP


def test_distance_of_half_diagonal_is_none():
    # Diagonal 1000, centres 500 apart.
    exact = np.array([box_at(100, 500), box_at(400, 100)])
    assert relation_labels(exact, (600, 800)).tolist() == [[0, 0], [0, 0]]
    closer = np.array([box_at(100, 500), box_at(400, 101)])
    assert relation_labels(closer, (600, 800))[0, 1] == DIR_45_90
    scaled = relation_labels(exact / 7, (600 / 7, 800 / 7), min_size=1 / 7)
    assert scaled.tolist() == [[0, 0], [0, 0]]


# Regression tests for the defects of the implementation circulating in VQA and
# retrieval repositories.


@pytest.mark.parametrize(
    ("degrees", "forward", "backward"),
    [
        (30, DIR_0_45, DIR_180_225),
        (120, DIR_90_135, DIR_270_315),
        (210, DIR_180_225, DIR_0_45),
        (300, DIR_270_315, DIR_90_135),
    ],
)
def test_reverse_label_in_every_quadrant(degrees, forward, backward):
    labels = relation_labels(pair_at_angle(degrees), (600, 800))
    assert labels[0, 1] == forward
    assert labels[1, 0] == backward


def test_third_quadrant_sectors_in_order():
    assert relation_labels(pair_at_angle(200), (600, 800))[0, 1] == DIR_180_225
    assert relation_labels(pair_at_angle(250), (600, 800))[0, 1] == DIR_225_270


def test_angle_zero_is_first_sector_not_overlap():
    boxes = np.array([box_at(100, 300), box_at(250, 300)])
    labels = relation_labels(boxes, (600, 800))
    assert labels[0, 1] == DIR_0_45
    assert labels[1, 0] == DIR_180_225


def test_coincident_centres_give_overlap_without_nan():
    # A wide flat box and a tall thin one around the same centre: IoU 1/9.
    boxes = np.array([[0, 40, 100, 60], [40, 0, 60, 100]], dtype=np.float64)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        labels = relation_labels(boxes, (100, 100))
    assert labels[0, 1] == OVERLAP
    assert labels[1, 0] == OVERLAP


# Properties.


@settings(max_examples=300, deadline=None)
@given(integer_scenes())
def test_matches_oracle_on_integer_boxes(scene):
    boxes, size = scene
    np.testing.assert_array_equal(relation_labels(boxes, size), oracle_labels(boxes, size))


@settings(max_examples=200, deadline=None)
@given(
    integer_scenes(),
    st.sampled_from([2.0, 3.0, 0.5, 0.1, 1 / 3, 1 / 7, 1 / 640, 1000.0, 1e-3]),
)
def test_scaling_image_and_boxes_changes_nothing(scene, scale):
    boxes, (height, width) = scene
    expected = relation_labels(boxes, (height, width))
    scaled = relation_labels(boxes * scale, (height * scale, width * scale), min_size=scale)
    np.testing.assert_array_equal(scaled, expected)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 12),
    st.floats(0, 1.5, allow_nan=False),
    st.integers(16, 900),
    st.integers(16, 900),
    st.integers(0, 2**32 - 1),
)
def test_inverse_property_on_float_boxes(count, spread, height, width, seed):
    rng = np.random.default_rng(seed)
    corners = rng.uniform(-0.2, 1.2, (count, 2)) * (width, height)
    sizes = rng.uniform(0, spread, (count, 2)) * (width, height)
    boxes = np.concatenate([corners, corners + sizes], axis=1)
    labels = relation_labels(boxes, (height, width))
    np.testing.assert_array_equal(inverse_labels(labels).T, labels)
    assert (np.diag(labels) == 0).all()


@settings(max_examples=200, deadline=None)
@given(integer_scenes())
def test_inverse_property_on_integer_boxes(scene):
    boxes, size = scene
    labels = relation_labels(boxes, size)
    np.testing.assert_array_equal(inverse_labels(labels).T, labels)


@st.composite
def crosses(draw):
    """Draw half sizes of a wide flat box and a tall thin box with IoU below 0.5."""
    long_side = draw(st.integers(3, 300))
    short_side = draw(st.integers(1, long_side // 3))
    other_long_side = draw(st.integers(3, 300))
    other_short_side = draw(st.integers(1, other_long_side // 3))
    assume(other_short_side < long_side and short_side < other_long_side)
    return (long_side, short_side), (other_short_side, other_long_side)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 800), st.integers(0, 600), crosses())
def test_identical_centres_with_small_iou_overlap(center_x, center_y, cross):
    (half_w1, half_h1), (half_w2, half_h2) = cross
    intersection = 4 * half_w2 * half_h1
    union = 4 * half_w1 * half_h1 + 4 * half_w2 * half_h2 - intersection
    assert intersection / union < 0.5
    boxes = np.array(
        [
            [center_x - half_w1, center_y - half_h1, center_x + half_w1, center_y + half_h1],
            [center_x - half_w2, center_y - half_h2, center_x + half_w2, center_y + half_h2],
        ]
    )
    with np.errstate(all="raise"):
        labels = relation_labels(boxes, (600, 800))
    assert labels[0, 1] == OVERLAP
    assert labels[1, 0] == OVERLAP


@settings(max_examples=200, deadline=None)
@given(integer_scenes())
def test_degenerate_boxes_are_clamped_to_one_pixel(scene):
    boxes, size = scene
    clamped = boxes.copy()
    clamped[:, 2] = np.maximum(boxes[:, 2], boxes[:, 0] + 1)
    clamped[:, 3] = np.maximum(boxes[:, 3], boxes[:, 1] + 1)
    with np.errstate(all="raise"):
        labels = relation_labels(boxes, size)
    np.testing.assert_array_equal(labels, relation_labels(clamped, size))


def test_zero_area_boxes_at_one_point_overlap():
    boxes = np.array([[50, 50, 50, 50], [50, 50, 50, 50], [50, 50, 40, 40]])
    labels = relation_labels(boxes, (100, 100))
    assert labels[0, 1] == OVERLAP
    assert labels[0, 2] == OVERLAP


# Sector boundaries: pixel coordinates against rescaled ones.

BOUNDARY_OFFSETS = [
    (1, 0, DIR_0_45),
    (1, 1, DIR_45_90),
    (0, 1, DIR_90_135),
    (-1, 1, DIR_135_180),
    (-1, 0, DIR_180_225),
    (-1, -1, DIR_225_270),
    (0, -1, DIR_270_315),
    (1, -1, DIR_315_360),
]


@pytest.mark.parametrize(("unit_x", "unit_y", "expected"), BOUNDARY_OFFSETS)
@pytest.mark.parametrize("steps", [30, 37, 120])
def test_boundary_pair_same_label_in_pixels_and_normalised(unit_x, unit_y, expected, steps):
    # Box j's centre lies `steps` pixels from box i's centre (213.5, 171.5) along the ray, y up.
    box_i = np.array([201, 160, 226, 183], dtype=np.float64)
    box_j = box_i + [steps * unit_x, -steps * unit_y, steps * unit_x, -steps * unit_y]
    boxes = np.stack([box_i, box_j])
    height, width = 427, 640

    pixel = relation_labels(boxes, (height, width))
    assert pixel[0, 1] == expected
    assert pixel[1, 0] == inverse_labels(np.array([expected]))[0]

    by_width = relation_labels(boxes / width, (height / width, 1.0), min_size=1 / width)
    np.testing.assert_array_equal(by_width, pixel)
    for scale in (1 / 3, 1 / 7, 0.1, 1e-4):
        scaled = relation_labels(boxes * scale, (height * scale, width * scale), min_size=scale)
        np.testing.assert_array_equal(scaled, pixel)


def test_boundary_pair_per_axis_normalised_square_image():
    boxes = np.array([[101, 207, 131, 233], [151, 157, 181, 183]], dtype=np.float64)  # 45 degrees
    pixel = relation_labels(boxes, (640, 640))
    normalised = relation_labels(boxes / [640, 640, 640, 640], (1.0, 1.0), min_size=1 / 640)
    assert pixel[0, 1] == DIR_45_90
    np.testing.assert_array_equal(normalised, pixel)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 300),
    st.sampled_from([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]),
    st.integers(10, 400),
    st.integers(10, 400),
    st.sampled_from([1 / 3, 1 / 640, 1 / 427, 0.001, 7.0]),
)
def test_boundary_rays_survive_rescaling(steps, unit, center_x, center_y, scale):
    box_i = np.array([center_x - 3, center_y - 8, center_x + 5, center_y + 2], dtype=np.float64)
    box_j = box_i + [steps * unit[0], -steps * unit[1], steps * unit[0], -steps * unit[1]]
    boxes = np.stack([box_i, box_j])
    pixel = relation_labels(boxes, (900, 900))
    scaled = relation_labels(boxes * scale, (900 * scale, 900 * scale), min_size=scale)
    np.testing.assert_array_equal(scaled, pixel)


# Batches.


def test_batch_matches_single_image_calls():
    rng = np.random.default_rng(7)
    counts = [0, 1, 2, 5, 5, 36, 0, 5, 3, 36, 1, 12]
    sizes = rng.integers(50, 900, (len(counts), 2))
    boxes = []
    for count, (height, width) in zip(counts, sizes):
        corners = rng.uniform(0, 1, (count, 2)) * (width, height)
        boxes.append(np.concatenate([corners, corners + rng.uniform(1, 300, (count, 2))], axis=1))
    offsets = np.concatenate([[0], np.cumsum(counts)])

    labels, label_offsets = relation_labels_batch(np.concatenate(boxes), offsets, sizes)

    assert labels.dtype == np.uint8
    assert label_offsets.tolist() == np.concatenate([[0], np.cumsum(np.square(counts))]).tolist()
    for image, count in enumerate(counts):
        expected = relation_labels(boxes[image], tuple(sizes[image]))
        actual = labels[label_offsets[image] : label_offsets[image + 1]].reshape(count, count)
        np.testing.assert_array_equal(actual, expected)


def test_batch_spanning_several_chunks():
    rng = np.random.default_rng(3)
    counts = np.array([36] * 150 + [7] + [36] * 150)  # more than one chunk of 36-region images
    total = int(counts.sum())
    corners = rng.uniform(0, 500, (total, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, 200, (total, 2))], axis=1).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    sizes = np.tile([480, 640], (counts.shape[0], 1))

    labels, label_offsets = relation_labels_batch(boxes, offsets, sizes)

    for image in (0, 100, 149, 150, 151, 299, 300):
        count = counts[image]
        expected = relation_labels(boxes[offsets[image] : offsets[image + 1]], (480, 640))
        actual = labels[label_offsets[image] : label_offsets[image + 1]].reshape(count, count)
        np.testing.assert_array_equal(actual, expected)


def test_large_image_matches_oracle():
    rng = np.random.default_rng(5)
    corners = rng.uniform(0, 1, (151, 2)) * (800, 600)
    boxes = np.concatenate([corners, corners + rng.uniform(1, 300, (151, 2))], axis=1)
    labels = relation_labels(boxes, (600, 800))
    np.testing.assert_array_equal(labels, oracle_labels(boxes, (600, 800)))


def test_empty_and_single_box_images():
    assert relation_labels(np.zeros((0, 4)), (10, 10)).shape == (0, 0)
    assert relation_labels(np.array([[1, 1, 5, 5]]), (10, 10)).tolist() == [[0]]
    labels, label_offsets = relation_labels_batch(np.zeros((0, 4)), np.array([0]), np.zeros((0, 2)))
    assert labels.shape == (0,)
    assert label_offsets.tolist() == [0]


# Invalid input.


@pytest.mark.parametrize(
    ("boxes", "image_size", "min_size", "message"),
    [
        (np.zeros((3, 5)), (10, 10), 1.0, "shape"),
        (np.array([[0, 0, np.nan, 1]]), (10, 10), 1.0, "NaN"),
        (np.array([[0, 0, 1, 1]]), (0, 10), 1.0, "positive"),
        (np.array([[0, 0, 1, 1]]), (10, np.inf), 1.0, "positive"),
        (np.array([[0, 0, 1, 1]]), (10, 10), 0.0, "min_size"),
        (np.array([[0, 0, 0.5, 0.5]]), (1.0, 1.0), 1.0, "normalised"),
        (np.array([[0, 0, 640, 480]]), (0.75, 1.0), 0.001, "same units"),
    ],
)
def test_invalid_input_raises(boxes, image_size, min_size, message):
    with pytest.raises(ValueError, match=message):
        relation_labels(boxes, image_size, min_size=min_size)


@pytest.mark.parametrize(
    ("offsets", "sizes", "message"),
    [
        (np.array([0, 2]), np.array([[10, 10]]), "end at the box count 3"),
        (np.array([1, 3]), np.array([[10, 10]]), "start at 0"),
        (np.array([0, 2, 1, 3]), np.array([[10, 10]] * 3), "never decrease"),
        (np.array([0.0, 3.0]), np.array([[10, 10]]), "integer"),
        (np.array([0, 3]), np.array([[10, 10], [10, 10]]), r"\(1, 2\)"),
    ],
)
def test_invalid_batch_layout_raises(offsets, sizes, message):
    boxes = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [5, 5, 6, 6]])
    with pytest.raises(ValueError, match=message):
        relation_labels_batch(boxes, offsets, sizes)


# Real detector boxes.


def read_butd_boxes(path) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """Read (boxes (36, 4) float32, (height, width)) per image of an LXMERT-layout TSV."""
    csv.field_size_limit(sys.maxsize)
    images = []
    with open(path, newline="") as handle:
        for row in csv.reader(handle, delimiter="\t"):
            height, width, count = int(row[1]), int(row[2]), int(row[7])
            boxes = np.frombuffer(base64.b64decode(row[8]), dtype=np.float32).reshape(count, 4)
            images.append((boxes, (height, width)))
    return images


def test_real_detector_boxes_match_oracle(sample_data):
    images = read_butd_boxes(sample_data / "butd_features" / "train2014_obj36.tsv")
    assert len(images) == 6

    boxes = np.concatenate([image_boxes for image_boxes, _ in images])
    offsets = np.concatenate([[0], np.cumsum([len(image_boxes) for image_boxes, _ in images])])
    sizes = np.array([size for _, size in images])
    labels, label_offsets = relation_labels_batch(boxes, offsets, sizes)

    seen = set()
    for image, (image_boxes, size) in enumerate(images):
        count = len(image_boxes)
        actual = labels[label_offsets[image] : label_offsets[image + 1]].reshape(count, count)
        np.testing.assert_array_equal(actual, oracle_labels(image_boxes, size))
        np.testing.assert_array_equal(inverse_labels(actual).T, actual)
        seen.update(np.unique(actual).tolist())
    assert {INSIDE, COVER, OVERLAP} <= seen
    assert len(seen & set(range(DIR_0_45, DIR_315_360 + 1))) == 8
