"""Word vocabularies for caption encoders, compatible with SCAN's `*_vocab.json` files.

Ids 0 to 3 are reserved: <pad>=0, <start>=1, <end>=2, <unk>=3. Words are lower-cased when
the vocabulary is built and when text is encoded.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
FILE_FORMAT = "cmsei-vocabulary"
FILE_VERSION = 1


class VocabularyError(ValueError):
    """A vocabulary file or mapping that is malformed or breaks the reserved ids."""


class Vocabulary:
    """A bijection between words and integer ids.

    Args:
        word_to_id: every word with its id. The four special tokens must have ids 0 to 3,
            and no two words may share an id.

    Raises:
        VocabularyError: a special token is missing or misplaced, or an id repeats.
    """

    def __init__(self, word_to_id: dict[str, int]) -> None:
        _check_mapping(word_to_id, "the mapping")
        self._ids = dict(word_to_id)
        self._words = {index: word for word, index in word_to_id.items()}

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], threshold: int = 4) -> Vocabulary:
        """Build a vocabulary from tokenised captions.

        Words are counted in lower case and kept when they occur at least `threshold` times.
        Kept words get ids from 4 on, by descending count and then alphabetically, so the
        same input always gives the same ids.

        Args:
            token_lists: one list of word strings per caption.
            threshold: minimum count of a kept word, at least 1.

        Raises:
            ValueError: `threshold` is smaller than 1.
            TypeError: a token is not a str.
        """
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, got {threshold}")

        counts: Counter[str] = Counter()
        for tokens in token_lists:
            for token in tokens:
                if not isinstance(token, str):
                    raise TypeError(f"tokens must be str, got {type(token).__name__}: {token!r}")
                counts[token.lower()] += 1

        frequent = [word for word, count in counts.items() if count >= threshold and word not in SPECIAL_TOKENS]
        kept_words = sorted(frequent, key=lambda word: (-counts[word], word))
        mapping = {word: index for index, word in enumerate(SPECIAL_TOKENS)}
        mapping.update((word, index) for index, word in enumerate(kept_words, start=len(SPECIAL_TOKENS)))
        logger.info("built vocabulary of %d words (%d distinct, threshold %d)", len(mapping), len(counts), threshold)
        return cls(mapping)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Load a vocabulary saved by `save`, or a SCAN `*_vocab.json` file, keeping its ids exactly.

        Raises:
            FileNotFoundError: `path` does not exist.
            VocabularyError: the file is not valid JSON, is neither layout, or its
                `word2idx` and `idx2word` disagree.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise VocabularyError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") \
                from error
        except UnicodeDecodeError as error:
            raise VocabularyError(f"{path}: not UTF-8 text (byte offset {error.start}); pass a vocabulary JSON file") \
                from error

        if isinstance(data, dict) and data.get("format") == FILE_FORMAT:
            mapping = _own_mapping(data, path)
        elif isinstance(data, dict) and "word2idx" in data:
            mapping = _scan_mapping(data, path)
        else:
            found = sorted(data)[:10] if isinstance(data, dict) else type(data).__name__
            raise VocabularyError(f"{path}: neither a {FILE_FORMAT} file nor a SCAN vocabulary with 'word2idx' "
                                  f"(found {found})")

        _check_mapping(mapping, str(path))
        logger.info("loaded vocabulary of %d words from %s", len(mapping), path)
        return cls(mapping)

    def save(self, path: str | os.PathLike, layout: str = "cmsei") -> None:
        """Write the vocabulary as JSON with integer ids, atomically.

        Args:
            path: target file; written through a temporary file in the same folder.
            layout: "cmsei" for {"format", "version", "word_to_id"}, or "scan" for SCAN's
                {"word2idx", "idx2word", "idx"} (idx2word keys are strings there, as SCAN writes them).

        Raises:
            ValueError: `layout` is neither "cmsei" nor "scan".
        """
        if layout == "cmsei":
            data: dict[str, Any] = {"format": FILE_FORMAT, "version": FILE_VERSION, "word_to_id": self._ids}
        elif layout == "scan":
            data = {"word2idx": self._ids, "idx2word": {str(i): w for i, w in sorted(self._words.items())},
                    "idx": len(self._ids)}
        else:
            raise ValueError(f"unknown vocabulary layout {layout!r}; use 'cmsei' or 'scan'")
        _write_json_atomic(Path(path), data)

    def encode(self, words: list[str], add_boundaries: bool = False) -> list[int]:
        """Map words to ids, lower-casing them first; unknown words get the <unk> id 3.

        Args:
            words: the tokens of one caption.
            add_boundaries: put <start> before and <end> after the ids, as SCAN's loaders do.
        """
        unknown = self._ids[UNK]
        ids = [self._ids.get(word.lower(), unknown) for word in words]
        if add_boundaries:
            return [self._ids[START], *ids, self._ids[END]]
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Map ids back to words.

        Raises:
            KeyError: an id is not in the vocabulary.
        """
        return [self.id_to_word(index) for index in ids]

    def word_to_id(self, word: str) -> int:
        """Return the id of `word` (lower-cased), or the <unk> id 3 when it is not in the vocabulary."""
        return self._ids.get(word.lower(), self._ids[UNK])

    def id_to_word(self, index: int) -> str:
        """Return the word with id `index`.

        Raises:
            KeyError: `index` is not an id of this vocabulary.
        """
        try:
            return self._words[index]
        except KeyError:
            raise KeyError(f"id {index} is not in the vocabulary (ids 0..{max(self._words)})") from None

    def items(self) -> list[tuple[str, int]]:
        """Return (word, id) pairs in id order."""
        return [(word, index) for index, word in sorted(self._words.items())]

    def __contains__(self, word: object) -> bool:
        return isinstance(word, str) and word.lower() in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._ids == other._ids

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"


def _own_mapping(data: dict, path: Path) -> dict[str, int]:
    if data.get("version") != FILE_VERSION:
        raise VocabularyError(f"{path}: unsupported {FILE_FORMAT} version {data.get('version')!r}; "
                              f"this code reads version {FILE_VERSION}")
    mapping = data.get("word_to_id")
    if not isinstance(mapping, dict):
        raise VocabularyError(f"{path}: field 'word_to_id' must be an object of word to integer id")
    return mapping


def _scan_mapping(data: dict, path: Path) -> dict[str, int]:
    """Return SCAN's word2idx after checking that idx2word and idx agree with it."""
    mapping = data["word2idx"]
    if not isinstance(mapping, dict):
        raise VocabularyError(f"{path}: field 'word2idx' must be an object of word to integer id")

    reverse = data.get("idx2word")
    if isinstance(reverse, dict):
        for key, word in reverse.items():
            if mapping.get(word) != _as_id(key, path):
                raise VocabularyError(f"{path}: idx2word[{key!r}] is {word!r} but word2idx[{word!r}] is "
                                      f"{mapping.get(word)!r}; the two maps must agree")
        if len(reverse) != len(mapping):
            raise VocabularyError(f"{path}: idx2word has {len(reverse)} entries but word2idx has {len(mapping)}")

    size = data.get("idx")
    if size is not None and size != len(mapping):
        raise VocabularyError(f"{path}: idx is {size} but word2idx has {len(mapping)} words")
    return mapping


def _as_id(key: Any, path: Path) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise VocabularyError(f"{path}: idx2word key {key!r} is not an integer id") from None


def _check_mapping(mapping: dict, source: str) -> None:
    """Raise VocabularyError unless ids are distinct non-negative integers and special tokens sit at 0..3."""
    seen: dict[int, str] = {}
    for word, index in mapping.items():
        if not isinstance(word, str) or not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise VocabularyError(f"{source}: entry {word!r}: {index!r} must map a word to a non-negative integer id")
        if index in seen:
            raise VocabularyError(f"{source}: words {seen[index]!r} and {word!r} share id {index}")
        seen[index] = word

    for expected, token in enumerate(SPECIAL_TOKENS):
        if mapping.get(token) != expected:
            raise VocabularyError(f"{source}: {token} must have id {expected}, found {mapping.get(token)!r}; "
                                  "the ids <pad>=0, <start>=1, <end>=2, <unk>=3 are reserved")


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file in the target folder, then rename it over `path`."""
    descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
