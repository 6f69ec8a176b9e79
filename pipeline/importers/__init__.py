"""Readers of precomputed region-feature formats, behind ``cmsei-prep import``.

Shapes: R regions of one image, D feature size, K object classes, A attributes.

Every reader works in two passes so that memory stays bounded whatever the source size:
:meth:`SourceReader.index` lists the rows (image id and where the row lives, without
decoding features), and :meth:`SourceReader.read` decodes one row into
:class:`ImportedRegions`. A bad row raises :class:`RowError`, which the import stage
records as a failed image with the code, the location and the message, for example
``num-boxes-mismatch: line 7: num_boxes 36 but field features contains 35 rows``.

Formats (``IMPORT_FORMATS``): ``butd-tsv`` (6-column bottom-up-attention TSV),
``lxmert-tsv`` (10-column TSV with labels), ``scan`` (SCAN precomp ``{split}_ims.npy``
with the GSMN box companions), ``butd-npz`` (per-image ``.npz`` of
bottom-up-attention.pytorch) and ``mmf-npy`` (per-image ``.npy`` plus ``_info.npy`` of
MMF's extraction scripts). The stage driver is :mod:`pipeline.importers.stage`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

IMPORT_FORMATS = ("butd-tsv", "lxmert-tsv", "scan", "butd-npz", "mmf-npy")

NO_LABEL = -1
"""Object or attribute id stored when the source has no labels for a region."""


class RowError(Exception):
    """One source row cannot be imported.

    Attributes:
        code: short failure kind, the part before the first colon of the stored reason.
        message: what is wrong, naming the field and the values.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def reason(self, where: str) -> str:
        """Return the stored failure reason, e.g. ``invalid-base64: line 7: ...``."""
        return f"{self.code}: {where}: {self.message}"


@dataclass(frozen=True, slots=True)
class SourceRow:
    """Location of one image's data in the source, found by :meth:`SourceReader.index`.

    Attributes:
        raw_id: the image id as the source writes it, before ``--image-ext`` or
            ``--id-template`` turn it into a dataset image id.
        path: the file that contains the row.
        where: the location used in failure reasons, e.g. ``line 7`` or ``row 12``.
        key: reader-specific locator (byte offset, array row, member name).
        row: 0-based position of the row among the source's non-empty rows, for
            ``{row}`` in ``--id-template``.
    """

    raw_id: str
    path: Path
    where: str
    key: Any
    row: int


@dataclass(frozen=True)
class UnreadableRow:
    """A source row without a usable image id; it is listed as skipped in the index.

    Attributes:
        label: replaces the image id in the index, e.g. ``features.tsv:7``.
        path: the file that contains the row.
        reason: failure reason with code and location.
    """

    label: str
    path: Path
    reason: str


@dataclass
class SourceIndex:
    """Rows and facts found by :meth:`SourceReader.index`.

    Attributes:
        rows: every row with an image id, in source order.
        unreadable: rows without a usable id.
        feature_dim: D, the feature size every row must have.
        has_boxes: whether the source stores boxes and image sizes.
        files: ``{"name", "sha256"}`` of every source file; folders of per-image files
            give one entry whose digest covers names, sizes and modification times.
        extra: format-specific facts for the manifest and summary, e.g. caption counts.
    """

    rows: list[SourceRow]
    unreadable: list[UnreadableRow]
    feature_dim: int
    has_boxes: bool
    files: list[dict[str, str]]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImportedRegions:
    """The regions of one image as decoded from a source row.

    Attributes:
        image_size: (height, width) in pixels; (0, 0) when the source has no sizes.
        boxes: (R, 4) float32 x1, y1, x2, y2 in pixels; zeros when the source has no boxes.
        features: (R, D) float32 or float16 as stored in the source.
        object_ids: (R,) int64, index into the objects vocabulary, -1 without labels.
        object_scores: (R,) float32, 0 without labels.
        attribute_ids: (R,) int64, index into the attributes vocabulary, -1 without labels.
        attribute_scores: (R,) float32, 0 without labels.
    """

    image_size: tuple[int, int]
    boxes: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray
    object_scores: np.ndarray
    attribute_ids: np.ndarray
    attribute_scores: np.ndarray

    def columns(self) -> dict[str, np.ndarray]:
        """Return the per-region arrays keyed by region shard column name."""
        return {
            "boxes": self.boxes,
            "features": self.features,
            "object_ids": self.object_ids,
            "object_scores": self.object_scores,
            "attribute_ids": self.attribute_ids,
            "attribute_scores": self.attribute_scores,
        }

    def same_as(self, other: "ImportedRegions") -> bool:
        """Return whether both have the same image size and bit-identical arrays."""
        if tuple(self.image_size) != tuple(other.image_size):
            return False
        mine, theirs = self.columns(), other.columns()
        return all(np.array_equal(mine[name], theirs[name]) for name in mine)


def unlabelled_regions(
    image_size: tuple[int, int], boxes: np.ndarray, features: np.ndarray
) -> ImportedRegions:
    """Wrap boxes (R, 4) and features (R, D) of a source without labels.

    Object and attribute ids are -1 and their scores 0, the schema's marker for a
    detector without that head.
    """
    count = features.shape[0]
    return ImportedRegions(
        image_size=image_size,
        boxes=boxes,
        features=features,
        object_ids=np.full(count, NO_LABEL, dtype=np.int64),
        object_scores=np.zeros(count, dtype=np.float32),
        attribute_ids=np.full(count, NO_LABEL, dtype=np.int64),
        attribute_scores=np.zeros(count, dtype=np.float32),
    )


class SourceReader:
    """Base class of the format readers; use as a context manager.

    Subclasses set ``format_name`` and implement :meth:`index` and :meth:`read`.
    ``bytes_read`` counts the source bytes decoded by :meth:`read`, for throughput.
    """

    format_name = ""

    def __init__(self) -> None:
        self.bytes_read = 0

    def index(self) -> SourceIndex:
        """List every row of the source without decoding features."""
        raise NotImplementedError

    def read(self, row: SourceRow) -> ImportedRegions:
        """Decode one row.

        Raises:
            RowError: the row is malformed; the message names the field and values.
        """
        raise NotImplementedError

    def release_pages(self) -> None:
        """Drop memory-mapped pages already read from this process's resident set."""

    def close(self) -> None:
        """Close open files."""

    def __enter__(self) -> "SourceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_vocabulary(path: str | Path) -> list[str]:
    """Read a vocabulary file: one entry per line, comma-separated synonyms, first kept.

    This is the layout of the Visual Genome ``objects_vocab.txt`` and
    ``attributes_vocab.txt`` of bottom-up-attention. A missing final newline is fine.

    Args:
        path: UTF-8 text file.

    Returns:
        The display names, index i for class i.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not UTF-8, is empty or has an empty line before its
            last entry, which would shift every later class id.
    """
    vocab_path = Path(path)
    try:
        text = vocab_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"vocabulary file not found: {vocab_path}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"vocabulary file {vocab_path} is not UTF-8 text ({error})") from None

    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"vocabulary file {vocab_path} is empty; pass a file with one class per line")

    names = []
    for number, line in enumerate(lines, start=1):
        name = line.split(",")[0].strip()
        if not name:
            raise ValueError(
                f"vocabulary file {vocab_path} line {number} is empty; every line up to the last "
                "must name a class, or all later class ids would shift"
            )
        names.append(name)
    return names
