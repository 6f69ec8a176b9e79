"""Label names of the detector's object classes and attributes.

A vocabulary file has one label per line. A line may list comma-separated synonyms, and
the first one is the label's name, as in bottom-up-attention's Visual Genome
``objects_vocab.txt`` and ``attributes_vocab.txt``. A missing final newline is accepted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def read_vocab(path: str | os.PathLike, expected_count: int, field: str) -> list[str]:
    """Read the first synonym of each line of a vocabulary file.

    Args:
        path: the vocabulary file.
        expected_count: the number of labels the model predicts (K or A).
        field: the config field that named the file, for error messages.

    Raises:
        ValueError: if the file is missing, has an empty line, or the wrong line count.
    """
    vocab_path = Path(path).expanduser()
    try:
        text = vocab_path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read {field} {vocab_path}: {error}") from error

    lines = text.rstrip("\n").split("\n") if text.strip() else []
    names = []
    for number, line in enumerate(lines, start=1):
        name = line.split(",")[0].strip()
        if not name:
            raise ValueError(f"{field} {vocab_path} has an empty label on line {number}")
        names.append(name)

    if len(names) != expected_count:
        raise ValueError(
            f"{field} {vocab_path} lists {len(names)} labels but the detector predicts "
            f"{expected_count}; point {field} at the matching file or fix num_classes / "
            "num_attributes"
        )
    return names


def label_names(path: str | None, count: int, field: str, prefix: str) -> list[str]:
    """Return names from ``path``, or ``prefix_0`` ... when no file is configured."""
    if path is None:
        return [f"{prefix}_{index}" for index in range(count)]
    return read_vocab(path, count, field)
