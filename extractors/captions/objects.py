"""Tokens and object phrases of one parsed caption.

`read_tokens` copies what the rules need out of a spaCy Doc in a single pass (T tokens), so
the object and relation rules work on plain Python lists instead of calling into spaCy again.
`find_objects` turns every noun that heads a noun phrase into an `ObjectPhrase` with its
amod, compound and nummod modifiers. Pronouns never become objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from spacy.attrs import DEP, HEAD, LEMMA, LOWER, ORTH, POS, SPACY
from spacy.parts_of_speech import NAMES as POS_NAMES

logger = logging.getLogger(__name__)

NOUN_TAGS = frozenset({"NOUN", "PROPN"})
VERB_TAGS = frozenset({"VERB", "AUX"})

# Left dependents that belong to a noun phrase: "the two small red street lamps".
NOUN_PHRASE_LEFT_DEPS = frozenset({"det", "predet", "amod", "compound", "nummod", "poss", "nmod", "quantmod",
                                   "advmod", "case"})
MODIFIER_DEPS = frozenset({"amod", "compound", "nummod"})

# Column order of the array that read_tokens unpacks.
TOKEN_ATTRIBUTES = [ORTH, LOWER, LEMMA, POS, DEP, HEAD, SPACY]

# Verb lemmas that the rule lemmatizer of en_core_web_sm 3.8 gets wrong in image captions
# ("riding" -> "rid", "staring" -> "star"), found by lemmatising the 25,000 COCO 5K test
# captions. Applied to VERB tokens only, so the noun "star" keeps its lemma.
VERB_LEMMA_FIXES = {
    "riding": "ride", "rides": "ride", "staring": "stare", "stares": "stare", "wading": "wade",
    "shining": "shine", "hoping": "hope", "plating": "plate", "mating": "mate", "biding": "bide",
}


@dataclass(slots=True)
class Token:
    """One token: `head` is the index of its syntactic head; the root points to itself."""

    text: str
    lower: str
    lemma: str
    pos: str
    dep: str
    head: int


@dataclass(slots=True)
class ObjectPhrase:
    """A noun phrase: head token, token span [start, end) and modifiers as (token index, relation).

    `head_lemma` is the head's lemma in lower case, also for proper nouns, because
    spaCy tags many sentence-initial common nouns ("Group of sheep") as PROPN.
    """

    head: int
    head_lemma: str
    start: int
    end: int
    modifiers: list[tuple[int, str]] = field(default_factory=list)
    text: str = ""


@dataclass(slots=True)
class TokenView:
    """Per-token lists of one Doc, indexed by token position, plus the children of every token."""

    texts: list[str]
    spaces: list[str]
    lowers: list[str]
    lemmas: list[str]
    pos: list[str]
    deps: list[str]
    heads: list[int]
    children: list[list[int]]

    def text_of(self, start: int, end: int) -> str:
        """Return the original text of tokens [start, end) with their spacing."""
        pieces = [self.texts[i] + self.spaces[i] for i in range(start, end)]
        return "".join(pieces).rstrip()


def read_tokens(doc) -> tuple[list[Token], TokenView]:
    """Copy the tokens of a parsed spaCy Doc into `Token` objects and a `TokenView`.

    All attributes come from one `Doc.to_array` call and are turned into strings through
    the vocabulary's StringStore. That is about three times faster than reading them from
    spaCy Token objects one by one, which matters because the rules themselves are cheap.

    Args:
        doc: a spacy.tokens.Doc with tags, dependencies and lemmas.

    Returns:
        The T tokens and the per-token lists. An empty lemma (a pipeline without
        lemmatizer) falls back to the lower-case text.
    """
    count = len(doc)
    strings = doc.vocab.strings
    rows = doc.to_array(TOKEN_ATTRIBUTES)

    # HEAD contains the offset to the head as uint64, so negative offsets wrap around.
    heads = (rows[:, 5].astype(np.int64) + np.arange(count, dtype=np.int64)).tolist() if count else []

    tokens: list[Token] = []
    view = TokenView([], [], [], [], [], [], heads, [[] for _ in range(count)])
    for index, (orth, lower_id, lemma_id, pos_id, dep_id, _, space) in enumerate(rows.tolist()):
        text = strings[orth]
        lower = strings[lower_id]
        pos = POS_NAMES.get(pos_id, "")
        lemma = strings[lemma_id] or lower
        if pos == "VERB":
            lemma = VERB_LEMMA_FIXES.get(lower, lemma)
        dep = strings[dep_id]
        head = heads[index]

        tokens.append(Token(text, lower, lemma, pos, dep, head))
        view.texts.append(text)
        view.spaces.append(" " if space else "")
        view.lowers.append(lower)
        view.lemmas.append(lemma)
        view.pos.append(pos)
        view.deps.append(dep)
        if head != index:
            view.children[head].append(index)
    return tokens, view


def find_objects(view: TokenView, excluded: set[int]) -> tuple[list[ObjectPhrase], dict[int, int]]:
    """Find the object phrases of one caption.

    A NOUN or PROPN token heads an object unless it modifies another noun (dep "compound"),
    belongs to a multi-word preposition such as "in front of" (`excluded`), or has no
    letter in it. The span runs from the leftmost noun-phrase dependent to the head.

    Args:
        view: the caption's tokens.
        excluded: token indices that may not head an object.

    Returns:
        The objects in token order, and a map from head token index to object index.
    """
    objects: list[ObjectPhrase] = []
    object_of: dict[int, int] = {}
    for index, pos in enumerate(view.pos):
        if pos not in NOUN_TAGS or view.deps[index] == "compound" or index in excluded:
            continue
        if not any(character.isalpha() for character in view.texts[index]):
            continue

        start = _phrase_start(view, index)
        phrase = ObjectPhrase(index, view.lemmas[index].lower(), start, index + 1, _modifiers(view, index),
                              view.text_of(start, index + 1))
        object_of[index] = len(objects)
        objects.append(phrase)
    return objects, object_of


def _phrase_start(view: TokenView, head: int) -> int:
    """Return the first token of the noun phrase headed by `head`."""
    start = head
    stack = [child for child in view.children[head] if child < head and view.deps[child] in NOUN_PHRASE_LEFT_DEPS]
    while stack:
        index = stack.pop()
        start = min(start, index)
        stack.extend(child for child in view.children[index] if child < index)
    return start


def _modifiers(view: TokenView, head: int) -> list[tuple[int, str]]:
    """Return the amod, compound and nummod modifiers of `head`, coordinated adjectives included."""
    modifiers: list[tuple[int, str]] = []
    for child in view.children[head]:
        dep = view.deps[child]
        if dep not in MODIFIER_DEPS:
            continue
        modifiers.append((child, dep))
        if dep == "amod":
            modifiers.extend((conjunct, "amod") for conjunct in _adjective_conjuncts(view, child))
    modifiers.sort()
    return modifiers


def _adjective_conjuncts(view: TokenView, adjective: int) -> list[int]:
    """Return the adjectives coordinated with `adjective`: "white" in "a red and white bus"."""
    found: list[int] = []
    stack = [adjective]
    while stack:
        index = stack.pop()
        for child in view.children[index]:
            if view.deps[child] == "conj" and view.pos[child] in ("ADJ", "VERB"):
                found.append(child)
                stack.append(child)
    return found
