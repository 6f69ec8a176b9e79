"""Textual graphs of parsed captions, read from the caption shards.

Shapes: T tokens, O object phrases and E relations of one caption.

Each caption parse gives two graphs, both stored as flat arrays in the caption shards
and rebuilt here on demand:

- the dependency graph: tokens as nodes, an edge from each token's syntactic head to
  the token labelled with its dependency relation (the root, whose head is itself,
  has no incoming edge);
- the object-relation graph: the caption's object phrases as nodes and its relation
  triples (subject, predicate, object) as labelled edges.

``graphs.networkx_view.to_networkx`` turns either into a networkx graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import pandas as pd

from pipeline.caption_shards import CaptionShard, shard_file_name
from pipeline.dataset import CAPTIONS, DatasetFolder

logger = logging.getLogger(__name__)


@dataclass
class DependencyGraph:
    """The dependency parse of one caption (T tokens).

    Attributes:
        tokens: T token texts.
        lemmas: T lemmas.
        pos: T coarse part-of-speech tags.
        deps: T dependency labels.
        heads: T head token indices; the root's head is itself.
    """

    tokens: list[str]
    lemmas: list[str]
    pos: list[str]
    deps: list[str]
    heads: list[int]

    def edges(self) -> list[tuple[int, int, str]]:
        """Return the (head, dependent, dependency label) edges, the root's self-loop left out."""
        return [(head, index, dep) for index, (head, dep) in enumerate(zip(self.heads, self.deps)) if head != index]

    def root(self) -> int | None:
        """Return the index of the first root token, or None for an empty caption."""
        return next((index for index, head in enumerate(self.heads) if head == index), None)


@dataclass
class TextObject:
    """An object phrase: head token, token span [start, end), head lemma, its tokens joined by spaces, modifier words."""

    head: int
    start: int
    end: int
    head_lemma: str
    text: str
    modifiers: list[str]


@dataclass
class ObjectRelationGraph:
    """The objects of one caption (O nodes) and its relations (E labelled edges).

    Attributes:
        objects: O object phrases.
        relations: E (subject, object, predicate) triples, indices into ``objects``.
    """

    objects: list[TextObject]
    relations: list[tuple[int, int, str]]


@dataclass
class CaptionGraphs:
    """Both textual graphs of one caption, with where it came from."""

    image_id: str
    caption_index: int
    text: str
    dependency: DependencyGraph
    objects: ObjectRelationGraph


def caption_graphs(shard: CaptionShard, row: int) -> CaptionGraphs:
    """Rebuild the textual graphs of caption ``row`` of an open caption shard.

    Raises:
        IndexError: when ``row`` is outside the shard.
    """
    if not 0 <= row < len(shard):
        raise IndexError(f"caption row {row} is outside {shard.path} ({len(shard)} captions)")
    tokens = shard.tokens(row)
    dependency = DependencyGraph(list(tokens["text"]), list(tokens["lemma"]), tokens["pos"], tokens["dep"], tokens["head"])

    objects = []
    for obj in shard.objects(row):
        words = [tokens["text"][index] for index, _ in obj["modifiers"]]
        text = " ".join(tokens["text"][obj["start"]:obj["end"]])
        objects.append(TextObject(obj["head"], obj["start"], obj["end"], obj["head_lemma"], text, words))
    relations = [(rel["subject"], rel["object"], rel["predicate"]) for rel in shard.relations(row)]
    return CaptionGraphs(
        image_id=shard.image_ids[row],
        caption_index=int(shard.caption_index[row]),
        text=shard.texts[row],
        dependency=dependency,
        objects=ObjectRelationGraph(objects, relations),
    )


def iter_caption_graphs(data: DatasetFolder) -> Iterator[CaptionGraphs]:
    """Yield the textual graphs of every parsed caption of the dataset, in shard order.

    Raises:
        FileNotFoundError: when the dataset has no captions stage.
    """
    for path in _caption_shard_paths(data):
        with CaptionShard(path) as shard:
            for row in range(len(shard)):
                yield caption_graphs(shard, row)


def read_caption_graphs(data: DatasetFolder, image_id: str) -> list[CaptionGraphs]:
    """Return the textual graphs of every parsed caption of one image, by caption index.

    Raises:
        FileNotFoundError: when the dataset has no captions stage.
    """
    index = _caption_index(data)
    rows = index[(index["image_id"] == image_id) & (index["status"] == "ok")].sort_values("caption_index")
    result = []
    for shard_index, group in rows.groupby("shard", sort=True):
        with CaptionShard(data.stage_dir(CAPTIONS) / shard_file_name(int(shard_index))) as shard:
            result.extend(caption_graphs(shard, int(row)) for row in group["row"])
    return sorted(result, key=lambda graphs: graphs.caption_index)


def _caption_index(data: DatasetFolder) -> pd.DataFrame:
    path = data.stage_dir(CAPTIONS) / "index.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{data.root} has no parsed captions; run `cmsei-prep captions --out {data.root}` first")
    return pd.read_parquet(path)


def _caption_shard_paths(data: DatasetFolder) -> list:
    index = _caption_index(data)
    shards = sorted(int(shard) for shard in index.loc[index["shard"] >= 0, "shard"].unique())
    return [data.stage_dir(CAPTIONS) / shard_file_name(shard) for shard in shards
            if (data.stage_dir(CAPTIONS) / shard_file_name(shard)).exists()]
