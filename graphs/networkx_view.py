"""networkx views of the stored graphs, built on demand (nothing is stored as networkx).

``to_networkx`` accepts any of the four graph kinds:

| graph | networkx type | nodes | edges |
| --- | --- | --- | --- |
| ``SpatialGraph`` | ``DiGraph`` | regions: ``box``, ``object``, ``score``, ``attribute`` | (i, j) for every label other than ``none``: ``relation`` (name), ``label`` (0..11) |
| ``SceneGraph`` | ``MultiDiGraph`` | regions, as above | (subject, object, key=predicate name): ``predicate``, ``predicate_id``, ``score`` |
| ``DependencyGraph`` | ``DiGraph`` | tokens: ``text``, ``lemma``, ``pos``, ``root`` | (head, dependent): ``dep`` |
| ``ObjectRelationGraph`` | ``MultiDiGraph`` | objects: ``lemma``, ``text``, ``modifiers``, ``head`` | (subject, object, key=predicate): ``predicate`` |

Node ids are region, token or object indices, so they line up with the arrays.
"""

from __future__ import annotations

import logging
from typing import Any

import networkx as nx

from graphs.image_graphs import ImageGraphs, RegionNodes, SceneGraph, SpatialGraph
from graphs.textual import CaptionGraphs, DependencyGraph, ObjectRelationGraph

logger = logging.getLogger(__name__)


def to_networkx(graph: Any, *, min_score: float | None = None) -> nx.DiGraph | nx.MultiDiGraph:
    """Build the networkx view of a spatial, scene, dependency or object-relation graph.

    Args:
        graph: a ``SpatialGraph``, ``SceneGraph``, ``DependencyGraph`` or
            ``ObjectRelationGraph`` (see the module docstring for the attributes).
        min_score: scene graphs only: leave out edges scored below this value.

    Raises:
        TypeError: for any other object; for an ``ImageGraphs`` or ``CaptionGraphs``
            the message names the attribute to pass instead.
        ValueError: when ``min_score`` is given for a graph without scores.
    """
    if min_score is not None and not isinstance(graph, SceneGraph):
        raise ValueError(f"min_score applies to scene graphs only, not to a {type(graph).__name__}")
    if isinstance(graph, SpatialGraph):
        return _spatial(graph)
    if isinstance(graph, SceneGraph):
        return _scene(graph, min_score)
    if isinstance(graph, DependencyGraph):
        return _dependency(graph)
    if isinstance(graph, ObjectRelationGraph):
        return _object_relations(graph)
    if isinstance(graph, ImageGraphs):
        raise TypeError("pass graphs.spatial or graphs.scene of an ImageGraphs, not the ImageGraphs itself")
    if isinstance(graph, CaptionGraphs):
        raise TypeError("pass graphs.dependency or graphs.objects of a CaptionGraphs, not the CaptionGraphs itself")
    raise TypeError(
        f"cannot build a networkx graph from a {type(graph).__name__}; expected SpatialGraph, SceneGraph, "
        "DependencyGraph or ObjectRelationGraph"
    )


def _add_regions(result: nx.DiGraph, regions: RegionNodes) -> None:
    for index, box in enumerate(regions.boxes):
        result.add_node(
            index,
            box=tuple(float(value) for value in box),
            object=regions.object_names[index],
            score=float(regions.object_scores[index]),
            attribute=regions.attribute_names[index],
        )


def _spatial(graph: SpatialGraph) -> nx.DiGraph:
    result = nx.DiGraph(image_id=graph.image_id, image_size=graph.image_size, kind="spatial")
    _add_regions(result, graph.regions)
    subjects, objects = graph.labels.nonzero()
    for subject, object_ in zip(subjects.tolist(), objects.tolist()):
        label = int(graph.labels[subject, object_])
        result.add_edge(subject, object_, relation=graph.label_names[label], label=label)
    return result


def _scene(graph: SceneGraph, min_score: float | None) -> nx.MultiDiGraph:
    result = nx.MultiDiGraph(image_id=graph.image_id, image_size=graph.image_size, kind="scene")
    _add_regions(result, graph.regions)
    edges = graph.edges
    for subject, object_, predicate, score in zip(edges.subject.tolist(), edges.object.tolist(),
                                                  edges.predicate.tolist(), edges.score.tolist()):
        if min_score is not None and score < min_score:
            continue
        name = graph.predicate_names[predicate]
        result.add_edge(subject, object_, key=name, predicate=name, predicate_id=predicate, score=score)
    return result


def _dependency(graph: DependencyGraph) -> nx.DiGraph:
    result = nx.DiGraph(kind="dependency")
    for index, text in enumerate(graph.tokens):
        result.add_node(index, text=text, lemma=graph.lemmas[index], pos=graph.pos[index],
                        root=graph.heads[index] == index)
    for head, dependent, dep in graph.edges():
        result.add_edge(head, dependent, dep=dep)
    return result


def _object_relations(graph: ObjectRelationGraph) -> nx.MultiDiGraph:
    result = nx.MultiDiGraph(kind="object-relation")
    for index, obj in enumerate(graph.objects):
        result.add_node(index, lemma=obj.head_lemma, text=obj.text, modifiers=list(obj.modifiers), head=obj.head)
    for subject, object_, predicate in graph.relations:
        result.add_edge(subject, object_, key=predicate, predicate=predicate)
    return result
