"""Read the custom-image output of Scene-Graph-Benchmark (KaihuaTang/Scene-Graph-Benchmark.pytorch).

Its ``tools/relation_test_net.py`` with ``TEST.CUSTUM_EVAL True`` writes two files to
``DETECTED_SGG_DIR``:

- ``custom_data_info.json``: ``idx_to_files`` (the image paths, in prediction order),
  ``ind_to_classes`` and ``ind_to_predicates`` (names; index 0 is the background);
- ``custom_prediction.json``: an object keyed by the image index as a string
  (``"0"``, ``"1"``, ...). Each value contains ``bbox`` (B, 4) x1, y1, x2, y2,
  ``bbox_labels``, ``bbox_scores``, ``rel_pairs`` (E, 2) rows of ``bbox``,
  ``rel_labels`` (E,) predicate indices 1..50 for VG150, ``rel_scores`` (E,) and
  optionally ``rel_all_scores``.

The boxes are in the frame of the test transform's resize (shorter side
``INPUT.MIN_SIZE_TEST``, default 600; longer side at most ``INPUT.MAX_SIZE_TEST``,
default 1000), not in original pixels, so they carry that frame along and
``graphs.imported`` scales them back per image.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from graphs.imported import ImportedSceneGraph, SceneGraphImport, SceneGraphImportError, field_array, match_image_keys
from graphs.predicates import with_background
from pipeline.manifest import file_sha256

logger = logging.getLogger(__name__)

DEFAULT_MIN_SIZE = 600
DEFAULT_MAX_SIZE = 1000


def read_sgb_predictions(
    prediction_path: str | os.PathLike,
    info_path: str | os.PathLike,
    image_ids: Sequence[str],
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int = DEFAULT_MAX_SIZE,
) -> SceneGraphImport:
    """Read ``custom_prediction.json`` and ``custom_data_info.json`` for our images.

    Args:
        prediction_path: ``custom_prediction.json``.
        info_path: ``custom_data_info.json`` of the same run.
        image_ids: the dataset's image ids; files are matched to them by path
            (``graphs.imported.match_image_keys``).
        min_size, max_size: the test resize of the run, ``INPUT.MIN_SIZE_TEST`` and
            ``INPUT.MAX_SIZE_TEST``.

    Returns:
        The graphs by image id, with the predicate names of ``ind_to_predicates``.

    Raises:
        FileNotFoundError: when a file does not exist.
        SceneGraphImportError: when a file is not valid JSON or lacks a field, or when a
            prediction's arrays disagree. The message names the file, image and field.
    """
    if not 0 < min_size <= max_size:
        raise SceneGraphImportError(f"--sgb-min-size {min_size} and --sgb-max-size {max_size} must satisfy 0 < min <= max")
    info = _load_json(info_path)
    predictions = _load_json(prediction_path)
    files = _field(info, "idx_to_files", list, info_path)
    predicates = _field(info, "ind_to_predicates", list, info_path)
    if len(predicates) < 2:
        raise SceneGraphImportError(f"{info_path}: ind_to_predicates lists {len(predicates)} names, expected background and at least one predicate")
    if not isinstance(predictions, dict):
        raise SceneGraphImportError(f"{prediction_path}: expected a JSON object keyed by image index, got {type(predictions).__name__}")

    matched, unmatched = match_image_keys(files, image_ids)
    graphs: dict[str, ImportedSceneGraph] = {}
    for index, path in enumerate(files):
        image_id = matched.get(path)
        if image_id is None:
            continue
        if image_id in graphs:
            logger.warning("%s: %s matches image %r again; the first prediction is kept", info_path, path, image_id)
            unmatched.append(str(path))
            continue
        record = predictions.get(str(index))
        if record is None:
            raise SceneGraphImportError(f"{prediction_path} has no prediction \"{index}\" for {path} listed in {info_path}")
        graphs[image_id] = _parse_record(record, f"{prediction_path}: image \"{index}\" ({path})", len(predicates), (min_size, max_size))

    source = {
        "format": "sgb-custom",
        "prediction_sha256": file_sha256(prediction_path),
        "info_sha256": file_sha256(info_path),
        "min_size": min_size,
        "max_size": max_size,
    }
    names = with_background(str(name) for name in predicates[1:])
    logger.info("read %d Scene-Graph-Benchmark graphs; %d files match no image of the dataset", len(graphs), len(unmatched))
    return SceneGraphImport(source, names, graphs, unmatched)


def _parse_record(record: Any, where: str, num_predicates: int, frame: tuple[int, int]) -> ImportedSceneGraph:
    if not isinstance(record, dict):
        raise SceneGraphImportError(f"{where}: expected an object with bbox and rel_pairs")
    boxes = field_array(record, "bbox", where, np.float64, (-1, 4))
    pairs = field_array(record, "rel_pairs", where, np.int64, (-1, 2))
    labels = field_array(record, "rel_labels", where, np.int64, (-1,))
    scores = field_array(record, "rel_scores", where, np.float32, (-1,))
    if not (pairs.shape[0] == labels.shape[0] == scores.shape[0]):
        raise SceneGraphImportError(
            f"{where}: rel_pairs has {pairs.shape[0]} rows, rel_labels {labels.shape[0]}, rel_scores {scores.shape[0]}; "
            "they must have one row per relation"
        )
    if pairs.size and (pairs.min() < 0 or pairs.max() >= boxes.shape[0]):
        raise SceneGraphImportError(f"{where}: rel_pairs refers to box {pairs.max()}, but bbox has {boxes.shape[0]} boxes")
    if labels.size and (labels.min() < 1 or labels.max() >= num_predicates):
        raise SceneGraphImportError(
            f"{where}: rel_labels must lie in 1..{num_predicates - 1} (ind_to_predicates), got {labels.min()}..{labels.max()}"
        )
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise SceneGraphImportError(f"{where}: bbox or rel_scores contains NaN or infinity")
    return ImportedSceneGraph(boxes, pairs[:, 0], pairs[:, 1], labels, scores, resized_frame=frame)


def _load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene-graph file not found: {path}")
    # NOTE: the whole file is parsed at once. With rel_all_scores, custom_prediction.json
    # takes about 0.5 KB per relation (an estimate), so large runs need much memory here.
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SceneGraphImportError(f"{path} is not valid JSON: {error}") from None


def _field(data: Any, name: str, kind: type, path: str | os.PathLike) -> Any:
    if not isinstance(data, dict) or not isinstance(data.get(name), kind):
        raise SceneGraphImportError(f"{path} has no {kind.__name__} field {name!r}; expected Scene-Graph-Benchmark's custom_data_info.json")
    return data[name]
