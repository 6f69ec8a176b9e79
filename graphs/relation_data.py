"""Training data of the relation predictor: relation annotations joined with region shards.

Shapes: R regions of an image, D feature size, T annotated relations of an image.

The annotations are a Visual-Genome-style JSON file, the layout that
``cmsei-prep synth`` writes as ``annotations.json``::

    {"predicates": ["left of", ...],                       # optional with --predicates
     "images": [{"image": "scene_00000.png",               # the image id in DATA/regions
                 "objects": [{"box": [x1, y1, x2, y2], "label": "circle"}, ...],
                 "relations": [{"subject": 0, "predicate": "left of", "object": 2}, ...]}]}

Features come from ``cmsei-prep extract --boxes annotations.json``, which pools them at
the annotated boxes in the given order, so region k of an image is object k. Images
whose region count or boxes disagree with the annotation are left out and reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from graphs.predicates import BACKGROUND, with_background
from pipeline.dataset import DatasetFolder
from pipeline.region_shards import RegionShard

logger = logging.getLogger(__name__)

# Largest difference, in pixels, between an annotated box and the region box pooled at
# it. The extractor clips boxes to the image, so annotations may stick out this much.
BOX_TOLERANCE = 1.0
CLASS_SOURCES = ("detector", "annotations")


class RelationDataError(ValueError):
    """The annotations or the regions cannot be used for training; the message gives the reason."""


@dataclass
class AnnotatedImage:
    """One image of the annotation file.

    Attributes:
        boxes: (R, 4) float64 x1, y1, x2, y2 in pixels.
        labels: R object label names.
        relations: (T, 3) int64 rows (subject, object, predicate index).
    """

    boxes: np.ndarray
    labels: list[str]
    relations: np.ndarray


@dataclass
class RelationAnnotations:
    """A parsed annotation file: predicate names (background first) and images by id."""

    predicate_names: tuple[str, ...]
    images: dict[str, AnnotatedImage]
    sha256: str


@dataclass
class TrainingSet:
    """Samples for ``graphs.train_relations`` and what was left out.

    Attributes:
        samples: image id -> sample dict (features, object_ids, boxes, image_size, relations).
        skipped: image id -> reason, for annotated images that could not be used.
        object_names: the region shards' K class names.
        feature_dim: D.
    """

    samples: dict[str, dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    object_names: list[str] = field(default_factory=list)
    feature_dim: int = 0


def read_relation_annotations(
    path: str | os.PathLike, predicate_names: Sequence[str] | None = None
) -> RelationAnnotations:
    """Parse a relation annotation file (layout in the module docstring).

    Args:
        path: the JSON file.
        predicate_names: the predicate vocabulary, e.g. from ``load_vg150_vocab``;
            default: the file's ``predicates`` list.

    Raises:
        FileNotFoundError: when the file does not exist.
        RelationDataError: on invalid JSON or a missing field. Also on a relation whose
            predicate is not in the vocabulary or whose object index is out of range. The
            message names the image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RelationDataError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise RelationDataError(f"{path} has no list 'images'; expected the annotations.json layout of `cmsei-prep synth`")

    if predicate_names is None:
        if not isinstance(data.get("predicates"), list):
            raise RelationDataError(f"{path} has no list 'predicates'; add one or pass a predicate vocabulary (--predicates)")
        predicate_names = data["predicates"]
    names = with_background(predicate_names)
    index = {name: position for position, name in enumerate(names)}

    images = {}
    for position, entry in enumerate(data["images"]):
        where = f"{path}: images[{position}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise RelationDataError(f"{where} has no string field 'image'")
        if entry["image"] in images:
            raise RelationDataError(f"{where}: image {entry['image']!r} appears twice")
        images[entry["image"]] = _parse_image(entry, f"{where} ({entry['image']})", index)
    logger.info("read %d annotated images with %d relations and %d predicates from %s", len(images),
                sum(image.relations.shape[0] for image in images.values()), len(names) - 1, path)
    return RelationAnnotations(names, images, hashlib.sha256(raw).hexdigest())


def _parse_image(entry: dict, where: str, predicate_index: dict[str, int]) -> AnnotatedImage:
    objects = entry.get("objects", [])
    if not isinstance(objects, list):
        raise RelationDataError(f"{where}: 'objects' must be a list")
    boxes, labels = [], []
    for number, obj in enumerate(objects):
        box = obj.get("box") if isinstance(obj, dict) else None
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise RelationDataError(f"{where}: objects[{number}].box must be [x1, y1, x2, y2], got {box!r}")
        boxes.append([float(value) for value in box])
        labels.append(str(obj.get("label", "")))

    relations = []
    for number, relation in enumerate(entry.get("relations", []) or []):
        if not isinstance(relation, dict):
            raise RelationDataError(f"{where}: relations[{number}] must be an object")
        subject, object_, predicate = relation.get("subject"), relation.get("object"), relation.get("predicate")
        for name, value in (("subject", subject), ("object", object_)):
            if not isinstance(value, int) or not 0 <= value < len(boxes):
                raise RelationDataError(f"{where}: relations[{number}].{name} is {value!r}, expected 0..{len(boxes) - 1}")
        if subject == object_:
            raise RelationDataError(f"{where}: relations[{number}] has object {subject} as both subject and object")
        if predicate not in predicate_index or predicate == BACKGROUND:
            raise RelationDataError(f"{where}: relations[{number}] has predicate {predicate!r}, which the predicate "
                                    "vocabulary does not list")
        relations.append((subject, object_, predicate_index[predicate]))
    return AnnotatedImage(np.array(boxes, dtype=np.float64).reshape(-1, 4), labels,
                          np.array(relations, dtype=np.int64).reshape(-1, 3))


def load_training_set(data: DatasetFolder, annotations: RelationAnnotations, class_source: str = "detector") -> TrainingSet:
    """Join the annotations with the region shards of ``data`` into training samples.

    Args:
        data: a dataset folder whose regions were extracted at the annotated boxes.
        annotations: the parsed annotation file.
        class_source: ``"detector"`` uses the region shards' ``object_ids``, the
            classes the predictor will see at inference. ``"annotations"`` maps the
            annotated labels to the shards' ``object_names`` by exact name.

    Returns:
        The samples and the skipped images with reasons: an annotated image missing
        from the regions or failed there, or whose region count or boxes differ.

    Raises:
        RelationDataError: on an unknown ``class_source``, an annotated label that is
            not a class name with ``"annotations"``, or no usable image at all.
    """
    if class_source not in CLASS_SOURCES:
        raise RelationDataError(f"class source must be one of {', '.join(CLASS_SOURCES)}, got {class_source!r}")
    result = TrainingSet(samples={})
    annotated_ids = set(annotations.images)
    for path in data.region_shard_paths():
        if not path.exists():
            logger.warning("%s is missing; its images are not used for training", path)
            continue
        with RegionShard(path) as shard:
            result.object_names = list(shard.object_names)
            result.feature_dim = int(shard.attrs["feature_dim"])
            for row, image_id in enumerate(shard.image_ids):
                if image_id in annotated_ids:
                    _add_image(result, shard, row, annotations.images[image_id], class_source)
    for image_id in sorted(annotated_ids - set(result.samples) - set(result.skipped)):
        result.skipped[image_id] = "not in the region shards: extract it with --boxes first"
    if not result.samples:
        examples = "; ".join(f"{key}: {value}" for key, value in list(result.skipped.items())[:3])
        raise RelationDataError(f"no annotated image can be used for training ({examples}); extract the images with "
                                "`cmsei-prep extract --boxes ANNOTATIONS` into the dataset folder")
    return result


def _add_image(result: TrainingSet, shard: RegionShard, row: int, annotated: AnnotatedImage, class_source: str) -> None:
    image_id = shard.image_ids[row]
    if shard.status[row] != "ok":
        result.skipped[image_id] = f"region extraction failed: {shard.failure_reasons[row]}"
        return
    regions = shard[row]
    count = annotated.boxes.shape[0]
    if regions.boxes.shape[0] != count:
        result.skipped[image_id] = (f"the annotation has {count} objects but the region shard has "
                                    f"{regions.boxes.shape[0]} regions; extract with --boxes ANNOTATIONS")
        return
    height, width = regions.image_size
    clipped = np.clip(annotated.boxes, 0, [width, height, width, height])
    if count and np.abs(clipped - regions.boxes).max() > BOX_TOLERANCE:
        worst = int(np.abs(clipped - regions.boxes).max(axis=1).argmax())
        result.skipped[image_id] = (f"region {worst} has box {regions.boxes[worst].tolist()} but the annotation has "
                                    f"{annotated.boxes[worst].tolist()}; extract with --boxes ANNOTATIONS")
        return

    if class_source == "annotations":
        object_ids = _label_ids(annotated.labels, result.object_names, image_id)
    else:
        object_ids = np.asarray(regions.object_ids, dtype=np.int64)
    result.samples[image_id] = {
        "features": regions.features,
        "object_ids": object_ids,
        "boxes": regions.boxes,
        "image_size": regions.image_size,
        "relations": annotated.relations,
    }


def _label_ids(labels: list[str], object_names: list[str], image_id: str) -> np.ndarray:
    index = {name: position for position, name in enumerate(object_names)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise RelationDataError(
            f"image {image_id!r}: labels {unknown[:5]} are not object class names of the region shards "
            f"(e.g. {object_names[:3]}); use --classes detector"
        )
    return np.array([index[label] for label in labels], dtype=np.int64)


def split_images(image_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split image ids into training and held-out ids, reproducibly for a seed.

    The ids are sorted, shuffled with ``seed`` and the first ``round(val_fraction * n)``
    are held out, at least one when the fraction is positive and there are two or more.

    Raises:
        RelationDataError: when the fraction is outside [0, 1) or nothing is left to train on.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise RelationDataError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    ordered = sorted(image_ids)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    held_out = int(round(val_fraction * len(ordered)))
    if val_fraction > 0 and len(ordered) >= 2:
        held_out = max(1, held_out)
    held_out = min(held_out, len(ordered) - 1)
    if not ordered:
        raise RelationDataError("no images to split")
    val = sorted(ordered[index] for index in permutation[:held_out])
    train = sorted(ordered[index] for index in permutation[held_out:])
    return train, val


def object_names_digest(names: Sequence[str]) -> str:
    """Return the sha256 of the class names, one per line, to compare class spaces."""
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()
