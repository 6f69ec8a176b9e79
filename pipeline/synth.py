"""Render synthetic scenes of coloured shapes with captions and ground-truth scene graphs.

Each scene is a square PNG of 2 to 4 shapes (circle, square, triangle, rectangle,
diamond) in distinct colours and three size classes. Some shapes overlap and some
scenes hold one shape inside another. Output layout under `out_dir`:
- `images/scene_00000.png`, ...;
- `captions.jsonl`: one `{"image", "captions"}` object per line with 5 distinct true captions;
- `annotations.json`: the label, attribute and predicate vocabularies and, per image,
  the objects (box, label, attributes) and every true relation.

Boxes are [x1, y1, x2, y2] in integer pixels with x to the right and y down. x2 and y2
are exclusive, so a shape's pixels lie in columns x1..x2-1 and rows y1..y2-1, and its
width is x2 - x1. Centres are cx = (x1 + x2) / 2 and cy = (y1 + y2) / 2.

Relations are computed from the boxes alone, for every ordered pair (i, j) with i != j.
Let "i within j" mean x1_i >= x1_j, y1_i >= y1_j, x2_i <= x2_j and y2_i <= y2_j, and let
"nested" mean that i is within j or j is within i. The margin m is
RELATION_MARGIN_FRACTION (0.04) times the image side.
- inside: i within j, and j not within i (identical boxes are never generated).
- contains: j inside i.
- overlapping: not nested, and the boxes share an area (x1_i < x2_j, x1_j < x2_i and the
  same for y).
- left of: not nested, cx_i <= cx_j - m, and the rows overlap (y1_i < y2_j and y1_j < y2_i).
- right of: j left of i.
- above: not nested, cy_i <= cy_j - m, and the columns overlap (x1_i < x2_j and x1_j < x2_i).
- below: j above i.
A pair can have several predicates, for example "left of" and "overlapping".

With `paired=True`, images 2k and 2k+1 hold the same shapes (label, colour, size class and
box size). The second is the first mirrored left-right, or flipped top-bottom, so at least
one directional relation is reversed. Its captions state only relations that are false in
the partner image, so only relations tell the two apart.

Output is deterministic for a given (seed, paired, size): the same pixels and the same
caption and annotation bytes.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

LABELS = ("circle", "square", "triangle", "rectangle", "diamond")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (148, 73, 189),
    "orange": (255, 127, 14),
    "black": (20, 20, 20),
}
SIZE_CLASSES = ("small", "medium", "large")
ATTRIBUTES = tuple(COLOURS) + SIZE_CLASSES
PREDICATES = ("left of", "right of", "above", "below", "inside", "contains", "overlapping")

# Range of the longer box side, as a fraction of the image side, per size class.
SIZE_RANGES = {"small": (0.12, 0.18), "medium": (0.22, 0.30), "large": (0.36, 0.46)}

RELATION_MARGIN_FRACTION = 0.04
CAPTIONS_PER_IMAGE = 5
MIN_SIZE = 64
MAX_SIZE = 4096

_LAYOUT_ATTEMPTS = 200
_PLACEMENT_ATTEMPTS = 30
_CONTAINMENT_PROBABILITY = 0.35
_OVERLAP_PROBABILITY = 0.25
_INVENTORY_CAPTION_PROBABILITY = 0.25
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene.

    Attributes:
        label: shape name from LABELS.
        colour: colour name from COLOURS.
        size_class: one of SIZE_CLASSES.
        box: (x1, y1, x2, y2) integer pixels, x2 and y2 exclusive.
    """

    label: str
    colour: str
    size_class: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Relation:
    """A true relation: objects[subject] <predicate> objects[object]."""

    subject: int
    predicate: str
    object: int


@dataclass
class SynthSummary:
    """Paths and counts of one `generate_scenes` run.

    Attributes:
        out_dir: the output folder.
        images_dir: folder of the PNG scenes.
        captions_path: captions.jsonl.
        annotations_path: annotations.json.
        n_images: images written.
        n_objects: shapes over all images.
        n_relations: relations over all images.
        predicate_counts: relations per predicate.
        seed: random seed used.
        paired: whether images come in relation-swapped pairs.
        size: image side in pixels.
    """

    out_dir: Path
    images_dir: Path
    captions_path: Path
    annotations_path: Path
    n_images: int
    n_objects: int
    n_relations: int
    predicate_counts: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    paired: bool = False
    size: int = 256


def generate_scenes(
    out_dir: Path,
    n_images: int,
    seed: int,
    paired: bool = False,
    size: int = 256,
    overwrite: bool = False,
) -> SynthSummary:
    """Render `n_images` scenes with captions and annotations into `out_dir`.

    Every file is written atomically. The images come first, so a present
    annotations.json means that all images are in place.

    Args:
        out_dir: output folder; created when missing.
        n_images: number of images, >= 1 (even when `paired`).
        seed: random seed, an int >= 0.
        paired: write consecutive pairs with the same shapes in swapped relations.
        size: image side in pixels, MIN_SIZE to MAX_SIZE.
        overwrite: replace an earlier output. Without it, a non-empty `out_dir/images`
            or an existing annotations.json raises FileExistsError. With it, the earlier
            annotations.json, captions.jsonl and `scene_*.png` files are removed first.

    Returns:
        SynthSummary with the paths and counts.

    Raises:
        ValueError: on an invalid n_images, seed or size, or an odd n_images with `paired`.
        FileExistsError: when an earlier output is present and `overwrite` is false.
        OSError: when a file cannot be written.
    """
    _validate_arguments(n_images, seed, size, paired)
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    captions_path = out_dir / "captions.jsonl"
    annotations_path = out_dir / "annotations.json"
    _prepare_output(images_dir, [annotations_path, captions_path], overwrite)

    name_width = max(5, len(str(n_images - 1)))
    image_records = []
    caption_lines = []

    for scenes in _iter_scene_groups(n_images, seed, paired, size):
        for scene in scenes:
            index = len(image_records)
            file_name = f"scene_{index:0{name_width}d}.png"
            _write_png_atomic(render_scene(scene["objects"], size), images_dir / file_name)
            image_records.append(_image_record(file_name, scene, size, paired, index))
            caption_lines.append({"image": file_name, "captions": scene["captions"]})

    _write_text_atomic(captions_path, _jsonl_text(caption_lines))
    _write_text_atomic(annotations_path, _annotations_text(image_records, seed, paired, size))

    summary = _summarise(out_dir, images_dir, captions_path, annotations_path, image_records)
    summary.seed = seed
    summary.paired = paired
    summary.size = size
    logger.info(
        "Wrote %d synthetic scenes (%d objects, %d relations) to %s.",
        summary.n_images,
        summary.n_objects,
        summary.n_relations,
        out_dir,
    )
    return summary


def compute_relations(objects: list[SceneObject], size: int) -> list[Relation]:
    """List every true relation between ordered object pairs, per the module rules.

    Args:
        objects: the scene's shapes.
        size: image side in pixels; sets the margin of the directional predicates.

    Returns:
        Relations sorted by (subject, object, PREDICATES order).
    """
    margin = RELATION_MARGIN_FRACTION * size
    relations = []
    for i, first in enumerate(objects):
        for j, second in enumerate(objects):
            if i == j:
                continue
            for predicate in _pair_predicates(first.box, second.box, margin):
                relations.append(Relation(i, predicate, j))
    return relations


def render_scene(objects: list[SceneObject], size: int) -> Image.Image:
    """Draw the shapes on a light grey background, larger shapes first.

    Drawing larger shapes first keeps a contained shape visible on top of its container.

    Returns:
        An RGB image of size x size pixels.
    """
    image = Image.new("RGB", (size, size), (225, 225, 225))
    draw = ImageDraw.Draw(image)
    order = sorted(range(len(objects)), key=lambda i: (-_area(objects[i].box), i))

    for index in order:
        shape = objects[index]
        x1, y1, x2, y2 = shape.box
        colour = COLOURS[shape.colour]
        right, bottom = x2 - 1, y2 - 1
        if shape.label == "circle":
            draw.ellipse((x1, y1, right, bottom), fill=colour)
        elif shape.label in ("square", "rectangle"):
            draw.rectangle((x1, y1, right, bottom), fill=colour)
        elif shape.label == "triangle":
            draw.polygon([(x1, bottom), (right, bottom), ((x1 + right) / 2, y1)], fill=colour)
        else:
            centre_x, centre_y = (x1 + right) / 2, (y1 + bottom) / 2
            points = [(centre_x, y1), (right, centre_y), (centre_x, bottom), (x1, centre_y)]
            draw.polygon(points, fill=colour)

    return image


def _validate_arguments(n_images: int, seed: int, size: int, paired: bool) -> None:
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be an int >= 1, got {n_images!r}.")

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}.")

    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an int from {MIN_SIZE} to {MAX_SIZE} pixels, got {size!r}.")

    if paired and n_images % 2:
        raise ValueError(
            f"paired scenes come in pairs, so n_images must be even, got {n_images}; "
            f"use {n_images + 1} or {n_images - 1}."
        )


def _prepare_output(images_dir: Path, text_outputs: list[Path], overwrite: bool) -> None:
    """Check for an earlier output and, with `overwrite`, remove it (text files first)."""
    earlier_images = images_dir.is_dir() and any(images_dir.iterdir())
    earlier_text = [path for path in text_outputs if path.exists()]
    if (earlier_images or earlier_text) and not overwrite:
        found = str(images_dir) if earlier_images else str(earlier_text[0])
        raise FileExistsError(
            f"Output from an earlier run found at {found!r}; choose an empty --out folder "
            "or pass --overwrite to replace it."
        )

    # Removing annotations.json first keeps its promise that all listed images exist.
    for path in earlier_text:
        path.unlink()

    removed = 0
    if earlier_images:
        for old in images_dir.glob("scene_*.png"):
            old.unlink()
            removed += 1
        logger.info("Removed %d earlier scenes from %s.", removed, images_dir)

    images_dir.mkdir(parents=True, exist_ok=True)


def _iter_scene_groups(n_images: int, seed: int, paired: bool, size: int):
    """Yield lists of scene dicts: one scene per group, or a pair when `paired`."""
    if not paired:
        for index in range(n_images):
            rng = np.random.default_rng([seed, index])
            objects = _sample_layout(rng, size)
            relations = compute_relations(objects, size)
            captions = _write_captions(rng, objects, relations, allow_inventory=True)
            yield [{"objects": objects, "relations": relations, "captions": captions}]
        return

    for pair_index in range(n_images // 2):
        rng = np.random.default_rng([seed, pair_index, 1])
        yield _sample_pair(rng, size)


def _sample_pair(rng: np.random.Generator, size: int) -> list[dict]:
    """Sample a scene and its mirror or flip, with captions of the relations that differ."""
    for _ in range(_LAYOUT_ATTEMPTS):
        first = _sample_layout(rng, size)
        first_relations = compute_relations(first, size)
        axes = _swappable_axes(first, first_relations)
        if axes:
            break
    else:
        first = _fallback_layout(rng, size)
        first_relations = compute_relations(first, size)
        axes = ["horizontal"]

    axis = axes[int(rng.integers(len(axes)))]
    second = [replace(shape, box=_flip_box(shape.box, size, axis)) for shape in first]
    second_relations = compute_relations(second, size)

    scenes = []
    for objects, relations, partner in (
        (first, first_relations, set(second_relations)),
        (second, second_relations, set(first_relations)),
    ):
        distinct = [relation for relation in relations if relation not in partner]
        captions = _write_captions(rng, objects, distinct, allow_inventory=False)
        scenes.append({"objects": objects, "relations": relations, "captions": captions})
    return scenes


def _swappable_axes(objects: list[SceneObject], relations: list[Relation]) -> list[str]:
    """Return the flips that reverse a relation and keep every contained shape inside its container."""
    predicates = {relation.predicate for relation in relations}
    axes = []
    if "left of" in predicates:
        axes.append("horizontal")

    # A shape inside a triangle sits in the lower half of the triangle's box, so a
    # top-bottom flip would move it outside the drawn triangle.
    triangle_contains = any(
        relation.predicate == "contains" and objects[relation.subject].label == "triangle"
        for relation in relations
    )
    if "above" in predicates and not triangle_contains:
        axes.append("vertical")
    return axes


def _flip_box(box: tuple[int, int, int, int], size: int, axis: str) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    if axis == "horizontal":
        return (size - x2, y1, size - x1, y2)
    return (x1, size - y2, x2, size - y1)


def _sample_layout(rng: np.random.Generator, size: int) -> list[SceneObject]:
    """Sample 2 to 4 shapes until every shape takes part in at least one relation."""
    for _ in range(_LAYOUT_ATTEMPTS):
        objects = _try_layout(rng, size)
        if objects is None:
            continue
        related = {relation.subject for relation in compute_relations(objects, size)}
        if len(related) == len(objects):
            return objects

    logger.debug("No layout found after %d attempts; using the side-by-side layout.", _LAYOUT_ATTEMPTS)
    return _fallback_layout(rng, size)


def _try_layout(rng: np.random.Generator, size: int) -> list[SceneObject] | None:
    count = int(rng.integers(2, 5))
    colours = [str(name) for name in rng.choice(list(COLOURS), size=count, replace=False)]
    labels = [str(name) for name in rng.choice(LABELS, size=count)]
    size_classes = [str(name) for name in rng.choice(SIZE_CLASSES, size=count)]
    objects: list[SceneObject] = []

    if rng.random() < _CONTAINMENT_PROBABILITY:
        size_classes[0] = "large"
        size_classes[1] = "small" if rng.random() < 0.7 else "medium"
        container = _place_free(rng, size, labels[0], colours[0], "large")
        content = _place_inside(rng, size, container, labels[1], colours[1], size_classes[1])
        if content is None:
            return None
        objects = [container, content]

    while len(objects) < count:
        index = len(objects)
        shape = _place_next_to(rng, size, objects, labels[index], colours[index], size_classes[index])
        if shape is None:
            return None
        objects.append(shape)

    return objects


def _place_free(
    rng: np.random.Generator, size: int, label: str, colour: str, size_class: str
) -> SceneObject:
    width, height = _shape_size(rng, size, label, size_class)
    x1 = int(rng.integers(1, size - width))
    y1 = int(rng.integers(1, size - height))
    return SceneObject(label, colour, size_class, (x1, y1, x1 + width, y1 + height))


def _place_inside(
    rng: np.random.Generator,
    size: int,
    container: SceneObject,
    label: str,
    colour: str,
    size_class: str,
) -> SceneObject | None:
    """Place a shape within the region that the container's drawn outline encloses."""
    left, top, right, bottom = _inner_region(container)
    width, height = _shape_size(rng, size, label, size_class)
    lowest_x, highest_x = int(np.ceil(left)), int(np.floor(right - width))
    lowest_y, highest_y = int(np.ceil(top)), int(np.floor(bottom - height))
    if highest_x < lowest_x or highest_y < lowest_y:
        return None

    x1 = int(rng.integers(lowest_x, highest_x + 1))
    y1 = int(rng.integers(lowest_y, highest_y + 1))
    return SceneObject(label, colour, size_class, (x1, y1, x1 + width, y1 + height))


def _inner_region(container: SceneObject) -> tuple[float, float, float, float]:
    """Return an axis-aligned region inside the drawn shape, with a 10 % safety border."""
    x1, y1, x2, y2 = container.box
    width, height = x2 - x1, y2 - y1
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2

    if container.label in ("square", "rectangle"):
        half_width, half_height = width / 2, height / 2
    elif container.label == "circle":
        half_width = half_height = width / 2 / np.sqrt(2)
    elif container.label == "diamond":
        half_width, half_height = width / 4, height / 4
    else:
        # The largest rectangle in an upright triangle spans the middle half of the base
        # and the lower half of the height.
        half_width, half_height = width / 4, height / 4
        centre_y = y2 - height / 4

    half_width, half_height = 0.9 * half_width, 0.9 * half_height
    return (centre_x - half_width, centre_y - half_height, centre_x + half_width, centre_y + half_height)


def _place_next_to(
    rng: np.random.Generator,
    size: int,
    objects: list[SceneObject],
    label: str,
    colour: str,
    size_class: str,
) -> SceneObject | None:
    """Place a shape beside a top-level shape, sometimes overlapping it, or anywhere if none exists."""
    if not objects:
        return _place_free(rng, size, label, colour, size_class)

    anchors = [index for index, shape in enumerate(objects) if not _is_contained(index, objects)]
    for _ in range(_PLACEMENT_ATTEMPTS):
        anchor_index = anchors[int(rng.integers(len(anchors)))]
        anchor = objects[anchor_index]
        width, height = _shape_size(rng, size, label, size_class)
        overlap = rng.random() < _OVERLAP_PROBABILITY and not _has_content(anchor_index, objects)
        box = _box_beside(rng, size, anchor.box, width, height, overlap)
        if _fits(box, size) and _clear_of_others(box, anchor_index, overlap, objects):
            return SceneObject(label, colour, size_class, box)
    return None


def _box_beside(
    rng: np.random.Generator,
    size: int,
    anchor: tuple[int, int, int, int],
    width: int,
    height: int,
    overlap: bool,
) -> tuple[int, int, int, int]:
    """Return a box to one side of `anchor` that shares rows (or columns) with it."""
    ax1, ay1, ax2, ay2 = anchor
    side = ("left", "right", "above", "below")[int(rng.integers(4))]
    if overlap:
        gap = -int(rng.uniform(0.15, 0.35) * min(width, height, ax2 - ax1, ay2 - ay1))
    else:
        gap = int(rng.uniform(0.03, 0.12) * size)

    if side in ("left", "right"):
        shift = rng.uniform(-0.35, 0.35) * (ay2 - ay1)
        y1 = int(round((ay1 + ay2) / 2 + shift - height / 2))
        x1 = ax1 - gap - width if side == "left" else ax2 + gap
    else:
        shift = rng.uniform(-0.35, 0.35) * (ax2 - ax1)
        x1 = int(round((ax1 + ax2) / 2 + shift - width / 2))
        y1 = ay1 - gap - height if side == "above" else ay2 + gap

    return (x1, y1, x1 + width, y1 + height)


def _fits(box: tuple[int, int, int, int], size: int) -> bool:
    x1, y1, x2, y2 = box
    return x1 >= 1 and y1 >= 1 and x2 <= size - 1 and y2 <= size - 1


def _clear_of_others(
    box: tuple[int, int, int, int], anchor_index: int, overlap: bool, objects: list[SceneObject]
) -> bool:
    """Check that `box` touches no shape except, when overlapping, a partial overlap with its anchor."""
    for index, shape in enumerate(objects):
        shared = _intersection_area(box, shape.box)
        if index != anchor_index or not overlap:
            if shared > 0:
                return False
            continue

        if _within(box, shape.box) or _within(shape.box, box):
            return False
        if shared == 0 or shared > 0.3 * min(_area(box), _area(shape.box)):
            return False
    return True


def _fallback_layout(rng: np.random.Generator, size: int) -> list[SceneObject]:
    """Return two medium shapes side by side, so "left of" and "right of" are always true."""
    colours = [str(name) for name in rng.choice(list(COLOURS), size=2, replace=False)]
    labels = [str(name) for name in rng.choice(["circle", "square", "diamond"], size=2)]
    side = int(0.25 * size)
    top = (size - side) // 2
    left_x = size // 2 - side - int(0.05 * size)
    right_x = size // 2 + int(0.05 * size)
    return [
        SceneObject(labels[0], colours[0], "medium", (left_x, top, left_x + side, top + side)),
        SceneObject(labels[1], colours[1], "medium", (right_x, top, right_x + side, top + side)),
    ]


def _shape_size(rng: np.random.Generator, size: int, label: str, size_class: str) -> tuple[int, int]:
    """Return (width, height) in pixels; the longer side falls in the size class range."""
    low, high = SIZE_RANGES[size_class]
    side = max(4, int(round(rng.uniform(low, high) * size)))
    if label == "triangle":
        return side, max(3, int(round(0.87 * side)))
    if label == "rectangle":
        short = max(3, int(round(rng.uniform(0.45, 0.65) * side)))
        return (side, short) if rng.random() < 0.5 else (short, side)
    return side, side


def _pair_predicates(
    first: tuple[int, int, int, int], second: tuple[int, int, int, int], margin: float
) -> list[str]:
    """Return the predicates true for (first, second), in PREDICATES order."""
    first_within = _within(first, second)
    second_within = _within(second, first)
    if first_within and not second_within:
        return ["inside"]
    if second_within and not first_within:
        return ["contains"]
    if first_within and second_within:
        return []

    x1, y1, x2, y2 = first
    u1, v1, u2, v2 = second
    rows_overlap = y1 < v2 and v1 < y2
    columns_overlap = x1 < u2 and u1 < x2
    dx = (u1 + u2) / 2 - (x1 + x2) / 2
    dy = (v1 + v2) / 2 - (y1 + y2) / 2

    predicates = []
    if rows_overlap and dx >= margin:
        predicates.append("left of")
    if rows_overlap and -dx >= margin:
        predicates.append("right of")
    if columns_overlap and dy >= margin:
        predicates.append("above")
    if columns_overlap and -dy >= margin:
        predicates.append("below")
    if rows_overlap and columns_overlap:
        predicates.append("overlapping")
    return predicates


def _within(inner: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> bool:
    return (
        inner[0] >= outer[0] and inner[1] >= outer[1] and inner[2] <= outer[2] and inner[3] <= outer[3]
    )


def _intersection_area(first: tuple[int, int, int, int], second: tuple[int, int, int, int]) -> int:
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    return max(0, width) * max(0, height)


def _area(box: tuple[int, int, int, int]) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _is_contained(index: int, objects: list[SceneObject]) -> bool:
    return any(
        other != index and _within(objects[index].box, shape.box)
        for other, shape in enumerate(objects)
    )


def _has_content(index: int, objects: list[SceneObject]) -> bool:
    return any(
        other != index and _within(shape.box, objects[index].box)
        for other, shape in enumerate(objects)
    )


# Captions ---------------------------------------------------------------------------

_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above",),
    "below": ("below", "under", "beneath"),
    "inside": ("inside", "within", "in"),
}
_SPATIAL_TEMPLATES = ("{s} {p} {o}", "{s} is {p} {o}", "there is {s} {p} {o}", "{s} placed {p} {o}")
_CONTAINS_TEMPLATES = ("{s} containing {o}", "{s} with {o} inside it", "{s} that contains {o}")
_OVERLAP_TEMPLATES = ("{s} overlapping {o}", "{s} that overlaps {o}", "{s} is overlapping {o}")


def _write_captions(
    rng: np.random.Generator,
    objects: list[SceneObject],
    relations: list[Relation],
    allow_inventory: bool,
) -> list[str]:
    """Pick CAPTIONS_PER_IMAGE distinct true captions, spread over relations and templates."""
    pools = [_relation_captions(objects, relation) for relation in relations]
    for pool in pools:
        rng.shuffle(pool)
    order = [int(i) for i in rng.permutation(len(pools))]

    captions: list[str] = []
    used_templates: set[str] = set()
    if allow_inventory and rng.random() < _INVENTORY_CAPTION_PROBABILITY:
        captions.append(_inventory_caption(rng, objects))

    while len(captions) < CAPTIONS_PER_IMAGE and any(pools):
        for index in order:
            if len(captions) == CAPTIONS_PER_IMAGE:
                break
            choice = _pick_caption(pools[index], captions, used_templates)
            if choice is not None:
                used_templates.add(choice[0])
                captions.append(choice[1])

    if len(captions) < CAPTIONS_PER_IMAGE:
        raise RuntimeError(
            f"Only {len(captions)} distinct captions for a scene with {len(relations)} "
            "relations; every generated layout must hold at least one relation."
        )
    return captions


def _pick_caption(
    pool: list[tuple[str, str]], captions: list[str], used_templates: set[str]
) -> tuple[str, str] | None:
    """Remove and return a caption of the pool, preferring a template not used yet."""
    unused = [item for item in pool if item[1] not in captions]
    pool[:] = unused
    if not pool:
        return None

    fresh = [position for position, item in enumerate(pool) if item[0] not in used_templates]
    return pool.pop(fresh[0] if fresh else 0)


def _relation_captions(objects: list[SceneObject], relation: Relation) -> list[tuple[str, str]]:
    """Return every (template key, caption) wording of one relation, with and without size words."""
    subject = objects[relation.subject]
    target = objects[relation.object]
    if relation.predicate == "contains":
        templates, phrases = _CONTAINS_TEMPLATES, ("",)
    elif relation.predicate == "overlapping":
        templates, phrases = _OVERLAP_TEMPLATES, ("",)
    else:
        templates, phrases = _SPATIAL_TEMPLATES, _PHRASES[relation.predicate]

    captions = []
    for template in templates:
        for phrase in phrases:
            for subject_size in (False, True):
                for object_size in (False, True):
                    caption = template.format(
                        s=_noun_phrase(subject, subject_size),
                        p=phrase,
                        o=_noun_phrase(target, object_size),
                    )
                    captions.append((template, caption))
    return captions


def _inventory_caption(rng: np.random.Generator, objects: list[SceneObject]) -> str:
    phrases = [_noun_phrase(shape, bool(rng.random() < 0.5)) for shape in objects]
    listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{_NUMBER_WORDS[len(objects)]} shapes: {listed}"


def _noun_phrase(shape: SceneObject, with_size: bool) -> str:
    words = ([shape.size_class] if with_size else []) + [shape.colour, shape.label]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


# Output files -----------------------------------------------------------------------


def _image_record(file_name: str, scene: dict, size: int, paired: bool, index: int) -> dict:
    record = {
        "image": file_name,
        "width": size,
        "height": size,
        "objects": [
            {
                "box": list(shape.box),
                "label": shape.label,
                "attributes": [shape.colour, shape.size_class],
            }
            for shape in scene["objects"]
        ],
        "relations": [
            {"subject": relation.subject, "predicate": relation.predicate, "object": relation.object}
            for relation in scene["relations"]
        ],
    }
    if paired:
        record["pair"] = index // 2
    return record


def _annotations_text(image_records: list[dict], seed: int, paired: bool, size: int) -> str:
    document = {
        "labels": list(LABELS),
        "attributes": list(ATTRIBUTES),
        "predicates": list(PREDICATES),
        "box_format": "x1, y1, x2, y2 in pixels; x2 and y2 exclusive",
        "relation_margin": RELATION_MARGIN_FRACTION * size,
        "seed": seed,
        "paired": paired,
        "images": image_records,
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n"


def _jsonl_text(lines: list[dict]) -> str:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


def _summarise(
    out_dir: Path,
    images_dir: Path,
    captions_path: Path,
    annotations_path: Path,
    image_records: list[dict],
) -> SynthSummary:
    predicate_counts = Counter(
        relation["predicate"] for record in image_records for relation in record["relations"]
    )
    return SynthSummary(
        out_dir=out_dir,
        images_dir=images_dir,
        captions_path=captions_path,
        annotations_path=annotations_path,
        n_images=len(image_records),
        n_objects=sum(len(record["objects"]) for record in image_records),
        n_relations=sum(predicate_counts.values()),
        predicate_counts={name: predicate_counts.get(name, 0) for name in PREDICATES},
    )


def _write_png_atomic(image: Image.Image, path: Path) -> None:
    temporary = _temporary_path(path)
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _temporary_path(path: Path) -> Path:
    # Hidden, so input discovery never lists a half-written scene.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
