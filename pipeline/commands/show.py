"""``cmsei-prep show``: draw one image with its regions, scene-graph triplets and spatial labels."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "show",
        help="draw an image with its regions, top scene-graph triplets and spatial labels into a PNG",
        description="Draw the image of a dataset folder with its region boxes and labels, the top scene-graph "
                    "triplets as arrows, optionally one region's spatial labels to the others and one caption's "
                    "objects and relations. Needs the regions and graphs stages.",
    )
    parser.add_argument("--data", required=True, help="dataset folder with regions and graphs stages")
    parser.add_argument("--image", required=True, help="image id, as listed by `cmsei-prep inspect` (path relative to --images)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--images", help="folder the image ids are relative to (default: the file the regions stage "
                                         "read; needed for imported features, whose source is a feature file)")
    parser.add_argument("--region", type=int, help="also write this region's spatial label to every other drawn region")
    parser.add_argument("--caption", type=int, help="also list caption N of the image (its caption index) with its objects and relations")
    parser.add_argument("--top-triplets", type=int, default=10, help="scene-graph triplets drawn, highest scores first (default: 10)")
    parser.add_argument("--max-regions", type=int, default=20, help="regions drawn, highest detector scores first, plus those in drawn triplets (default: 20)")


def run(args: argparse.Namespace) -> int:
    from extractors.images import decode_image
    from graphs.draw import DrawOptions, draw_image_graphs
    from graphs.image_graphs import load_image_graphs
    from pipeline.dataset import REGIONS, DatasetFolder
    data = DatasetFolder(args.data)
    try:
        graphs = load_image_graphs(data, args.image)
    except KeyError as error:
        raise ValueError(str(error).strip("'\"")) from None

    image_path = _image_path(data.stage_dir(REGIONS), args.image, args.images)
    pixels = decode_image(image_path).pixels
    if tuple(pixels.shape[:2]) != tuple(graphs.spatial.image_size):
        logger.warning("%s is %d x %d px now but the regions were extracted from a %d x %d px image; "
                       "the boxes may not fit", image_path, pixels.shape[1], pixels.shape[0],
                       graphs.spatial.image_size[1], graphs.spatial.image_size[0])

    caption = _caption(data, args.image, args.caption) if args.caption is not None else None
    options = DrawOptions(max_regions=args.max_regions, top_triplets=args.top_triplets, region=args.region,
                          caption=caption)
    draw_image_graphs(pixels, graphs, args.out, options)
    return 0


def _image_path(regions_dir: Path, image_id: str, images: str | None) -> Path:
    """Return the image file: ``--images/ID`` when given, else the path the regions stage read."""
    from pipeline.manifest import read_listing

    if images:
        image_path = Path(images) / image_id
    else:
        listing = read_listing(regions_dir)
        paths = listing.loc[listing["image_id"] == image_id, "path"]
        image_path = Path(str(paths.iloc[0])) if len(paths) else None
    if image_path is None or not image_path.is_file():
        raise FileNotFoundError(f"the image file of {image_id!r} ({image_path}) is missing; pass --images DIR, the "
                                "folder that holds the original images under their ids")
    return image_path


def _caption(data, image_id: str, caption_index: int):
    from graphs.textual import read_caption_graphs

    captions = read_caption_graphs(data, image_id)
    for graphs in captions:
        if graphs.caption_index == caption_index:
            return graphs
    available = [graphs.caption_index for graphs in captions]
    raise ValueError(f"image {image_id!r} has no parsed caption {caption_index}; its caption indices are {available}")
