"""The 6-column bottom-up-attention TSV, and the TSV machinery the LXMERT layout shares.

Shapes: R regions of one image (``num_boxes``), D feature size.

The original Caffe release of bottom-up-attention writes one image per line,
tab-separated, without a header: ``image_id, image_w, image_h, num_boxes, boxes,
features``. Width comes before height. ``boxes`` is base64 of raw little-endian float32
(R, 4), x1 y1 x2 y2 in pixels of the original image, and ``features`` base64 of float32
(R, D). The layout has no labels, so object and attribute ids are stored as -1 with
score 0.

Lines are split on tabs without the ``csv`` module, so a row of any length reads (a
36 x 2048 row is about 400 KB, beyond csv's default field limit of 131072 characters).
Lines may end in LF or CRLF; Python's csv writer, which wrote the public files, ends
them in CRLF.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.importers import (
    ImportedRegions,
    RowError,
    SourceIndex,
    SourceReader,
    SourceRow,
    UnreadableRow,
    unlabelled_regions,
)

logger = logging.getLogger(__name__)

BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")

FEATURE_DIM_PROBE_ROWS = 16
"""Rows whose field sizes vote on the feature size when ``--feature-dim`` is not given."""


class TsvReader(SourceReader):
    """Index TSV files by line offset and decode one line on request.

    Subclasses set ``fields`` (column names in order) and implement :meth:`parse`.

    Args:
        paths: one or more TSV files, read in the given order.
        feature_dim: D; inferred from the first rows when None.
    """

    fields: tuple[str, ...] = ()

    def __init__(self, paths: list[Path], feature_dim: int | None = None) -> None:
        super().__init__()
        self.paths = [Path(path) for path in paths]
        self.feature_dim = feature_dim
        self._handles: dict[int, BinaryIO] = {}

    def index(self) -> SourceIndex:
        """Read every line once for its image id, byte offset and the files' sha256."""
        rows: list[SourceRow] = []
        unreadable: list[UnreadableRow] = []
        files = []
        probes: list[int] = []
        for file_index, path in enumerate(self.paths):
            digest = self._index_file(file_index, path, rows, unreadable, probes)
            files.append({"name": path.name, "sha256": digest})

        if self.feature_dim is None:
            self.feature_dim = self._vote_feature_dim(probes)
        logger.info("%s: %d rows with an image id, %d without, feature size %d",
                    self.format_name, len(rows), len(unreadable), self.feature_dim)
        return SourceIndex(rows, unreadable, self.feature_dim, has_boxes=True, files=files)

    def _index_file(
        self, file_index: int, path: Path, rows: list[SourceRow], unreadable: list[UnreadableRow], probes: list[int]
    ) -> str:
        digest = hashlib.sha256()
        offset = 0
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                digest.update(line)
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue

                where = self._where(path, number)
                position = len(rows) + len(unreadable)
                raw_id, problem = _leading_id(line)
                if problem:
                    unreadable.append(UnreadableRow(f"{path.name}:{number}", path, f"{problem}: {where}: {_ID_PROBLEMS[problem]}"))
                    continue

                rows.append(SourceRow(raw_id, path, where, (file_index, start, len(line)), position))
                if len(probes) < FEATURE_DIM_PROBE_ROWS:
                    probe = self._probe_feature_dim(line)
                    if probe:
                        probes.append(probe)
        return digest.hexdigest()

    def _where(self, path: Path, number: int) -> str:
        return f"line {number}" if len(self.paths) == 1 else f"{path.name} line {number}"

    def _probe_feature_dim(self, line: bytes) -> int | None:
        """Return D implied by one line's field sizes, or None when they are inconsistent."""
        values = line.rstrip(b"\r\n").split(b"\t")
        if len(values) != len(self.fields):
            return None
        by_name = dict(zip(self.fields, values))
        try:
            count = int(by_name["num_boxes"])
        except ValueError:
            return None
        box_bytes = _decoded_size(by_name["boxes"])
        feature_bytes = _decoded_size(by_name["features"])
        if count <= 0 or box_bytes != count * 16 or feature_bytes is None or feature_bytes % (count * 4):
            return None
        return feature_bytes // (count * 4)

    def _vote_feature_dim(self, probes: list[int]) -> int:
        if not probes:
            names = ", ".join(str(path) for path in self.paths)
            raise ValueError(
                f"cannot infer the feature size of {names}: none of its first {FEATURE_DIM_PROBE_ROWS} rows has "
                "consistent num_boxes, boxes and features fields; pass --feature-dim, or check --format"
            )
        value, votes = Counter(probes).most_common(1)[0]
        if votes < len(probes):
            logger.warning("rows disagree on the feature size %s; using %d", dict(Counter(probes)), value)
        return value

    def read(self, row: SourceRow) -> ImportedRegions:
        """Decode one line (see :meth:`SourceReader.read`)."""
        file_index, offset, length = row.key
        handle = self._handle(file_index)
        handle.seek(offset)
        line = handle.read(length)
        self.bytes_read += len(line)
        if len(line) != length:
            raise RowError("truncated", f"the file ends after {len(line)} of the row's {length} bytes; was it changed during the import?")

        values = line.rstrip(b"\r\n").split(b"\t")
        if len(values) != len(self.fields):
            raise RowError(
                "field-count", f"{len(values)} tab-separated fields, expected {len(self.fields)} for {self.format_name}"
            )
        return self.parse(dict(zip(self.fields, values)))

    def parse(self, values: dict[str, bytes]) -> ImportedRegions:
        """Turn the fields of one line, keyed by column name, into regions."""
        raise NotImplementedError

    def _handle(self, file_index: int) -> BinaryIO:
        if file_index not in self._handles:
            self._handles[file_index] = open(self.paths[file_index], "rb")
        return self._handles[file_index]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


class ButdTsvReader(TsvReader):
    """Reader of the 6-column bottom-up-attention TSV (see the module docstring)."""

    format_name = "butd-tsv"
    fields = BUTD_FIELDS

    def parse(self, values: dict[str, bytes]) -> ImportedRegions:
        width = parse_int(values["image_w"], "image_w")
        height = parse_int(values["image_h"], "image_h")
        count = parse_count(values["num_boxes"])
        boxes = decode_array(values["boxes"], "boxes", "<f4", count, 4)
        features = decode_array(values["features"], "features", "<f4", count, self.feature_dim)
        return unlabelled_regions((height, width), boxes, features)


_ID_PROBLEMS = {
    "missing-id": "the row has no image id in its first field",
    "invalid-id": "the image id is not valid UTF-8",
}


def _leading_id(line: bytes) -> tuple[str, str | None]:
    """Return (raw id, problem code or None) from the first tab-separated field."""
    tab = line.find(b"\t")
    raw = line[:tab] if tab >= 0 else line.rstrip(b"\r\n")
    try:
        raw_id = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "", "invalid-id"
    return raw_id, None if raw_id else "missing-id"


def _decoded_size(field: bytes) -> int | None:
    """Return the byte count a base64 field decodes to, or None when its length is invalid."""
    if len(field) % 4:
        return None
    return len(field) // 4 * 3 - (len(field) - len(field.rstrip(b"=")))


def parse_int(value: bytes, name: str) -> int:
    """Parse an integer field.

    Raises:
        RowError: ``invalid-number`` naming the field and its text.
    """
    try:
        return int(value)
    except ValueError:
        raise RowError("invalid-number", f"{name} {value[:40].decode('utf-8', 'replace')!r} is not an integer") from None


def parse_count(value: bytes) -> int:
    """Parse ``num_boxes``; raises RowError for text or a negative count."""
    count = parse_int(value, "num_boxes")
    if count < 0:
        raise RowError("invalid-number", f"num_boxes is {count}, expected 0 or more")
    return count


def decode_base64(value: bytes, name: str) -> bytes:
    """Decode a strict base64 field.

    Raises:
        RowError: ``invalid-base64`` for a character outside the alphabet or wrong padding.
    """
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RowError("invalid-base64", f"field {name} is not valid base64 ({error})") from None


def decode_array(value: bytes, name: str, dtype: str, count: int, width: int | None = None) -> np.ndarray:
    """Decode a base64 field of raw values into (count,) or (count, width).

    Args:
        value: the base64 text.
        name: field name, for messages.
        dtype: numpy dtype string with byte order, e.g. ``"<f4"`` or ``"<i8"``.
        count: expected rows, the line's ``num_boxes``.
        width: values per row; None for one value per row.

    Returns:
        A read-only view of the decoded bytes.

    Raises:
        RowError: ``invalid-base64``, ``invalid-array`` when the bytes do not form whole
            rows, or ``num-boxes-mismatch`` when the row count is not ``count``.
    """
    data = decode_base64(value, name)
    item = np.dtype(dtype)
    row_bytes = item.itemsize * (width or 1)
    if len(data) % row_bytes:
        unit = f"rows of {width} {item.name} values" if width else f"{item.name} values"
        raise RowError("invalid-array", f"field {name} decodes to {len(data)} bytes, which is not a whole number of {unit}")

    rows = len(data) // row_bytes
    if rows != count:
        raise RowError("num-boxes-mismatch", f"num_boxes {count} but field {name} contains {rows} rows")
    array = np.frombuffer(data, dtype=item)
    return array.reshape(count, width) if width else array
