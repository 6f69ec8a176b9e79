"""Read the ``predictions.tsv`` of VinVL's scene_graph_benchmark (microsoft/scene_graph_benchmark).

With ``TEST.SAVE_RESULTS_TO_TSV`` its ``convert_predictions_to_tsv`` writes one line per
image: the image key, a tab, and a JSON object with

- ``objects``: a list of ``{"rect": [x1, y1, x2, y2], "class": name, "conf": score, ...}``,
  boxes already resized to the original image size;
- ``relations``: a list of ``{"subj_id": i, "obj_id": j, "class": predicate name,
  "conf": score}`` with i and j indices into ``objects``, or null when the model has
  no relation head. A relation without ``conf`` gets the score 1.

Predicates are names, so their indices come from the labelmap JSON of the run
(``predicate_to_idx``, 1-based) when given, else from the sorted names in the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from graphs.imported import ImportedSceneGraph, SceneGraphImport, SceneGraphImportError, field_array, match_image_keys
from graphs.predicates import BACKGROUND, with_background
from pipeline.manifest import file_sha256

logger = logging.getLogger(__name__)

# Names that the labelmap uses for "no relation"; they take index 0.
NO_RELATION_NAMES = {BACKGROUND, "__no_relation__"}


def read_vinvl_predictions(
    tsv_path: str | os.PathLike,
    image_ids: Sequence[str],
    *,
    labelmap_path: str | os.PathLike | None = None,
) -> SceneGraphImport:
    """Read a VinVL ``predictions.tsv`` for our images.

    Args:
        tsv_path: the TSV file.
        image_ids: the dataset's image ids; keys are matched to them by
            ``graphs.imported.match_image_keys``.
        labelmap_path: optional labelmap JSON with ``predicate_to_idx``.

    Returns:
        The graphs by image id and the predicate names.

    Raises:
        FileNotFoundError: when a file does not exist.
        SceneGraphImportError: on a line without a tab, invalid JSON or a missing field.
            Also on an object index out of range or a predicate missing from the
            labelmap. The message names the file and line.
    """
    tsv_path = Path(tsv_path)
    if not tsv_path.is_file():
        raise FileNotFoundError(f"VinVL predictions file not found: {tsv_path}")
    records = list(_read_lines(tsv_path))
    predicate_index = _predicate_index(records, labelmap_path)
    names = [""] * (max(predicate_index.values(), default=0) + 1)
    for name, index in predicate_index.items():
        names[index] = name
    if any(not name for name in names[1:]):
        raise SceneGraphImportError(f"{labelmap_path}: predicate_to_idx must number the predicates 1..n without gaps")

    matched, unmatched = match_image_keys([key for key, _, _ in records], image_ids)
    graphs: dict[str, ImportedSceneGraph] = {}
    for key, line, record in records:
        image_id = matched.get(key)
        if image_id is None:
            continue
        if image_id in graphs:
            logger.warning("%s: line %d: key %r matches image %r again; the first line is kept", tsv_path, line, key, image_id)
            unmatched.append(key)
            continue
        graphs[image_id] = _parse_record(record, f"{tsv_path}: line {line}", predicate_index)

    source = {"format": "vinvl-tsv", "tsv_sha256": file_sha256(tsv_path),
              "labelmap_sha256": file_sha256(labelmap_path) if labelmap_path else None}
    logger.info("read %d VinVL graphs; %d keys match no image of the dataset", len(graphs), len(unmatched))
    return SceneGraphImport(source, with_background(names[1:]) if len(names) > 1 else (BACKGROUND,), graphs, unmatched)


def _read_lines(path: Path) -> Iterator[tuple[str, int, dict]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            key, tab, payload = line.rstrip("\n").partition("\t")
            if not tab:
                raise SceneGraphImportError(f"{path}: line {number} has no tab; expected 'image key<TAB>JSON'")
            try:
                record = json.loads(payload)
            except json.JSONDecodeError as error:
                raise SceneGraphImportError(f"{path}: line {number}: the second field is not valid JSON: {error.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("objects"), list):
                raise SceneGraphImportError(f"{path}: line {number}: the JSON object has no list 'objects'")
            yield key, number, record


def _predicate_index(records: list[tuple[str, int, dict]], labelmap_path: str | os.PathLike | None) -> dict[str, int]:
    if labelmap_path is None:
        seen = {str(relation.get("class")) for _, _, record in records for relation in record.get("relations") or []}
        return {name: index for index, name in enumerate(sorted(seen - NO_RELATION_NAMES), start=1)}

    path = Path(labelmap_path)
    if not path.is_file():
        raise FileNotFoundError(f"VinVL labelmap not found: {path}")
    try:
        labelmap = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SceneGraphImportError(f"{path} is not valid JSON: {error.msg}") from None
    mapping = labelmap.get("predicate_to_idx") if isinstance(labelmap, dict) else None
    if not isinstance(mapping, dict) or not all(isinstance(value, int) and value >= 1 for value in mapping.values()):
        raise SceneGraphImportError(f"{path} has no predicate_to_idx object of 1-based integer indices")
    return {str(name): int(index) for name, index in mapping.items() if name not in NO_RELATION_NAMES}


def _parse_record(record: dict, where: str, predicate_index: dict[str, int]) -> ImportedSceneGraph:
    objects = record["objects"]
    for position, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise SceneGraphImportError(f"{where}: objects[{position}] is not an object")
    boxes = field_array({"rect": [obj.get("rect") for obj in objects]}, "rect", f"{where}: objects", np.float64, (-1, 4)) \
        if objects else np.zeros((0, 4))
    relations = record.get("relations") or []
    subject, object_, predicate, score = [], [], [], []
    for position, relation in enumerate(relations):
        subject.append(_object_index(relation, "subj_id", len(objects), f"{where}: relations[{position}]"))
        object_.append(_object_index(relation, "obj_id", len(objects), f"{where}: relations[{position}]"))
        name = str(relation.get("class"))
        if name not in predicate_index:
            raise SceneGraphImportError(f"{where}: relations[{position}] has predicate {name!r}, which the labelmap does not list")
        predicate.append(predicate_index[name])
        score.append(_score(relation, f"{where}: relations[{position}]"))
    if not np.isfinite(boxes).all():
        raise SceneGraphImportError(f"{where}: an object's rect contains NaN or infinity")
    return ImportedSceneGraph(
        boxes=boxes,
        subject=np.asarray(subject, dtype=np.int64),
        object=np.asarray(object_, dtype=np.int64),
        predicate=np.asarray(predicate, dtype=np.int64),
        score=np.asarray(score, dtype=np.float32),
    )


def _object_index(relation: Any, name: str, count: int, where: str) -> int:
    value = relation.get(name) if isinstance(relation, dict) else None
    if not isinstance(value, int) or not 0 <= value < count:
        raise SceneGraphImportError(f"{where}: {name} is {value!r}, expected an index into the {count} objects")
    return value


def _score(relation: dict, where: str) -> float:
    value = relation.get("conf", 1.0)
    if not isinstance(value, (int, float)) or not np.isfinite(value):
        raise SceneGraphImportError(f"{where}: conf is {value!r}, expected a finite number")
    return float(value)
