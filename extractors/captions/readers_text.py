"""Readers for the line-based caption formats: Flickr token files, SCAN precomp files and CSV/TSV.

Each reader takes the decoded file text and returns a `CaptionTable` whose records carry
1-based source line numbers.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from pathlib import Path

import pandas as pd

from extractors.captions.records import CaptionFormatError, CaptionTable, TableBuilder, read_text, split_lines

logger = logging.getLogger(__name__)

# "1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress ..."
FLICKR_TOKEN_LINE = re.compile(r"^(?P<image>[^\t#]+)#(?P<index>\d+)\t(?P<caption>.*)$")

# Flickr8k.token.txt names one image "2258277193_586949ec62.jpg.1#0": the ".1" after the
# extension is not part of the file name.
FLICKR_ID_QUIRK = re.compile(r"^(?P<name>.+\.(?:jpe?g|png))\.\d+$", re.IGNORECASE)

SCAN_CAPTIONS_NAME = re.compile(r"^(?P<split>.+)_caps\.txt$")


def read_flickr_token(text: str, path: str | os.PathLike, max_chars: int) -> CaptionTable:
    """Read a Flickr token file: `name.jpg#k<TAB>caption` per line.

    This is the layout of Flickr8k.token.txt and of Flickr30K's results_20130124.token.
    Ids of the form `name.jpg.1#k` are mapped to `name.jpg` and counted in the notes. Blank
    lines are ignored. A repeated `name.jpg#k` is skipped with a reason naming the first line.

    Raises:
        CaptionFormatError: a non-blank line does not match the layout.
    """
    builder = TableBuilder(path, "flickr-token", max_chars)
    first_line: dict[tuple[str, int], int] = {}
    quirk_lines: list[int] = []

    for line_number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        match = FLICKR_TOKEN_LINE.match(line)
        if match is None:
            raise CaptionFormatError(
                f"{path}: line {line_number} does not match 'name.jpg#k<TAB>caption': {line[:80]!r}; "
                "fix the line or pass the right format="
            )

        image_id = match["image"].strip()
        quirk = FLICKR_ID_QUIRK.match(image_id)
        if quirk is not None:
            image_id = quirk["name"]
            quirk_lines.append(line_number)

        caption_index = int(match["index"])
        key = (image_id, caption_index)
        if key in first_line:
            builder.skip(image_id, caption_index, f"duplicate of {image_id}#{caption_index} on line {first_line[key]}",
                         line_number)
            continue
        first_line[key] = line_number
        builder.add(image_id, caption_index, match["caption"], source_line=line_number)

    if quirk_lines:
        builder.note(f"{len(quirk_lines)} ids of the form 'name.jpg.N#k' were mapped to 'name.jpg' "
                     f"(lines {', '.join(map(str, quirk_lines[:10]))})")
    return builder.finish()


def read_scan(
    text: str,
    path: str | os.PathLike,
    max_chars: int,
    captions_per_image: int = 5,
    encoding: str = "utf-8",
) -> CaptionTable:
    """Read a SCAN precomp caption file `{split}_caps.txt`: one caption per line, images in order.

    Consecutive groups of `captions_per_image` lines belong to one image. When
    `{split}_ids.txt` lies beside the file, it names the images: either one id per image, or
    one id per caption line. Without it the images get the ordinal ids "0", "1", ... and a
    note records that. The split is the file name prefix ("testall" for testall_caps.txt). An
    empty line is skipped with a reason but still takes its caption position, so later
    lines stay with their images.

    Raises:
        CaptionFormatError: the line count is not a multiple of `captions_per_image`, or the
            ids file has neither one line per image nor one per caption.
        ValueError: `captions_per_image` is smaller than 1.
    """
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")

    builder = TableBuilder(path, "scan", max_chars)
    lines = split_lines(text)
    name_match = SCAN_CAPTIONS_NAME.match(Path(path).name)
    split = name_match["split"] if name_match else None
    image_ids = _scan_image_ids(path, len(lines), captions_per_image, encoding, builder)

    per_image: dict[str, int] = {}
    for position, line in enumerate(lines):
        image_id = image_ids[position]
        caption_index = per_image.get(image_id, 0)
        per_image[image_id] = caption_index + 1
        builder.add(image_id, caption_index, line, split=split, source_line=position + 1)

    return builder.finish()


def _scan_image_ids(
    path: str | os.PathLike, line_count: int, captions_per_image: int, encoding: str, builder: TableBuilder
) -> list[str]:
    """Return the image id of every caption line, from `{split}_ids.txt` or as ordinals."""
    caps_path = Path(path)
    ids_path = caps_path.with_name(caps_path.name[: -len("_caps.txt")] + "_ids.txt") \
        if caps_path.name.endswith("_caps.txt") else None

    if ids_path is not None and ids_path.is_file():
        ids = [line.strip() for line in split_lines(read_text(ids_path, encoding)) if line.strip()]
        if len(ids) == line_count:
            builder.note(f"image ids from {ids_path.name}, one per caption line")
            return ids
        if len(ids) * captions_per_image == line_count:
            builder.note(f"image ids from {ids_path.name}, one per image of {captions_per_image} captions")
            return [image_id for image_id in ids for _ in range(captions_per_image)]
        raise CaptionFormatError(
            f"{ids_path}: {len(ids)} ids match neither the {line_count} caption lines of {caps_path.name} nor "
            f"{line_count / captions_per_image:g} images of {captions_per_image} captions; pass the right "
            "captions_per_image= or fix the ids file"
        )

    if line_count % captions_per_image:
        raise CaptionFormatError(
            f"{caps_path}: {line_count} caption lines is not a multiple of captions_per_image={captions_per_image}; "
            "pass the right captions_per_image= or add the ids file beside it"
        )
    image_count = line_count // captions_per_image
    expected = ids_path.name if ids_path is not None else "an ids file"
    builder.note(f"no {expected} beside {caps_path.name}: images got ordinal ids 0..{image_count - 1}, "
                 f"{captions_per_image} consecutive captions each")
    return [str(position // captions_per_image) for position in range(line_count)]


def csv_separator(path: str | os.PathLike, header: str) -> str:
    """Return the column separator of a CSV or TSV file: a tab for .tsv files or a tabbed header, else a comma."""
    if Path(path).suffix.lower() == ".tsv" or "\t" in header:
        return "\t"
    return ","


def read_csv(
    text: str,
    path: str | os.PathLike,
    max_chars: int,
    image_column: str = "image",
    caption_column: str = "caption",
) -> CaptionTable:
    """Read a CSV or TSV file with a header row naming `image_column` and `caption_column`.

    Other columns are ignored. `caption_index` counts the rows of one image in file order.
    Blank lines are ignored. CSV fields may be quoted; TSV fields are taken literally, so
    quote characters inside captions stay as they are.

    Raises:
        CaptionFormatError: a column is missing, or pandas cannot split the rows (wrong
            field count, unclosed quote).
    """
    builder = TableBuilder(path, "csv", max_chars)
    header = next((line for line in split_lines(text) if line.strip()), "")
    separator = csv_separator(path, header)
    quoting = csv.QUOTE_NONE if separator == "\t" else csv.QUOTE_MINIMAL

    try:
        frame = pd.read_csv(io.StringIO(text), sep=separator, dtype=str, keep_default_na=False,
                            skip_blank_lines=False, quoting=quoting)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise CaptionFormatError(f"{path}: cannot split the rows: {error}; fix the file or the separator") from error

    missing = [column for column in (image_column, caption_column) if column not in frame.columns]
    if missing:
        raise CaptionFormatError(
            f"{path}: header row has no column {', '.join(map(repr, missing))} (columns found: {list(frame.columns)}); "
            "pass image_column= and caption_column= with the right names"
        )

    _add_csv_rows(frame, image_column, caption_column, builder)
    return builder.finish()


def _add_csv_rows(frame: pd.DataFrame, image_column: str, caption_column: str, builder: TableBuilder) -> None:
    """Add each data row; line numbers count the newlines inside quoted fields too."""
    line_number = 2
    per_image: dict[str, int] = {}
    rows = frame.itertuples(index=False, name=None)
    image_position = frame.columns.get_loc(image_column)
    caption_position = frame.columns.get_loc(caption_column)

    for values in rows:
        # With dtype=str and keep_default_na=False every field should be a str, missing ones "".
        # Any other value (NaN from another pandas version) counts as an empty field.
        row = [value if isinstance(value, str) else "" for value in values]
        row_line = line_number
        line_number += 1 + sum(field.count("\n") for field in row)
        if all(field == "" for field in row):
            continue

        image_id = row[image_position].strip()
        caption_index = per_image.get(image_id, 0)
        per_image[image_id] = caption_index + 1
        if not image_id:
            builder.skip("", caption_index, f"empty {image_column!r} field", row_line)
            continue
        builder.add(image_id, caption_index, row[caption_position], source_line=row_line)
