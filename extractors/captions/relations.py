"""Relation rules: (subject, predicate, object) triples between the object phrases of a caption.

Rules, applied to the dependency parse (spaCy ClearNLP-style labels):

- subject-verb-object: "a dog catching a frisbee" gives (dog, catch, frisbee).
- passive with agent: "a frisbee is caught by a dog" gives (dog, catch, frisbee).
- verb plus preposition: "a man riding on a bike" gives (man, ride on, bike).
- noun plus preposition: "a man with a hat" gives (man, with, hat).
- copula plus preposition: "a cat is on a bed" gives (cat, on, bed). The verb "be" is dropped.
- multi-word prepositions ("in front of", "next to", "on top of", ...) form the whole
  predicate, also after a verb: "a woman is waiting in front of a bus" gives
  (woman, in front of, bus).
- the subject of a participle or relative clause is the noun it modifies. A participle
  after a coordination ("a man and a woman riding horses") applies to every conjunct.
- coordinated subjects and objects each get their own triple.

Subjects and objects that are pronouns ("they", "it") are not objects, so clauses with
them give no triple. All indices here are token positions (T tokens) until `Relation`,
whose subject and object are indices into the caption's object list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from extractors.captions.objects import VERB_TAGS, TokenView

logger = logging.getLogger(__name__)

MULTIWORD_PREPOSITIONS = (
    "in front of", "next to", "on top of", "in the middle of", "close to", "out of", "on the side of",
    "inside of", "across from", "to the left of", "to the right of", "on the left side of",
    "on the right side of", "on the other side of", "in the center of", "on the edge of", "at the top of",
    "at the bottom of", "in between", "ahead of", "away from", "along with", "together with",
)

# Fixed phrases that look like prepositional phrases but relate no objects.
NON_RELATIONAL_PHRASES = ("from left to right", "from right to left")

# spaCy labels "by" after these passive participles as an agent, but in captions it nearly
# always gives a place: "a bus parked by a curb" is (bus, park by, curb), not (curb, park, bus).
LOCATIVE_BY_VERBS = frozenset({"park", "place", "locate", "position", "situate", "station", "leave", "set",
                               "put", "stack", "line", "seat", "stand", "sit", "lie", "lay", "hang", "prop"})

RELATIVE_PRONOUNS = frozenset({"that", "which", "who", "whom", "whose"})

# Clauses without their own subject that take the subject of the verb they attach to:
# "a man standing and holding ..." (conj), "trying to catch ..." (xcomp).
SUBJECT_SHARING_DEPS = frozenset({"conj", "xcomp", "advcl"})
COORDINATION_DEPS = frozenset({"conj", "appos"})
MAX_CLAUSE_DEPTH = 4


def _phrase_table(phrases: tuple[str, ...]) -> dict[str, list[tuple[str, ...]]]:
    """Index phrases by first word, longest first, so the longest match wins."""
    table: dict[str, list[tuple[str, ...]]] = {}
    for phrase in sorted(phrases, key=lambda text: -len(text.split())):
        words = tuple(phrase.split())
        table.setdefault(words[0], []).append(words)
    return table


_PREPOSITION_TABLE = _phrase_table(MULTIWORD_PREPOSITIONS)
_NON_RELATIONAL_TABLE = _phrase_table(NON_RELATIONAL_PHRASES)


@dataclass(slots=True)
class Relation:
    """A triple: `subject` and `object` index the caption's objects; `predicate_tokens` index its tokens."""

    subject: int
    predicate: str
    object: int
    predicate_tokens: list[int] = field(default_factory=list)


@dataclass(slots=True)
class PhraseMatch:
    """A multi-word preposition or fixed phrase at tokens [start, end)."""

    start: int
    end: int
    phrase: str
    relational: bool


def find_phrases(view: TokenView) -> list[PhraseMatch]:
    """Find multi-word prepositions and non-relational fixed phrases, left to right, without overlap."""
    matches: list[PhraseMatch] = []
    lowers = view.lowers
    index = 0
    while index < len(lowers):
        match = _match_at(lowers, index)
        if match is None:
            index += 1
            continue
        matches.append(match)
        index = match.end
    return matches


def _match_at(lowers: list[str], index: int) -> PhraseMatch | None:
    for table, relational in ((_NON_RELATIONAL_TABLE, False), (_PREPOSITION_TABLE, True)):
        for words in table.get(lowers[index], ()):
            end = index + len(words)
            if tuple(lowers[index:end]) == words:
                return PhraseMatch(index, end, " ".join(words), relational)
    return None


class RelationFinder:
    """Applies the relation rules to one caption.

    Args:
        view: the caption's tokens.
        object_of: map from head token index to object index.
        phrases: matches of `find_phrases`.
        object_starts: map from first token of each object phrase to its head token.
    """

    def __init__(self, view: TokenView, object_of: dict[int, int], phrases: list[PhraseMatch],
                 object_starts: dict[int, int]) -> None:
        self.view = view
        self.object_of = object_of
        self.phrases = phrases
        self.object_starts = object_starts
        self.covered = {index for match in phrases for index in range(match.start, match.end)}
        self.relations: list[Relation] = []
        self._seen: set[tuple[int, str, int]] = set()

    def find(self) -> list[Relation]:
        """Return every relation of the caption, in token order of the verb or preposition that triggers it."""
        view = self.view
        phrase_at = {match.start: match for match in self.phrases if match.relational}
        for index, dep in enumerate(view.deps):
            if index in phrase_at:
                self._multiword_preposition(phrase_at[index])
            elif index in self.covered:
                continue
            elif dep == "prep":
                self._preposition(index)
            elif view.pos[index] in VERB_TAGS:
                self._verb(index)
        return self.relations

    def _add(self, subjects: list[int], predicate: str, objects: list[int], predicate_tokens: list[int]) -> None:
        for subject in subjects:
            for object_token in objects:
                if subject == object_token:
                    continue
                key = (self.object_of[subject], predicate, self.object_of[object_token])
                if key in self._seen:
                    continue
                self._seen.add(key)
                self.relations.append(Relation(key[0], predicate, key[2], list(predicate_tokens)))

    def _verb(self, verb: int) -> None:
        """Add subject-verb-object and passive agent triples of one verb."""
        view = self.view
        predicate, predicate_tokens = self._verb_predicate(verb)
        for child in view.children[verb]:
            dep = view.deps[child]
            if dep == "dobj":
                self._add(self.subjects_of(verb), predicate, self._argument(verb, child), predicate_tokens)
            elif dep == "agent":
                self._agent(verb, child, predicate, predicate_tokens)

    def _agent(self, verb: int, agent: int, predicate: str, predicate_tokens: list[int]) -> None:
        """Add (agent, verb, patient) for a passive, or a "by" location after verbs such as "park"."""
        view = self.view
        agents = [obj for child in view.children[agent] if view.deps[child] == "pobj"
                  for obj in self._argument(agent, child)]
        if view.lemmas[verb] in LOCATIVE_BY_VERBS:
            self._attach(verb, view.lowers[agent], [agent], agents, False)
            return
        self._add(agents, predicate, self.subjects_of(verb), predicate_tokens)

    def _verb_predicate(self, verb: int) -> tuple[str, list[int]]:
        """Return the verb lemma with its particle ("pick up") and the tokens involved."""
        view = self.view
        particles = [child for child in view.children[verb] if view.deps[child] == "prt"]
        words = [view.lemmas[verb]] + [view.lowers[child] for child in particles]
        return " ".join(words), [verb, *particles]

    def _argument(self, verb: int, token: int) -> list[int]:
        """Return the objects a verb argument stands for, resolving a relative pronoun to its noun."""
        if token in self.object_of:
            return self.group(token)

        view = self.view
        is_relative = view.lowers[token] in RELATIVE_PRONOUNS and view.deps[verb] == "relcl"
        if is_relative and view.heads[verb] in self.object_of:
            return self.group(view.heads[verb])
        return []

    def _preposition(self, preposition: int) -> None:
        view = self.view
        objects = [obj for child in view.children[preposition] if view.deps[child] == "pobj"
                   for obj in self._argument(preposition, child)]
        if objects:
            self._attach(view.heads[preposition], view.lowers[preposition], [preposition], objects, False)

    def _multiword_preposition(self, match: PhraseMatch) -> None:
        """Add the triples of "in front of"-style prepositions, attached where the phrase's root attaches."""
        view = self.view
        span = range(match.start, match.end)
        roots = [index for index in span if view.heads[index] not in span or view.heads[index] == index]
        if not roots or view.heads[roots[0]] == roots[0]:
            return

        objects = self._phrase_objects(match)
        if objects:
            self._attach(view.heads[roots[0]], match.phrase, list(span), objects, True)

    def _phrase_objects(self, match: PhraseMatch) -> list[int]:
        """Return the objects after a multi-word preposition: a pobj in the span, else the next noun phrase."""
        view = self.view
        for index in reversed(range(match.start, match.end)):
            for child in view.children[index]:
                if view.deps[child] == "pobj" and child >= match.end and child in self.object_of:
                    return self.group(child)
        following = self.object_starts.get(match.end)
        return self.group(following) if following is not None else []

    def _attach(self, governor: int, preposition: str, preposition_tokens: list[int], objects: list[int],
                multiword: bool) -> None:
        """Add triples for a preposition attached to `governor` (a noun, verb, adjective or adverb)."""
        view = self.view
        pos = view.pos[governor]
        if governor in self.object_of:
            self._add([governor], preposition, objects, preposition_tokens)
        elif pos in VERB_TAGS:
            if multiword or view.lemmas[governor] == "be":
                predicate, tokens = preposition, preposition_tokens
            else:
                verb_words, verb_tokens = self._verb_predicate(governor)
                predicate, tokens = f"{verb_words} {preposition}", verb_tokens + preposition_tokens
            self._add(self.subjects_of(governor), predicate, objects, tokens)
        elif pos in ("ADJ", "ADV") and governor not in self.covered:
            predicate = preposition if multiword else f"{view.lowers[governor]} {preposition}"
            tokens = preposition_tokens if multiword else [governor, *preposition_tokens]
            self._add(self._modified_subjects(governor), predicate, objects, tokens)

    def _modified_subjects(self, word: int) -> list[int]:
        """Return the subjects of an adjective or adverb: the noun it modifies or the subject of its verb."""
        view = self.view
        head = view.heads[word]
        if head == word:
            return []
        if head in self.object_of:
            return [head]
        if view.pos[head] in VERB_TAGS:
            return self.subjects_of(head)
        return []

    def subjects_of(self, verb: int, depth: int = 0) -> list[int]:
        """Return the subject objects of a verb (surface subject for passives).

        A relative pronoun subject ("a dog that is sitting") resolves to the noun the clause
        modifies. A participle or relative clause without subject takes that noun. A
        conjoined, xcomp or advcl verb without subject takes its head verb's subject.
        """
        view = self.view
        for child in view.children[verb]:
            if view.deps[child] in ("nsubj", "nsubjpass"):
                return self._argument(verb, child)

        dep = view.deps[verb]
        head = view.heads[verb]
        if head == verb:
            return []
        if dep in ("acl", "relcl") and head in self.object_of:
            return self._participle_subjects(verb, head)
        if dep in SUBJECT_SHARING_DEPS and view.pos[head] in VERB_TAGS and depth < MAX_CLAUSE_DEPTH:
            return self.subjects_of(head, depth + 1)
        return []

    def _participle_subjects(self, verb: int, noun: int) -> list[int]:
        """Return the nouns a participle applies to: every conjunct of its noun's coordination before it.

        "a man and a woman riding horses" gives both nouns. In "a man wearing a hat and a
        tie", the noun "tie" follows the participle and is no subject.
        """
        root = noun
        while self.view.deps[root] in COORDINATION_DEPS and self.view.heads[root] in self.object_of \
                and self.view.heads[root] != root:
            root = self.view.heads[root]
        return [member for member in self.group(root) if member < verb]

    def group(self, token: int) -> list[int]:
        """Return `token` and the objects coordinated with it below it ("a cat and a dog")."""
        view = self.view
        found = [token]
        stack = [token]
        while stack:
            index = stack.pop()
            for child in view.children[index]:
                if view.deps[child] in COORDINATION_DEPS and child in self.object_of:
                    found.append(child)
                    stack.append(child)
        found.sort()
        return found


def find_relations(view: TokenView, object_of: dict[int, int], phrases: list[PhraseMatch],
                   object_starts: dict[int, int]) -> list[Relation]:
    """Return the relation triples of one caption; see the module docstring for the rules."""
    return RelationFinder(view, object_of, phrases, object_starts).find()
