"""Caption text normalisation: Unicode NFC, whitespace folding and word-boundary truncation.

Every reader and the parser pass caption text through `normalize_caption`, so one caption
gives the same tokens whichever file it came from and however its lines were wrapped.
"""

from __future__ import annotations

import logging
import re
import unicodedata

logger = logging.getLogger(__name__)

# In a str pattern, \s matches every Unicode whitespace character: tabs, newlines, NBSP
# (U+00A0), the line and paragraph separators U+2028 and U+2029, and the other space
# separators. The zero-width characters U+200B and U+FEFF are not whitespace in Unicode,
# so they are listed explicitly.
_WHITESPACE_RUN = re.compile(r"[\s\u200b\ufeff]+")


def normalize_caption(text: str) -> str:
    """Normalise one caption to Unicode NFC with single spaces and no outer whitespace.

    Args:
        text: raw caption text as decoded from the file.

    Returns:
        The normalised caption. It is the empty string when `text` contains only whitespace.

    Raises:
        TypeError: `text` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption text must be a str, got {type(text).__name__}: {text!r}")

    composed = unicodedata.normalize("NFC", text)
    return _WHITESPACE_RUN.sub(" ", composed).strip()


def truncate_caption(text: str, max_chars: int) -> tuple[str, bool]:
    """Cut a normalised caption to at most `max_chars` characters at a word boundary.

    The cut falls on the last space inside the limit. A caption whose first word alone is
    longer than `max_chars` is cut inside that word, because there is no boundary to use.

    Args:
        text: caption already passed through `normalize_caption`.
        max_chars: maximum length in characters (Unicode code points), at least 1.

    Returns:
        The possibly shortened caption and whether it was shortened.

    Raises:
        ValueError: `max_chars` is smaller than 1.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")

    if len(text) <= max_chars:
        return text, False

    if text[max_chars] == " ":
        return text[:max_chars].rstrip(), True

    head = text[:max_chars]
    boundary = head.rfind(" ")
    if boundary <= 0:
        return head, True
    return head[:boundary].rstrip(), True
