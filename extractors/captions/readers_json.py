"""Readers for the JSON caption formats: COCO captions, Karpathy split files and JSON lines.

Each reader takes the already decoded file text (or parsed JSON) and returns a
`CaptionTable`. Positions in error messages are JSON paths such as
`annotations[12].caption`, or line numbers for JSON lines.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from extractors.captions.records import CaptionFormatError, CaptionTable, TableBuilder, split_lines

logger = logging.getLogger(__name__)


def parse_json(text: str, path: str | os.PathLike, expected: str) -> Any:
    """Parse a whole JSON document, turning a syntax error into a CaptionFormatError.

    Args:
        text: the decoded file.
        path: the file, for messages.
        expected: the format the caller expects, for messages ("COCO captions JSON").

    Raises:
        CaptionFormatError: the text is not valid JSON. The message gives line, column and
            character offset.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CaptionFormatError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno} (character {error.pos}): "
            f"{error.msg}; repair the file, or pass format= if it is not a {expected} file"
        ) from error


def _require(container: Any, key: str, where: str, path: str | os.PathLike, kind: type | tuple[type, ...]) -> Any:
    """Return container[key] after checking that it exists and has the expected type."""
    if not isinstance(container, dict):
        raise CaptionFormatError(f"{path}: {where} must be a JSON object, got {type(container).__name__}")
    if key not in container:
        raise CaptionFormatError(f"{path}: {where} has no field {key!r}; add it or check the file format")
    value = container[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CaptionFormatError(
            f"{path}: {where}.{key} must be {_type_names(kind)}, got {type(value).__name__} {str(value)[:60]!r}"
        )
    return value


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def read_coco(data: Any, path: str | os.PathLike, max_chars: int) -> CaptionTable:
    """Read an official COCO captions file (`captions_train2014.json` and the like).

    The image id of each caption is the `file_name` of its image, because the integer
    `image_id` of COCO is not unique across datasets. Annotations keep their file order;
    `caption_index` counts the captions of one image in that order. Extra top-level keys
    ("info", "licenses", "type") are ignored.

    Raises:
        CaptionFormatError: `images` or `annotations` is missing or not a list, or an entry
            lacks `id`, `file_name`, `image_id` or `caption`.
    """
    builder = TableBuilder(path, "coco", max_chars)
    images = _require(data, "images", "the top-level object", path, list)
    annotations = _require(data, "annotations", "the top-level object", path, list)

    file_names: dict[int, str] = {}
    for position, image in enumerate(images):
        where = f"images[{position}]"
        image_id = _require(image, "id", where, path, (int, str))
        file_names.setdefault(image_id, _require(image, "file_name", where, path, str))

    per_image: dict[int, int] = {}
    for position, annotation in enumerate(annotations):
        where = f"annotations[{position}]"
        if isinstance(annotation, dict) and "caption" not in annotation and "image_id" in annotation:
            raise CaptionFormatError(
                f"{path}: {where} has no field 'caption'; this looks like a COCO instances or keypoints file, "
                "pass a captions_*.json file instead"
            )
        image_id = _require(annotation, "image_id", where, path, (int, str))
        caption = _require(annotation, "caption", where, path, str)
        caption_index = per_image.get(image_id, 0)
        per_image[image_id] = caption_index + 1

        file_name = file_names.get(image_id)
        if file_name is None:
            builder.skip(str(image_id), caption_index, f"{where}.image_id {image_id} is not listed in images[]")
            continue
        builder.add(file_name, caption_index, caption)

    builder.note("image ids are the images[].file_name values; integer image_id values were mapped through them")
    return builder.finish()


def read_karpathy(data: Any, path: str | os.PathLike, max_chars: int) -> CaptionTable:
    """Read a Karpathy split file (`dataset_coco.json`, `dataset_flickr30k.json`, `dataset_flickr8k.json`).

    The image id is `filepath/filename` when the image has a non-empty `filepath` (the COCO
    file, where it names train2014 or val2014), else `filename`. The split comes from each
    image's `split` field; "restval" stays its own split name.

    Raises:
        CaptionFormatError: `images` is missing, or an image lacks `filename` or
            `sentences`, or a sentence lacks `raw`.
    """
    builder = TableBuilder(path, "karpathy", max_chars)
    images = _require(data, "images", "the top-level object", path, list)

    for position, image in enumerate(images):
        where = f"images[{position}]"
        filename = _require(image, "filename", where, path, str)
        filepath = image.get("filepath") or ""
        if not isinstance(filepath, str):
            raise CaptionFormatError(f"{path}: {where}.filepath must be a string, got {filepath!r}")
        image_id = f"{filepath.rstrip('/')}/{filename}" if filepath else filename
        split = image.get("split")
        if split is not None and not isinstance(split, str):
            raise CaptionFormatError(f"{path}: {where}.split must be a string, got {split!r}")

        sentences = _require(image, "sentences", where, path, list)
        for caption_index, sentence in enumerate(sentences):
            raw = _require(sentence, "raw", f"{where}.sentences[{caption_index}]", path, str)
            builder.add(image_id, caption_index, raw, split=split)

    return builder.finish()


def read_jsonl(
    text: str,
    path: str | os.PathLike,
    max_chars: int,
    image_column: str = "image",
    caption_column: str = "caption",
) -> CaptionTable:
    """Read JSON lines with one image per line: `{"image": ..., "captions": [...]}`.

    A line may carry a single caption under `caption_column` instead of a "captions" list.
    Other keys are ignored, and so are blank lines. Integer image ids become strings.

    Raises:
        CaptionFormatError: a line is not a JSON object, or lacks the image key or captions,
            or a caption is not a string. The message gives the line number.
    """
    builder = TableBuilder(path, "jsonl", max_chars)
    name = Path(path).name

    for line_number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        where = f"line {line_number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise CaptionFormatError(
                f"{path}: {where} column {error.colno} is not valid JSON: {error.msg}; each line of {name} "
                "must be one JSON object"
            ) from error
        if not isinstance(entry, dict):
            raise CaptionFormatError(f"{path}: {where} must be a JSON object, got {type(entry).__name__}")
        if image_column not in entry:
            raise CaptionFormatError(
                f"{path}: {where} has no field {image_column!r}; pass image_column= with the key that contains "
                f"the image id (keys found: {sorted(entry)})"
            )
        image_id = _require(entry, image_column, where, path, (str, int))

        for caption_index, caption in enumerate(_line_captions(entry, where, path, caption_column)):
            builder.add(str(image_id), caption_index, caption, source_line=line_number)

    return builder.finish()


def _line_captions(entry: dict, where: str, path: str | os.PathLike, caption_column: str) -> list[str]:
    """Return the captions of one JSON line, from "captions" (a list) or `caption_column` (a string)."""
    if "captions" in entry:
        captions = _require(entry, "captions", where, path, list)
        for position, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise CaptionFormatError(
                    f"{path}: {where} captions[{position}] must be a string, got {type(caption).__name__}"
                )
        return captions

    if caption_column in entry:
        return [_require(entry, caption_column, where, path, str)]

    raise CaptionFormatError(
        f"{path}: {where} has neither a 'captions' list nor a {caption_column!r} field; pass caption_column= "
        f"with the key that contains the caption (keys found: {sorted(entry)})"
    )
