"""Caption reading, normalisation, spaCy parsing into objects and relations, and word vocabularies.

Typical use:

    table = read_captions("captions_val2017.json")          # CaptionTable, format detected
    parser = CaptionParser()                                 # en_core_web_sm or its repackaged twin
    parses = list(parser.parse_many(r.text for r in table.records))
    vocab = Vocabulary.build([[t.lower for t in p.tokens] for p in parses], threshold=4)

The parser names are imported on first use, because importing spaCy takes seconds and
reading captions or vocabularies does not need it.
"""

from __future__ import annotations

import importlib
from typing import Any

from extractors.captions.normalize import normalize_caption, truncate_caption
from extractors.captions.readers import detect_format, read_captions
from extractors.captions.records import (
    FORMATS,
    CaptionFormatError,
    CaptionRecord,
    CaptionTable,
    SkippedCaption,
)
from extractors.captions.vocab import Vocabulary, VocabularyError

__all__ = [
    "FORMATS",
    "MULTIWORD_PREPOSITIONS",
    "CaptionFormatError",
    "CaptionParser",
    "CaptionRecord",
    "CaptionTable",
    "ModelNotFoundError",
    "ObjectPhrase",
    "ParsedCaption",
    "Relation",
    "SkippedCaption",
    "Token",
    "Vocabulary",
    "VocabularyError",
    "detect_format",
    "normalize_caption",
    "read_captions",
    "truncate_caption",
]

_LAZY_NAMES = {
    "CaptionParser": "extractors.captions.parser",
    "ModelNotFoundError": "extractors.captions.parser",
    "ParsedCaption": "extractors.captions.parser",
    "ObjectPhrase": "extractors.captions.objects",
    "Token": "extractors.captions.objects",
    "MULTIWORD_PREPOSITIONS": "extractors.captions.relations",
    "Relation": "extractors.captions.relations",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
