"""Caption file reading: format detection from content, dispatch to the format readers, splits.

Supported formats (the `format` value in parentheses):

- COCO captions JSON (`coco`): `images[].file_name`, `annotations[].image_id/caption`.
- Karpathy split files (`karpathy`): `images[].filename/filepath/split/sentences[].raw`.
- Flickr token files (`flickr-token`): `name.jpg#k<TAB>caption` lines.
- SCAN precomp caption files (`scan`): `{split}_caps.txt`, one caption per line.
- JSON lines (`jsonl`): `{"image": ..., "captions": [...]}` per line.
- CSV or TSV with a header row (`csv`).

Splits: a Karpathy file names the split of every image, and `split=NAME` then keeps only
that split. For every other format `split=NAME` labels all captions with NAME, unless
`split_file` is also given: then only the images listed in that file get NAME and the
rest get None. A SCAN file without `split=` is labelled with its file name prefix
("testall" for testall_caps.txt).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from extractors.captions.readers_json import parse_json, read_coco, read_jsonl, read_karpathy
from extractors.captions.readers_text import (
    FLICKR_TOKEN_LINE,
    csv_separator,
    read_csv,
    read_flickr_token,
    read_scan,
)
from extractors.captions.records import (
    FORMATS,
    CaptionFormatError,
    CaptionTable,
    read_text,
    split_lines,
)

logger = logging.getLogger(__name__)


def read_captions(
    path: str | os.PathLike,
    format: str | None = None,
    split: str | None = None,
    split_file: str | os.PathLike | None = None,
    encoding: str = "utf-8",
    max_chars: int = 1000,
    image_column: str = "image",
    caption_column: str = "caption",
    captions_per_image: int = 5,
) -> CaptionTable:
    """Read every caption of a caption file into a table of normalised records.

    Args:
        path: the caption file.
        format: one of "coco", "karpathy", "flickr-token", "scan", "jsonl", "csv"; None
            detects the format from the content.
        split: split name. It selects one split of a Karpathy file and labels the captions
            of every other format (see the module docstring).
        split_file: text file of image ids, one per line. Listed images get `split`, the
            others None. Requires `split`. Not allowed with Karpathy files.
        encoding: text encoding of the file, a Python codec name.
        max_chars: captions longer than this many characters are cut at a word boundary.
        image_column: image id column of CSV/TSV files and image key of JSON lines.
        caption_column: caption column of CSV/TSV files, and the key of a single caption in
            JSON lines whose objects have no "captions" list.
        captions_per_image: consecutive captions per image in SCAN files.

    Returns:
        The table. Its records are in file order; empty captions are in `skipped`.

    Raises:
        FileNotFoundError: `path` or `split_file` does not exist.
        CaptionFormatError: the file is not valid for its format, its bytes are not valid in
            `encoding`, or its format cannot be detected.
        ValueError: an argument is invalid (unknown format, split_file without split, ...).
    """
    path = Path(path)
    _check_arguments(path, format, split, split_file, max_chars)

    text = read_text(path, encoding)
    detected, parsed = detect_format(path, text, image_column, caption_column) if format is None else (format, None)
    table = _read_as(detected, path, text, parsed, max_chars, image_column, caption_column, captions_per_image,
                     encoding)

    _apply_split(table, path, split, split_file, encoding)
    logger.info("read %d captions of %d images from %s as %s (%d skipped, %d truncated)", len(table.records),
                len(table.image_ids()), path, table.format, len(table.skipped), table.truncated)
    return table


def _check_arguments(path: Path, format: str | None, split: str | None, split_file: Any, max_chars: int) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown caption format {format!r}; use one of {', '.join(FORMATS)} or None to detect it")
    if split_file is not None and not split:
        raise ValueError(f"split_file={split_file} needs split=NAME, the split that its listed images belong to")
    if split_file is not None and not Path(split_file).is_file():
        raise FileNotFoundError(f"split file not found: {split_file}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")


def detect_format(path: str | os.PathLike, text: str, image_column: str = "image",
                  caption_column: str = "caption") -> tuple[str, Any]:
    """Detect the caption format of decoded file text.

    Args:
        path: the file; its suffix matters only to tell CSV files without the expected
            header columns from SCAN caption files.
        text: the decoded content.
        image_column: image id column name that marks a CSV/TSV header.
        caption_column: caption column name that marks a CSV/TSV header.

    Returns:
        The format name and, for whole-document JSON formats, the parsed JSON (else None).

    Raises:
        CaptionFormatError: the content matches no supported format.
    """
    lines = split_lines(text)
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise CaptionFormatError(f"{path}: the file is empty or contains only whitespace; it has no captions")

    if first.lstrip().startswith(("{", "[")):
        return _detect_json(path, text, first, image_column)
    return _detect_lines(path, first, image_column, caption_column), None


def _detect_json(path: str | os.PathLike, text: str, first: str, image_column: str) -> tuple[str, Any]:
    """Tell JSON lines from a whole JSON document, then COCO from Karpathy."""
    try:
        first_object = json.loads(first)
    except json.JSONDecodeError:
        first_object = None
    is_line_record = isinstance(first_object, dict) and "images" not in first_object \
        and ("captions" in first_object or image_column in first_object)
    if is_line_record:
        return "jsonl", None

    data = first_object if first_object is not None and first.strip() == text.strip() \
        else parse_json(text, path, "COCO captions or Karpathy split JSON")
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if "annotations" in data:
            return "coco", data
        if not data["images"] or (isinstance(data["images"][0], dict) and "sentences" in data["images"][0]):
            return "karpathy", data

    keys = sorted(data)[:10] if isinstance(data, dict) else f"a top-level {type(data).__name__}"
    raise CaptionFormatError(
        f"{path}: JSON content is neither COCO captions (images, annotations), a Karpathy split file "
        f"(images[].sentences) nor JSON lines with an {image_column!r} key (found {keys}); pass format="
    )


def _detect_lines(path: str | os.PathLike, first: str, image_column: str, caption_column: str) -> str:
    """Tell Flickr token files, CSV/TSV files and SCAN caption files apart by their first line."""
    if FLICKR_TOKEN_LINE.match(first):
        return "flickr-token"

    separator = csv_separator(path, first)
    header = [name.strip().strip('"').strip() for name in first.split(separator)]
    if image_column in header and caption_column in header:
        return "csv"

    if Path(path).suffix.lower() in (".csv", ".tsv"):
        raise CaptionFormatError(
            f"{path}: header row {first[:120]!r} has no {image_column!r} and {caption_column!r} columns; "
            "pass image_column= and caption_column= with the right names"
        )
    if "\t" in first:
        raise CaptionFormatError(
            f"{path}: line 1 contains a tab but is neither 'name.jpg#k<TAB>caption' nor a header with "
            f"{image_column!r} and {caption_column!r} columns; pass format= or the column names"
        )
    return "scan"


def _read_as(format: str, path: Path, text: str, parsed: Any, max_chars: int, image_column: str,
             caption_column: str, captions_per_image: int, encoding: str) -> CaptionTable:
    """Run the reader of `format`; `parsed` is the JSON document when detection already parsed it."""
    if format in ("coco", "karpathy"):
        data = parsed if parsed is not None else parse_json(text, path, format)
        reader = read_coco if format == "coco" else read_karpathy
        return reader(data, path, max_chars)
    if format == "jsonl":
        return read_jsonl(text, path, max_chars, image_column, caption_column)
    if format == "flickr-token":
        return read_flickr_token(text, path, max_chars)
    if format == "scan":
        return read_scan(text, path, max_chars, captions_per_image, encoding)
    return read_csv(text, path, max_chars, image_column, caption_column)


def _apply_split(table: CaptionTable, path: Path, split: str | None, split_file: Any, encoding: str) -> None:
    """Select (Karpathy) or label (other formats) the split of every record in place."""
    if table.format == "karpathy":
        if split_file is not None:
            raise ValueError(f"{path} is a Karpathy split file, which names the split of every image; "
                             "drop split_file and pass split= to select one split")
        if split:
            _select_split(table, split)
        return

    if split_file is not None:
        _label_from_split_file(table, split, Path(split_file), encoding)
    elif split:
        for record in table.records:
            record.split = split


def _select_split(table: CaptionTable, split: str) -> None:
    """Keep only the records of one Karpathy split and note how many images that leaves."""
    images_before = len(table.image_ids())
    found = sorted({str(record.split) for record in table.records})
    table.records = [record for record in table.records if record.split == split]
    if not table.records:
        raise ValueError(f"split {split!r} has no captions in this Karpathy file; splits found: {found}")
    table.notes.append(f"kept split {split!r}: {len(table.image_ids())} of {images_before} images")


def _label_from_split_file(table: CaptionTable, split: str | None, split_file: Path, encoding: str) -> None:
    """Give the images listed in `split_file` the split `split` and every other image None."""
    listed = {line.strip() for line in split_lines(read_text(split_file, encoding)) if line.strip()}
    seen: set[str] = set()
    for record in table.records:
        if record.image_id in listed:
            record.split = split
            seen.add(record.image_id)
        else:
            record.split = None

    table.notes.append(f"{len(seen)} images listed in {split_file.name} got split {split!r}; the others got None")
    missing = len(listed - seen)
    if missing:
        table.notes.append(f"{missing} of the {len(listed)} ids in {split_file.name} have no caption in this file")
