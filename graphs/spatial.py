"""Spatial relation labels between image regions, 11 classes after Yao et al. (ECCV 2018).

Shapes: N regions of one image, M images in a batch, R_m regions of image m, R the sum
of all R_m. Boxes are x1, y1, x2, y2 in pixels of the original image, with x to the
right and y down. Image sizes are (height, width).

For an ordered pair (i, j) with i != j the label is, in this order of precedence:

- 1 ``inside``: box i lies within box j (shared edges count as within);
- 2 ``cover``: box j lies within box i;
- 3 ``overlap``: IoU >= 0.5, or the two centres coincide;
- 4 to 11 ``dir_*``: the centres are closer than half the image diagonal, and the label
  is the direction of j's centre seen from i's centre. The eight 45-degree sectors are
  counted counter-clockwise from the +x axis with y pointing up, each closed at its
  start and open at its end: 4 = [0, 45), 5 = [45, 90), ..., 11 = [315, 360);
- 0 ``none``: otherwise, and on the diagonal.

Two identical boxes lie within each other, so neither ``inside`` nor ``cover`` can be
given without breaking the inverse property below. They get ``overlap`` both ways
(their IoU is 1). Coincident centres have no direction, so they also get ``overlap``.

The inverse property holds for every pair: label(j, i) is label(i, j) with ``inside``
and ``cover`` swapped and each sector s turned into the opposite one, s + 4 modulo 8
within 4..11 (``INVERSE_RELATION``).

Boundary cases are decided with tolerances relative to the image. A pair exactly on a
boundary in pixels therefore stays on it after rescaling in float64, to normalised
coordinates for example, although rounding moves it by a few units in the last place:

- an offset component dx, dy, dy - dx or dx + dy smaller in magnitude than
  ``DIRECTION_TOLERANCE`` times the diagonal counts as 0, so the pair lies on that
  sector boundary and gets the sector that starts there;
- centres closer than 4 times that tolerance count as coincident;
- box i lies within box j when its area exceeds their intersection by at most that
  tolerance times the diagonal times i's shorter side, so i may stick out of j by
  about the tolerance;
- an IoU or centre distance within a relative ``THRESHOLD_TOLERANCE`` of its threshold
  counts as on the threshold (IoU 0.5 is overlap, half the diagonal is too far).

No angle is computed: the direction comes from four sign tests. Every test gives
exactly opposite results for (i, j) and (j, i), so the inverse property is exact.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

logger = logging.getLogger(__name__)

RELATION_NAMES: tuple[str, ...] = (
    "none",
    "inside",
    "cover",
    "overlap",
    "dir_0_45",
    "dir_45_90",
    "dir_90_135",
    "dir_135_180",
    "dir_180_225",
    "dir_225_270",
    "dir_270_315",
    "dir_315_360",
)
NUM_RELATIONS = len(RELATION_NAMES)
NONE, INSIDE, COVER, OVERLAP = 0, 1, 2, 3
FIRST_DIRECTION = 4

# label(j, i) for each label(i, j).
INVERSE_RELATION = np.array([0, 2, 1, 3, 8, 9, 10, 11, 4, 5, 6, 7], dtype=np.uint8)

# Both far above float64 rounding of rescaled coordinates (about 1e-15 of the diagonal)
# and far below anything visible. Float32 rounding (about 1e-7) is not covered.
DIRECTION_TOLERANCE = 1e-9
THRESHOLD_TOLERANCE = 1e-9
# Boxes must lie within this many image diagonals of the image origin, which keeps the
# direction sign tests below exact in float64.
MAX_DIAGONALS_FROM_ORIGIN = 8.0

# Centre offsets are measured in units of DIRECTION_TOLERANCE * diagonal, so these
# thresholds are the same for every image.
_NEAR_SQUARED = (0.5 / DIRECTION_TOLERANCE) ** 2 * (1.0 - 2.0 * THRESHOLD_TOLERANCE)
_SAME_CENTER_SQUARED = 4.0**2
# Pair offsets stay below 2 * 8 / DIRECTION_TOLERANCE units, so multiplying by this
# power of two maps a tiebreak into (-1, 1) exactly.
_TIEBREAK_SCALE = 2.0 ** -math.ceil(math.log2(4.0 * MAX_DIAGONALS_FROM_ORIGIN / DIRECTION_TOLERANCE))

# Pairs computed per vectorised chunk, a compromise between per-call overhead and
# cache size, measured on an AMD EPYC core with 2 MiB of L2 cache. The inner loops of
# the pair arithmetic run along the image axis, so chunks have at least 16 images. The
# exception is an image so large that 16 of them would exceed the maximum pair count,
# which bounds scratch memory at about 45 bytes per pair.
_PAIRS_PER_CHUNK = 1 << 16
_MIN_IMAGES_PER_CHUNK = 16
_MAX_PAIRS_PER_CHUNK = 1 << 20


def _build_label_table() -> np.ndarray:
    """Build the table from an 8-bit pair code to its label.

    Code bits, high to low: the direction bits a, c, d and b of ``_pair_codes``, centres
    near, i within j, j within i, IoU >= 0.5 or same centre. The direction bits record
    whether the vector from i's centre to j's centre points to the upper side of the
    lines y = 0 (a), y = x (c) and y = -x (d), or to the right of x = 0 (b). Each
    boundary ray belongs to the sector that starts there. Eight of the 16 direction
    codes cannot occur, so they map to ``none``.
    """
    # (a, b, c, d) of each sector [0, 45), [45, 90), ..., [315, 360).
    sector_bits = [(1, 1, 0, 1), (1, 1, 1, 1), (1, 0, 1, 1), (1, 0, 1, 0), (0, 0, 1, 0), (0, 0, 0, 0), (0, 1, 0, 0), (0, 1, 0, 1)]
    sector_of_direction = {a << 3 | c << 2 | d << 1 | b: sector for sector, (a, b, c, d) in enumerate(sector_bits)}

    table = np.zeros(256, dtype=np.uint8)
    for code in range(256):
        direction, near = code >> 4, (code >> 3) & 1
        within, covers, overlaps = (code >> 2) & 1, (code >> 1) & 1, code & 1
        if within and covers:
            table[code] = OVERLAP
        elif within:
            table[code] = INSIDE
        elif covers:
            table[code] = COVER
        elif overlaps:
            table[code] = OVERLAP
        elif near and direction in sector_of_direction:
            table[code] = FIRST_DIRECTION + sector_of_direction[direction]
    return table


_LABEL_TABLE = _build_label_table()
# Label of the pair (j, i) for the code of the pair (i, j).
_REVERSE_LABEL_TABLE = INVERSE_RELATION[_LABEL_TABLE]


def relation_labels(
    boxes: np.ndarray,
    image_size: tuple[float, float],
    *,
    min_size: float = 1.0,
) -> np.ndarray:
    """Label every ordered pair of regions of one image with its spatial relation.

    Args:
        boxes: (N, 4) float or int, x1, y1, x2, y2 in pixels. A box narrower or lower
            than ``min_size``, inverted boxes included, is widened to ``min_size`` from
            its x1 or y1 edge.
        image_size: (height, width) in the units of ``boxes``, both positive.
        min_size: minimum box side in the units of ``boxes`` (one pixel by default).
            Scale it together with the boxes when they are not in pixels, for example
            1 / width for boxes divided by the image width.

    Returns:
        (N, N) uint8, entry [i, j] the label of the pair (i, j) as an index into
        ``RELATION_NAMES``, 0 on the diagonal.

    Raises:
        ValueError: when ``boxes`` is not (N, 4) or contains NaN or infinity, or when
            the image size or ``min_size`` is not positive and finite. Also when
            ``min_size`` is half the image or more, which usually means normalised
            boxes with the pixel default. Also when a box lies more than 8 image
            diagonals from the image origin, which usually means pixel boxes with a
            normalised image size.
    """
    boxes = _as_box_array(boxes)
    sizes = np.asarray(image_size, dtype=np.float64).reshape(1, -1)
    offsets = np.array([0, boxes.shape[0]], dtype=np.int64)
    labels, _ = relation_labels_batch(boxes, offsets, sizes, min_size=min_size)
    return labels.reshape(boxes.shape[0], boxes.shape[0])


def relation_labels_batch(
    boxes: np.ndarray,
    offsets: np.ndarray,
    image_sizes: np.ndarray,
    *,
    min_size: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Label every ordered pair of regions of many images at once.

    Images with the same region count are processed together in large vectorised
    chunks, so the cost per pair is a few nanoseconds even for small images.

    Args:
        boxes: (R, 4) float or int, the boxes of all images one after the other, in
            pixels of their own image.
        offsets: (M + 1,) int, image m owns ``boxes[offsets[m]:offsets[m + 1]]``.
            It starts at 0, never decreases and ends at R.
        image_sizes: (M, 2) float or int, (height, width) of each image.
        min_size: minimum box side in the units of ``boxes``, as in ``relation_labels``.

    Returns:
        labels: (sum of R_m**2,) uint8, image m's (R_m, R_m) label matrix flattened in
            row-major order, as ``relation_labels`` returns it.
        label_offsets: (M + 1,) int64, image m owns
            ``labels[label_offsets[m]:label_offsets[m + 1]]``.

    Raises:
        ValueError: on an invalid array shape, offsets that do not match ``boxes``,
            NaN or infinite values, or a size that is not positive. Also on a
            ``min_size`` of half an image or more, and on a box more than 8 image
            diagonals from its image origin.
    """
    boxes = _as_box_array(boxes)
    offsets = _as_offsets(offsets, boxes.shape[0])
    image_sizes = _as_image_sizes(image_sizes, offsets.shape[0] - 1)
    min_size = _as_min_size(min_size, image_sizes)

    counts = np.diff(offsets)
    label_offsets = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts * counts, out=label_offsets[1:])
    labels = np.zeros(int(label_offsets[-1]), dtype=np.uint8)

    attributes = _box_attributes(boxes, offsets, image_sizes, min_size)
    for count in np.unique(counts):
        if count < 2:
            continue
        images = np.flatnonzero(counts == count)
        _label_images_of_size(attributes, offsets, images, int(count), labels, label_offsets)
    return labels, label_offsets


def inverse_labels(labels: np.ndarray) -> np.ndarray:
    """Map each label to the label of the reversed pair.

    Args:
        labels: integer array of any shape with values in 0..11.

    Returns:
        uint8 array of the same shape. For a label matrix L of one image,
        ``inverse_labels(L).T`` equals L.

    Raises:
        ValueError: when a value lies outside 0..11.
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_RELATIONS):
        raise ValueError(
            f"relation labels must lie in 0..{NUM_RELATIONS - 1}, got values from "
            f"{labels.min()} to {labels.max()}"
        )
    return INVERSE_RELATION[labels]


def _as_box_array(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as x1, y1, x2, y2, got shape {boxes.shape}")
    if not np.isfinite(boxes).all():
        row = int(np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0])
        raise ValueError(f"box {row} contains NaN or infinity: {boxes[row].tolist()}; drop or repair it first")
    return boxes


def _as_offsets(offsets: np.ndarray, num_boxes: int) -> np.ndarray:
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.shape[0] < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(
            f"offsets must be a 1-D integer array of length M + 1, got dtype {offsets.dtype} shape {offsets.shape}"
        )
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != num_boxes or (np.diff(offsets) < 0).any():
        raise ValueError(
            f"offsets must start at 0, never decrease and end at the box count {num_boxes}, "
            f"got first {offsets[0]}, last {offsets[-1]}"
        )
    return offsets


def _as_image_sizes(image_sizes: np.ndarray, num_images: int) -> np.ndarray:
    sizes = np.asarray(image_sizes, dtype=np.float64)
    if sizes.shape != (num_images, 2):
        raise ValueError(f"image_sizes must have shape ({num_images}, 2) as (height, width), got {sizes.shape}")
    invalid = ~(np.isfinite(sizes) & (sizes > 0)).all(axis=1)
    if invalid.any():
        image = int(np.flatnonzero(invalid)[0])
        raise ValueError(
            f"image {image} has size {sizes[image].tolist()}; height and width must be positive and finite"
        )
    return sizes


def _as_min_size(min_size: float, image_sizes: np.ndarray) -> float:
    min_size = float(min_size)
    if not (np.isfinite(min_size) and min_size > 0):
        raise ValueError(f"min_size must be positive and finite, got {min_size}")
    too_small = 2.0 * min_size >= image_sizes.max(axis=1)
    if too_small.any():
        image = int(np.flatnonzero(too_small)[0])
        raise ValueError(
            f"min_size {min_size} is half of image {image} of size {image_sizes[image].tolist()} or more; "
            f"for boxes in normalised coordinates pass min_size in the same units, such as 1 / width"
        )
    return min_size


# Per-box values that the pair tests read.
_ATTRIBUTE_NAMES = ("x1", "y1", "x2", "y2", "containment_area", "relaxed_area", "offset_x", "offset_y")


def _box_attributes(
    boxes: np.ndarray, offsets: np.ndarray, image_sizes: np.ndarray, min_size: float
) -> np.ndarray:
    """Clamp boxes to ``min_size`` and compute the per-box values of ``_ATTRIBUTE_NAMES``.

    The centre positions offset_x and offset_y are doubled centres, y pointing up, in
    units of 2 * DIRECTION_TOLERANCE * diagonal, so their pair differences are centre
    offsets in units of DIRECTION_TOLERANCE * diagonal.

    Returns:
        (8, R) float64 in the order of ``_ATTRIBUTE_NAMES``.
    """
    coordinates = np.ascontiguousarray(boxes.T)
    x1, y1, x2, y2 = coordinates
    np.maximum(x2, x1 + min_size, out=x2)
    np.maximum(y2, y1 + min_size, out=y2)

    diagonals = np.hypot(image_sizes[:, 0], image_sizes[:, 1])
    box_diagonals = np.repeat(diagonals, np.diff(offsets))
    farthest = np.maximum(np.maximum(np.abs(x1), np.abs(y1)), np.maximum(np.abs(x2), np.abs(y2)))
    outside = farthest > MAX_DIAGONALS_FROM_ORIGIN * box_diagonals
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        image = int(np.searchsorted(offsets, row, side="right") - 1)
        raise ValueError(
            f"box {row - offsets[image]} of image {image} is {boxes[row].tolist()}, more than "
            f"{MAX_DIAGONALS_FROM_ORIGIN:g} image diagonals from the origin of an image of size "
            f"{image_sizes[image].tolist()}; check that boxes and image size use the same units"
        )

    attributes = np.empty((len(_ATTRIBUTE_NAMES), boxes.shape[0]))
    attributes[:4] = coordinates
    width, height = x2 - x1, y2 - y1
    area = width * height
    # An intersection of at least containment_area means that the box sticks out of
    # the other by about DIRECTION_TOLERANCE * diagonal at most.
    attributes[4] = area - DIRECTION_TOLERANCE * box_diagonals * np.minimum(width, height)
    attributes[5] = area * (1.0 - THRESHOLD_TOLERANCE)
    units = 1.0 / (2.0 * DIRECTION_TOLERANCE * box_diagonals)
    attributes[6] = (x1 + x2) * units
    attributes[7] = -(y1 + y2) * units
    return attributes


def _label_images_of_size(
    attributes: np.ndarray,
    offsets: np.ndarray,
    images: np.ndarray,
    count: int,
    labels: np.ndarray,
    label_offsets: np.ndarray,
) -> None:
    """Write the labels of ``images``, which all have ``count`` regions, into ``labels``.

    Only about half of the ordered pairs are computed: the pairs (i, (i + s) mod R_m)
    for the shifts s = 1..floor(R_m / 2), which contain every unordered pair at least
    once. The objects of shift s are the regions rolled by s, a strided view of the
    region attributes written twice in a row, so no pair array is gathered. The
    reverse labels come from the same codes through ``_REVERSE_LABEL_TABLE``.
    """
    shifts = count // 2
    forward, reverse = _shifted_pair_rows(count)
    pairs_per_image = shifts * count
    images_per_chunk = max(
        _PAIRS_PER_CHUNK // pairs_per_image,
        min(_MIN_IMAGES_PER_CHUNK, _MAX_PAIRS_PER_CHUNK // pairs_per_image),
        1,
    )
    buffers = _ShiftBuffers(count, min(images_per_chunk, images.shape[0]))
    label_steps = np.arange(count * count)

    for start in range(0, images.shape[0], images_per_chunk):
        chunk = images[start : start + images_per_chunk]
        size = chunk.shape[0]
        regions = buffers.regions[:, :, :size]
        square = buffers.square[:, :size]
        chunk_labels = buffers.labels[:, :, :size]

        # (8, 2 * R_m, B): attribute, region (all regions twice), image.
        np.take(attributes, np.arange(count)[:, None] + offsets[chunk][None, :], axis=1, out=regions[:, :count])
        regions[:, count:] = regions[:, :count]
        step_attribute, step_region, step_image = regions.strides
        objects = as_strided(
            regions[:, 1:],
            shape=(len(_ATTRIBUTE_NAMES), shifts, count, size),
            strides=(step_attribute, step_region, step_region, step_image),
            writeable=False,
        )
        codes = _pair_codes(regions[:, None, :count], objects, [array[:, :, :size] for array in buffers.scratch])

        # Rows of the diagonal pairs are never written, so they stay NONE.
        np.take(_LABEL_TABLE, codes, out=chunk_labels, mode="clip")
        square[forward] = chunk_labels.reshape(shifts * count, size)
        np.take(_REVERSE_LABEL_TABLE, codes, out=chunk_labels, mode="clip")
        square[reverse] = chunk_labels.reshape(shifts * count, size)

        if chunk[-1] - chunk[0] == size - 1:
            target = labels[label_offsets[chunk[0]] : label_offsets[chunk[-1] + 1]]
            target.reshape(size, count * count)[...] = square.T
        else:
            labels[label_offsets[chunk][:, None] + label_steps[None, :]] = square.T


@functools.lru_cache(maxsize=256)
def _shifted_pair_rows(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the rows i * R_m + j of the pairs (i, j) and (j, i) for shift-major (s, i).

    Here j = (i + s) mod R_m for the shifts s = 1..floor(R_m / 2), both arrays of
    length floor(R_m / 2) * R_m.
    """
    shifts = count // 2
    subject_rows = np.tile(np.arange(count), shifts)
    object_rows = (subject_rows + np.repeat(np.arange(1, shifts + 1), count)) % count
    return subject_rows * count + object_rows, object_rows * count + subject_rows


class _ShiftBuffers:
    """Arrays for chunks of up to ``images`` images with ``count`` regions, reused across chunks.

    Fresh large arrays cost a page fault per page, so every step writes into these.
    """

    def __init__(self, count: int, images: int) -> None:
        shape = (count // 2, count, images)
        self.regions = np.empty((len(_ATTRIBUTE_NAMES), 2 * count, images))
        floats = [np.empty(shape) for _ in range(5)]
        flags = [np.empty(shape, dtype=bool) for _ in range(3)]
        self.scratch = [*floats, *flags, np.empty(shape, dtype=np.uint8)]
        self.labels = np.empty(shape, dtype=np.uint8)
        self.square = np.zeros((count * count, images), dtype=np.uint8)


def _pair_codes(subjects: np.ndarray, objects: np.ndarray, buffers: list[np.ndarray]) -> np.ndarray:
    """Compute the 8-bit code of each pair (i, j), as ``_build_label_table`` reads it.

    Args:
        subjects: (8, ...) float64 attributes of box i in the order of
            ``_ATTRIBUTE_NAMES``, each broadcastable to the pair shape.
        objects: (8, ...) float64 attributes of box j, likewise.
        buffers: nine scratch arrays of the pair shape (five float64, three bool, one
            uint8), overwritten.

    Returns:
        uint8 codes of the pair shape. The array is the last buffer, valid until its
        next use.
    """
    x1_i, y1_i, x2_i, y2_i, containment_area_i, relaxed_area_i, offset_x_i, offset_y_i = subjects
    x1_j, y1_j, x2_j, y2_j, containment_area_j, relaxed_area_j, offset_x_j, offset_y_j = objects
    dx, dy, difference, total, tiebreak, flag, near, same_center, code = buffers
    flag_bits = flag.view(np.uint8)

    # Centre offset from i to j in tolerance units.
    np.subtract(offset_x_j, offset_x_i, out=dx)
    np.subtract(offset_y_j, offset_y_i, out=dy)
    np.multiply(dx, dx, out=difference)
    np.multiply(dy, dy, out=total)
    difference += total
    np.less_equal(difference, _SAME_CENTER_SQUARED, out=same_center)
    np.less(difference, _NEAR_SQUARED, out=near)

    # Truncation sends components within one tolerance unit of 0 to exactly 0.
    np.subtract(dy, dx, out=difference)
    np.add(dx, dy, out=total)
    for values in (dx, dy, difference, total):
        np.trunc(values, out=values)

    # Bit tests "primary > 0, or primary == 0 and tiebreak > 0" as primary > -tiebreak
    # scaled into (-1, 1), exact because the scale is a power of two. Primaries and
    # tiebreaks are (dy, dx) for a, (dy - dx, dx) for c, (dx + dy, dx) for d and
    # (dx, -dy) for b.
    np.multiply(dx, -_TIEBREAK_SCALE, out=tiebreak)
    np.greater(dy, tiebreak, out=flag)
    code[...] = flag_bits
    for primary in (difference, total):
        np.greater(primary, tiebreak, out=flag)
        code += code
        code |= flag_bits
    np.multiply(dy, _TIEBREAK_SCALE, out=tiebreak)
    np.greater(dx, tiebreak, out=flag)
    code += code
    code |= flag_bits
    code += code
    code |= near.view(np.uint8)

    # Intersection area. Clamping the width at 0 is enough: a negative height then gives
    # an intersection <= 0, which fails every test below as a missing overlap should.
    intersection, scratch, height = dx, dy, difference
    np.minimum(x2_i, x2_j, out=intersection)
    np.maximum(x1_i, x1_j, out=scratch)
    intersection -= scratch
    np.maximum(intersection, 0.0, out=intersection)
    np.minimum(y2_i, y2_j, out=height)
    np.maximum(y1_i, y1_j, out=scratch)
    height -= scratch
    intersection *= height

    # Containment: the intersection comes within the tolerance of a box's area only when
    # that box lies within the other, because intersection sides never exceed its sides.
    np.greater_equal(intersection, containment_area_i, out=flag)
    code += code
    code |= flag_bits
    np.greater_equal(intersection, containment_area_j, out=flag)
    code += code
    code |= flag_bits

    # IoU >= 0.5 is 3 * intersection >= area_i + area_j; coincident centres count too.
    np.add(relaxed_area_i, relaxed_area_j, out=scratch)
    intersection *= 3.0
    np.greater_equal(intersection, scratch, out=flag)
    flag |= same_center
    code += code
    code |= flag_bits
    return code
