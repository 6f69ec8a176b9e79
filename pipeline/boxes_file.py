"""Readers for given boxes (``extract --boxes``): JSON lines or a synth ``annotations.json``.

Both map an image id to a list of [x1, y1, x2, y2] boxes in original-image pixels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_boxes_file(path: Path) -> dict[str, list[list[float]]]:
    """Read a boxes file.

    Accepted layouts: JSON lines with one ``{"image": ID, "boxes": [[x1, y1, x2, y2], ...]}``
    per line, or a JSON object with ``images[].image`` and ``images[].objects[].box`` (the
    ``annotations.json`` written by ``cmsei-prep synth``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed JSON or a box that is not four finite numbers; the message
            names the line or image.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "images" in whole:
        return _read_annotations(path, whole)
    return _read_json_lines(path, text)


def _read_annotations(path: Path, data: dict) -> dict[str, list[list[float]]]:
    boxes = {}
    for position, image in enumerate(data.get("images", [])):
        if "image" not in image:
            raise ValueError(f"{path}: images[{position}] has no 'image' field")
        image_boxes = [obj.get("box") for obj in image.get("objects", [])]
        boxes[image["image"]] = [_check_box(path, f"images[{position}]", box) for box in image_boxes]
    return boxes


def _read_json_lines(path: Path, text: str) -> dict[str, list[list[float]]]:
    boxes: dict[str, list[list[float]]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not valid JSON: {error.msg}") from None
        if not isinstance(record, dict) or "image" not in record or "boxes" not in record:
            raise ValueError(f"{path}: line {number} needs the fields 'image' and 'boxes'")
        boxes[str(record["image"])] = [_check_box(path, f"line {number}", box) for box in record["boxes"]]
    return boxes


def _check_box(path: Path, where: str, box: object) -> list[float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"{path}: {where}: a box must be [x1, y1, x2, y2], got {box!r}")
    try:
        values = [float(value) for value in box]
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {where}: box {box!r} has a non-numeric coordinate") from None
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"{path}: {where}: box {box!r} has a non-finite coordinate")
    return values
