"""Scene-graph vocabularies: object classes and predicates, with background at index 0.

The VG150 split of Visual Genome (150 object classes, 50 predicates) is distributed as
``VG-SGG-dicts-with-attri.json`` with the scene-graph generators Neural Motifs and
Scene-Graph-Benchmark. Its ``idx_to_label`` and ``idx_to_predicate`` map 1-based string
keys to names, which leaves index 0 free for the background class used here.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

logger = logging.getLogger(__name__)

BACKGROUND = "__background__"


@dataclass(frozen=True)
class SceneGraphVocab:
    """Object class names and predicate names, each with ``BACKGROUND`` at index 0."""

    object_names: tuple[str, ...]
    predicate_names: tuple[str, ...]

    @property
    def num_object_classes(self) -> int:
        """Number of object classes, background included."""
        return len(self.object_names)

    @property
    def num_predicates(self) -> int:
        """Number of predicates, background included."""
        return len(self.predicate_names)

    def object_index(self, name: str) -> int:
        """Return the index of an object class name.

        Raises:
            KeyError: when the name is not in the vocabulary.
        """
        return _index_of(self.object_names, name, "object class")

    def predicate_index(self, name: str) -> int:
        """Return the index of a predicate name.

        Raises:
            KeyError: when the name is not in the vocabulary.
        """
        return _index_of(self.predicate_names, name, "predicate")


def load_vg150_vocab(path: str | os.PathLike) -> SceneGraphVocab:
    """Read the object and predicate names of a ``VG-SGG-dicts-with-attri.json`` file.

    Args:
        path: the JSON file with ``idx_to_label`` and ``idx_to_predicate``.

    Returns:
        The vocabulary, 151 object names and 51 predicate names for VG150.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file is not JSON, lacks one of the two mappings, or a
            mapping's keys are not the consecutive indices 1..n.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); expected VG-SGG-dicts-with-attri.json") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} contains a JSON {type(data).__name__}, expected an object with idx_to_predicate")

    object_names = _names_from_one_based(data, "idx_to_label", path)
    predicate_names = _names_from_one_based(data, "idx_to_predicate", path)
    vocab = SceneGraphVocab(
        object_names=with_background(object_names),
        predicate_names=with_background(predicate_names),
    )
    logger.info(
        "loaded %d object classes and %d predicates from %s",
        vocab.num_object_classes - 1,
        vocab.num_predicates - 1,
        path,
    )
    return vocab


def with_background(names: Iterable[str]) -> tuple[str, ...]:
    """Return the names with ``BACKGROUND`` at index 0, adding it when missing.

    Use it for a predicate list that comes with the training data. Names are stripped
    of surrounding whitespace.

    Raises:
        ValueError: when a name is empty or not a string, when a name repeats, or when
            ``BACKGROUND`` appears at an index other than 0.
    """
    names = list(names)
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name {index} is {name!r}; every name must be a non-empty string")
    names = [name.strip() for name in names]
    if names and names[0] == BACKGROUND:
        names = names[1:]
    if BACKGROUND in names:
        raise ValueError(f"{BACKGROUND!r} may only be the first name, found it at index {names.index(BACKGROUND) + 1}")

    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"name {name!r} appears more than once; names must be unique")
        seen.add(name)
    return (BACKGROUND, *names)


def _names_from_one_based(data: Mapping, key: str, path: Path) -> list[str]:
    if key not in data or not isinstance(data[key], dict):
        raise ValueError(f"{path} has no mapping {key!r}; expected VG-SGG-dicts-with-attri.json")
    try:
        by_index = {int(index): name for index, name in data[key].items()}
    except ValueError as error:
        raise ValueError(f"{path}: {key} has a key that is not an integer ({error})") from error
    indices = sorted(by_index)
    if indices != list(range(1, len(indices) + 1)):
        raise ValueError(f"{path}: the keys of {key} must be 1..{len(indices)} without gaps, got {indices[:5]}...")
    return [by_index[index] for index in indices]


def _index_of(names: tuple[str, ...], name: str, kind: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise KeyError(f"unknown {kind} {name!r}; the vocabulary has {len(names) - 1} besides background") from None
