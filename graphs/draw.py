"""Pictures of an image's regions, scene-graph triplets, spatial labels and caption graphs.

Shapes: H x W x 3 uint8 pixels, R regions, E scene-graph edges. Drawing uses matplotlib's
Agg backend, so no display is needed. The picture shows:

- the image with region boxes, each labelled ``index: attribute class score`` with the
  shard's names. The ``max_regions`` regions of highest detector score are drawn, and
  also every region that a drawn triplet or ``--region`` names;
- the top scene-graph triplets as arrows from the subject's box centre to the object's,
  labelled with the predicate, and listed with their scores below the image;
- with ``region``, that region's spatial label to every other drawn region, written at
  the other region's centre;
- with a caption, its text, object phrases and relation triples below the image.
"""

from __future__ import annotations

import logging
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

from graphs.image_graphs import ImageGraphs  # noqa: E402
from graphs.textual import CaptionGraphs  # noqa: E402
from pipeline.atomic import atomic_path  # noqa: E402

logger = logging.getLogger(__name__)

FIGURE_WIDTH_INCHES = 10.0
TEXT_LINE_INCHES = 0.15
TEXT_WRAP_CHARACTERS = 110
DPI = 100
# Qualitative colours (matplotlib's tab10) for boxes and arrows.
PALETTE = plt.get_cmap("tab10").colors


@dataclass
class DrawOptions:
    """Drawing options besides the image (see the module docstring)."""

    max_regions: int = 20
    top_triplets: int = 10
    region: int | None = None
    caption: CaptionGraphs | None = None
    title: str | None = None


def draw_image_graphs(pixels: np.ndarray, graphs: ImageGraphs, out_path: str | os.PathLike,
                      options: DrawOptions | None = None) -> Path:
    """Draw the image with its regions and graphs and write a PNG atomically.

    Args:
        pixels: (H, W, 3) uint8 upright RGB image, the frame of the region boxes.
        graphs: the image's regions, spatial graph and scene graph.
        out_path: the PNG file to write.
        options: what to draw; the defaults draw 20 regions and 10 triplets.

    Returns:
        The path written.

    Raises:
        ValueError: when ``region`` is not a region of the image, a count is below 0,
            or the pixels are not (H, W, 3).
    """
    options = options or DrawOptions()
    _check_inputs(pixels, graphs, options)
    edges = graphs.scene.edges
    top = min(options.top_triplets, len(edges))
    drawn = _regions_to_draw(graphs, options, top)

    lines = _text_lines(graphs, options, top)
    height, width = pixels.shape[:2]
    image_inches = FIGURE_WIDTH_INCHES * height / width
    text_inches = TEXT_LINE_INCHES * (len(lines) + 1)
    figure = plt.figure(figsize=(FIGURE_WIDTH_INCHES, image_inches + text_inches), dpi=DPI)
    try:
        image_axes = figure.add_axes((0.0, text_inches / (image_inches + text_inches), 1.0,
                                      image_inches / (image_inches + text_inches)))
        image_axes.imshow(pixels, extent=(0, width, height, 0), interpolation="bilinear")
        image_axes.set_xlim(0, width)
        image_axes.set_ylim(height, 0)
        image_axes.axis("off")
        scale = width / (FIGURE_WIDTH_INCHES * DPI)
        _draw_regions(image_axes, graphs, drawn, options.region, scale)
        _draw_triplets(image_axes, graphs, top, scale)
        if options.region is not None:
            _draw_spatial_labels(image_axes, graphs, options.region, drawn)
        _draw_text(figure, lines, text_inches / (image_inches + text_inches))

        out_path = Path(out_path)
        with atomic_path(out_path) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(figure)
    logger.info("wrote %s: %d regions, %d triplets", out_path, len(drawn), top)
    return out_path


def _check_inputs(pixels: np.ndarray, graphs: ImageGraphs, options: DrawOptions) -> None:
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must have shape (H, W, 3), got {pixels.shape}")
    count = len(graphs.spatial.regions.object_names)
    if options.region is not None and not 0 <= options.region < count:
        raise ValueError(f"region {options.region} does not exist: image {graphs.spatial.image_id!r} has {count} "
                         f"regions (0..{count - 1})")
    if options.max_regions < 0 or options.top_triplets < 0:
        raise ValueError(f"max_regions and top_triplets must be 0 or more, got {options.max_regions} and "
                         f"{options.top_triplets}")


def _regions_to_draw(graphs: ImageGraphs, options: DrawOptions, top: int) -> list[int]:
    scores = graphs.spatial.regions.object_scores
    chosen = set(np.argsort(-scores, kind="stable")[: options.max_regions].tolist())
    edges = graphs.scene.edges
    chosen |= set(edges.subject[:top].tolist()) | set(edges.object[:top].tolist())
    if options.region is not None:
        chosen.add(options.region)
    return sorted(chosen)


def _centre(box: np.ndarray) -> tuple[float, float]:
    return (float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2)


def _region_label(graphs: ImageGraphs, index: int) -> str:
    regions = graphs.spatial.regions
    name = f"{regions.attribute_names[index]} {regions.object_names[index]}".strip()
    return f"{index}: {name} {regions.object_scores[index]:.2f}"


def _draw_regions(axes: plt.Axes, graphs: ImageGraphs, drawn: list[int], focus: int | None, scale: float) -> None:
    boxes = graphs.spatial.regions.boxes
    for position, index in enumerate(drawn):
        x1, y1, x2, y2 = (float(value) for value in boxes[index])
        colour = PALETTE[position % len(PALETTE)]
        focused = index == focus
        axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red" if focused else colour,
                                 linewidth=3.0 if focused else 1.6))
        axes.text(x1 + 2 * scale, y1 + 2 * scale, _region_label(graphs, index), fontsize=7, color="white",
                  va="top", ha="left", clip_on=True,
                  bbox={"facecolor": "red" if focused else colour, "alpha": 0.75, "pad": 1.0, "edgecolor": "none"})


def _draw_triplets(axes: plt.Axes, graphs: ImageGraphs, top: int, scale: float) -> None:
    edges, boxes, names = graphs.scene.edges, graphs.scene.regions.boxes, graphs.scene.predicate_names
    drawn_per_pair: dict[tuple[int, int], int] = {}
    for rank in range(top):
        pair = (int(edges.subject[rank]), int(edges.object[rank]))
        start, end = _centre(boxes[pair[0]]), _centre(boxes[pair[1]])
        # A constant bend sign puts (i, j) and (j, i) on opposite sides of the line
        # between the centres. Further predicates of one pair bend further out.
        bend = 0.2 + 0.15 * drawn_per_pair.get(pair, 0)
        drawn_per_pair[pair] = drawn_per_pair.get(pair, 0) + 1
        colour = PALETTE[(rank + 3) % len(PALETTE)]
        axes.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, linewidth=1.8, color=colour,
                                       connectionstyle=f"arc3,rad={bend}", alpha=0.9))
        axes.text(*_arc_middle(axes, start, end, bend), f"{rank + 1}. {names[edges.predicate[rank]]}", fontsize=7,
                  color="black", ha="center", va="center", clip_on=True,
                  bbox={"facecolor": "white", "alpha": 0.8, "pad": 1.0, "edgecolor": colour})


def _arc_middle(axes: plt.Axes, start: tuple[float, float], end: tuple[float, float], bend: float) -> tuple[float, float]:
    """Return the data point halfway along matplotlib's ``arc3`` curve from ``start`` to ``end``.

    arc3 places its control point at the chord's middle plus ``bend`` times the chord
    turned by 90 degrees, in display coordinates. Halfway along the quadratic Bezier
    curve lies the chord's middle plus half that offset.
    """
    (x1, y1), (x2, y2) = axes.transData.transform([start, end])
    middle = ((x1 + x2) / 2 + 0.5 * bend * (y2 - y1), (y1 + y2) / 2 - 0.5 * bend * (x2 - x1))
    x, y = axes.transData.inverted().transform(middle)
    return float(x), float(y)


def _draw_spatial_labels(axes: plt.Axes, graphs: ImageGraphs, region: int, drawn: list[int]) -> None:
    labels, names, boxes = graphs.spatial.labels, graphs.spatial.label_names, graphs.spatial.regions.boxes
    for other in drawn:
        if other == region:
            continue
        x, y = _centre(boxes[other])
        axes.text(x, y, f"{region}\u2192{other}: {names[labels[region, other]]}", fontsize=7, color="white",
                  ha="center", va="center", clip_on=True,
                  bbox={"facecolor": "darkred", "alpha": 0.8, "pad": 1.0, "edgecolor": "none"})


def _text_lines(graphs: ImageGraphs, options: DrawOptions, top: int) -> list[str]:
    scene = graphs.scene
    lines = [options.title or f"{scene.image_id}  ({scene.image_size[1]} x {scene.image_size[0]} px, "
                              f"{len(scene.regions.object_names)} regions, {len(scene.edges)} scene-graph edges)"]
    if top:
        lines.append("scene-graph triplets (subject -> predicate -> object, score):")
        for rank in range(top):
            subject, object_ = int(scene.edges.subject[rank]), int(scene.edges.object[rank])
            lines.append(f"  {rank + 1}. {_region_label(graphs, subject)}  -> "
                         f"{scene.predicate_names[scene.edges.predicate[rank]]} ->  "
                         f"{_region_label(graphs, object_)}   ({scene.edges.score[rank]:.3f})")
    elif len(scene.predicate_names) <= 1:
        lines.append("no scene graph: the graphs stage ran without --relations or an import")
    if options.region is not None:
        lines.append(f"spatial labels of region {_region_label(graphs, options.region)} to the other drawn regions "
                     "are written at their centres")
    if options.caption is not None:
        lines += _caption_lines(options.caption)
    wrapped = []
    for line in lines:
        wrapped += textwrap.wrap(line, TEXT_WRAP_CHARACTERS, subsequent_indent="      ") or [""]
    return wrapped


def _caption_lines(caption: CaptionGraphs) -> list[str]:
    graph = caption.objects
    lines = [f"caption {caption.caption_index}: {caption.text}"]
    objects = [f"{obj.head_lemma}" + (f" ({', '.join(obj.modifiers)})" if obj.modifiers else "") for obj in graph.objects]
    lines.append("  objects: " + ("; ".join(objects) if objects else "none"))
    relations = [f"{graph.objects[s].head_lemma} -> {p} -> {graph.objects[o].head_lemma}" for s, o, p in graph.relations]
    lines.append("  relations: " + ("; ".join(relations) if relations else "none"))
    return lines


def _draw_text(figure: plt.Figure, lines: list[str], height_fraction: float) -> None:
    if not lines:
        return
    axes = figure.add_axes((0.0, 0.0, 1.0, height_fraction))
    axes.axis("off")
    axes.text(0.01, 0.98, "\n".join(lines), fontsize=8, family="monospace", va="top", ha="left",
              transform=axes.transAxes)
