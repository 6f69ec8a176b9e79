"""Caption records, the table a reader returns, and the helpers every format reader shares.

A reader decodes its file with `read_text`, feeds each raw caption to a `TableBuilder`, and
returns `TableBuilder.finish()`. The builder normalises text, skips empty captions with a
reason, truncates long ones and counts what it changed, so no format can drop a caption
silently.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from extractors.captions.normalize import normalize_caption, truncate_caption

logger = logging.getLogger(__name__)

FORMATS = ("coco", "karpathy", "flickr-token", "scan", "jsonl", "csv")


class CaptionFormatError(ValueError):
    """A caption file that cannot be read as its format.

    The message names the file, the position (line, JSON path or byte offset), the field
    involved and what to change.
    """


@dataclass
class CaptionRecord:
    """One caption of one image, with its text already normalised."""

    image_id: str
    caption_index: int
    text: str
    split: str | None = None
    source_line: int | None = None


@dataclass
class SkippedCaption:
    """A caption left out of `CaptionTable.records`, with the reason."""

    image_id: str
    caption_index: int
    reason: str
    source_line: int | None = None


@dataclass
class CaptionTable:
    """All captions read from one file, in file order, plus what was skipped or changed."""

    records: list[CaptionRecord]
    skipped: list[SkippedCaption]
    truncated: int
    format: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def image_ids(self) -> list[str]:
        """Return the distinct image ids in order of first appearance."""
        return list(dict.fromkeys(record.image_id for record in self.records))


class TableBuilder:
    """Collects captions of one file into a `CaptionTable`.

    Args:
        path: the file being read; used in messages only.
        format: one of `FORMATS`.
        max_chars: captions longer than this (after normalisation) are cut at a word boundary.
    """

    def __init__(self, path: str | os.PathLike, format: str, max_chars: int) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {max_chars}")
        self.path = Path(path)
        self.format = format
        self.max_chars = max_chars
        self.records: list[CaptionRecord] = []
        self.skipped: list[SkippedCaption] = []
        self.truncated = 0
        self.notes: list[str] = []

    def add(
        self,
        image_id: str,
        caption_index: int,
        raw_text: str,
        split: str | None = None,
        source_line: int | None = None,
    ) -> None:
        """Normalise and store one caption, or record it as skipped with the reason."""
        text = normalize_caption(raw_text)
        if not text:
            self.skip(image_id, caption_index, "empty caption", source_line)
            return

        text, was_cut = truncate_caption(text, self.max_chars)
        if was_cut:
            self.truncated += 1
        self.records.append(CaptionRecord(image_id, caption_index, text, split, source_line))

    def skip(self, image_id: str, caption_index: int, reason: str, source_line: int | None = None) -> None:
        """Record a caption that is left out, with the reason."""
        self.skipped.append(SkippedCaption(image_id, caption_index, reason, source_line))

    def note(self, message: str) -> None:
        """Add a note on how the file was interpreted."""
        self.notes.append(message)

    def finish(self) -> CaptionTable:
        """Return the table of everything added so far."""
        if self.truncated:
            self.note(f"{self.truncated} captions were longer than {self.max_chars} characters and were truncated")
        return CaptionTable(self.records, self.skipped, self.truncated, self.format, self.notes)


def read_text(path: str | os.PathLike, encoding: str) -> str:
    """Read and decode a whole text file, dropping a leading byte order mark.

    Args:
        path: the file.
        encoding: a Python codec name such as "utf-8" or "latin-1".

    Returns:
        The decoded text with line ends left as they are.

    Raises:
        FileNotFoundError: `path` does not exist.
        CaptionFormatError: the bytes are not valid in `encoding`. The message gives the line
            and byte offset of the first bad byte and suggests the `encoding=` argument.
        ValueError: `encoding` is not a known codec.
    """
    data = Path(path).read_bytes()
    return decode_bytes(data, path, encoding)


def decode_bytes(data: bytes, path: str | os.PathLike, encoding: str) -> str:
    """Decode file bytes as `read_text` does; `path` is used in messages only."""
    try:
        text = data.decode(encoding)
    except LookupError as error:
        raise ValueError(f"unknown text encoding {encoding!r} for {path}; pass a Python codec name such as "
                         "'utf-8' or 'latin-1'") from error
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        bad = data[error.start:error.end]
        raise CaptionFormatError(
            f"{path}: line {line} (byte offset {error.start}) is not valid {encoding}: bytes {bad!r}; "
            "pass the file's real encoding, for example encoding='latin-1' (--encoding on the command line)"
        ) from error

    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def split_lines(text: str) -> list[str]:
    """Split file text into lines on LF and CRLF only.

    str.splitlines would also break at U+2028, U+2029, form feeds and other separators that
    can occur inside one caption, which would shift every later line.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]
