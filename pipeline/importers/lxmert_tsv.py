"""The 10-column LXMERT TSV of bottom-up-attention features with labels.

Shapes: R regions of one image (``num_boxes``), D feature size.

One image per line, tab-separated, no header: ``img_id, img_h, img_w, objects_id,
objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features``. Height comes before
width. The five array fields are base64 of raw little-endian bytes: ``objects_id`` and
``attrs_id`` int64 (R,), ``objects_conf`` and ``attrs_conf`` float32 (R,), ``boxes``
float32 (R, 4) x1 y1 x2 y2 in pixels, ``features`` float32 (R, D). The ids are 0-based
indices into the Visual Genome vocabularies of bottom-up-attention (1,600 objects and
400 attributes, no background entry).
"""

from __future__ import annotations

import logging

from pipeline.importers import ImportedRegions
from pipeline.importers.butd_tsv import TsvReader, decode_array, parse_count, parse_int

logger = logging.getLogger(__name__)

LXMERT_FIELDS = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
)


class LxmertTsvReader(TsvReader):
    """Reader of the 10-column LXMERT TSV (see the module docstring)."""

    format_name = "lxmert-tsv"
    fields = LXMERT_FIELDS

    def parse(self, values: dict[str, bytes]) -> ImportedRegions:
        height = parse_int(values["img_h"], "img_h")
        width = parse_int(values["img_w"], "img_w")
        count = parse_count(values["num_boxes"])
        return ImportedRegions(
            image_size=(height, width),
            boxes=decode_array(values["boxes"], "boxes", "<f4", count, 4),
            features=decode_array(values["features"], "features", "<f4", count, self.feature_dim),
            object_ids=decode_array(values["objects_id"], "objects_id", "<i8", count),
            object_scores=decode_array(values["objects_conf"], "objects_conf", "<f4", count),
            attribute_ids=decode_array(values["attrs_id"], "attrs_id", "<i8", count),
            attribute_scores=decode_array(values["attrs_conf"], "attrs_conf", "<f4", count),
        )
