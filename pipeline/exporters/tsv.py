"""Write region shards as a bottom-up-attention (6-column) or LXMERT (10-column) TSV.

Shapes: R regions of one image, D feature size.

Both layouts are documented in :mod:`pipeline.importers.butd_tsv` and
:mod:`pipeline.importers.lxmert_tsv`: one image per line, tab-separated, no header, arrays
as base64 of raw little-endian bytes. Features are written as float32 whatever the
stored dtype, ids as int64. Lines end in LF. The public files store ids without an
extension, so a trailing ``image_ext`` is removed: ``COCO_train2014_000000132417.jpg`` is
written as ``COCO_train2014_000000132417``. ``cmsei-prep import`` with the same
``--image-ext`` appends it back. The 6-column layout has no labels, so they are dropped.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.exporters import RegionReader, check_outputs_free
from pipeline.region_shards import ImageRegions

logger = logging.getLogger(__name__)

def export_tsv(
    reader: RegionReader,
    out: Path,
    layout: str,
    split: str,
    image_ids: list[str],
    image_ext: str,
    has_boxes: bool,
    overwrite: bool,
) -> tuple[list[Path], dict[str, Any]]:
    """Write ``image_ids`` as one TSV file in ``layout``.

    Args:
        reader: open region reader of the dataset.
        out: a path ending in ``.tsv``, or a folder that receives ``{split}.tsv``.
        layout: ``butd-tsv`` or ``lxmert-tsv``.
        split: names the file when ``out`` is a folder.
        image_ids: ok image ids in output order.
        image_ext: suffix removed from the end of each id, e.g. ``.jpg``; ``""`` keeps ids.
        has_boxes: must be True; both layouts need boxes and image sizes.
        overwrite: replace an existing file.

    Returns:
        The written path and ``{"layout": layout}``.

    Raises:
        ValueError: a dataset without boxes, an id holding a tab or line break, two ids
            that become equal without ``image_ext``, or an existing file without ``overwrite``.
    """
    if not has_boxes:
        raise ValueError(
            "the dataset was imported without boxes (has_boxes false) and the TSV layouts need boxes and image "
            "sizes; export it with --format scan instead"
        )
    path = out if out.suffix == ".tsv" else out / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    check_outputs_free([path], overwrite)
    tsv_ids = _tsv_ids(image_ids, image_ext)

    encode = _butd_line if layout == "butd-tsv" else _lxmert_line
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        for tsv_id, regions in zip(tsv_ids, reader.iter(image_ids)):
            handle.write(b"\t".join(encode(tsv_id, regions)) + b"\n")
    return [path], {"layout": layout}


def _tsv_ids(image_ids: list[str], image_ext: str) -> list[bytes]:
    seen: dict[str, str] = {}
    result = []
    for image_id in image_ids:
        if any(character in image_id for character in "\t\r\n"):
            raise ValueError(f"image id {image_id!r} contains a tab or line break, which a TSV row cannot hold")
        tsv_id = image_id[: -len(image_ext)] if image_ext and image_id.endswith(image_ext) else image_id
        if tsv_id in seen:
            raise ValueError(
                f"image ids {seen[tsv_id]!r} and {image_id!r} both become {tsv_id!r} without {image_ext}; "
                "pass --image-ext '' to keep ids unchanged"
            )
        seen[tsv_id] = image_id
        result.append(tsv_id.encode("utf-8"))
    return result


def _encode(array: np.ndarray, dtype: str) -> bytes:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes())


def _butd_line(tsv_id: bytes, regions: ImageRegions) -> list[bytes]:
    height, width = regions.image_size
    return [
        tsv_id,
        str(width).encode(),
        str(height).encode(),
        str(regions.boxes.shape[0]).encode(),
        _encode(regions.boxes, "<f4"),
        _encode(regions.features, "<f4"),
    ]


def _lxmert_line(tsv_id: bytes, regions: ImageRegions) -> list[bytes]:
    height, width = regions.image_size
    return [
        tsv_id,
        str(height).encode(),
        str(width).encode(),
        _encode(regions.object_ids, "<i8"),
        _encode(regions.object_scores, "<f4"),
        _encode(regions.attribute_ids, "<i8"),
        _encode(regions.attribute_scores, "<f4"),
        str(regions.boxes.shape[0]).encode(),
        _encode(regions.boxes, "<f4"),
        _encode(regions.features, "<f4"),
    ]
