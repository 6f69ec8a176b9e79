"""``cmsei-prep extract``: region features from a folder of images into region shards."""

from __future__ import annotations

import argparse
import logging

from pipeline.commands.ray_args import add_ray_arguments, ray_options_from_args
from pipeline.extract import DEFAULT_MAX_PIXELS, ExtractOptions, extract_images

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="detect regions and store boxes, features, classes and attributes in region shards",
        description="Run a Faster R-CNN over images in parallel with Ray and write DATA/regions/.",
    )
    parser.add_argument("--images", required=True, help="folder of images (searched recursively) or a text file listing image paths")
    parser.add_argument("--out", required=True, help="dataset folder; shards go to OUT/regions/ (storage every node sees)")
    parser.add_argument("--detector", default="butd-r101-c4", help="preset (butd-r101-c4, frcnn-r50-fpn, tiny) or a detector YAML file (default: butd-r101-c4)")
    parser.add_argument("--config", help="YAML file whose fields override the preset")
    parser.add_argument("--weights", help="checkpoint (.pth or .pkl), or 'untrained' to run random weights explicitly")
    parser.add_argument("--backend", default="torchvision", choices=["torchvision", "detectron2"], help="model implementation (default: torchvision)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--boxes", help="pool features at given boxes: JSON lines {image, boxes} or a synth annotations.json")
    parser.add_argument("--min-boxes", type=int, help="fewest regions kept per image (preset default 10)")
    parser.add_argument("--max-boxes", type=int, help="most regions kept per image (preset default 100)")
    parser.add_argument("--num-boxes", type=int, help="keep exactly this many regions per image, e.g. 36")
    parser.add_argument("--class-boxes", action="store_true", help="also store the class-regressed boxes")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass; 1 is exact, larger pads (default: 1)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard file (default: 1000)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored feature dtype (default: float16)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help=f"reject images whose header claims more pixels (default: {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--decode-threads", type=int, default=2, help="image decoding threads per worker (default: 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing regions stage built from other inputs or options")
    add_ray_arguments(parser)


def run(args: argparse.Namespace) -> int:
    overrides = {}
    for option, field in (("min_boxes", "min_boxes"), ("max_boxes", "max_boxes"), ("num_boxes", "num_boxes")):
        value = getattr(args, option)
        if value is not None:
            overrides[field] = value
    if args.class_boxes:
        overrides["store_class_boxes"] = True

    options = ExtractOptions(
        images=args.images,
        out=args.out,
        detector=args.detector,
        config=args.config,
        overrides=overrides,
        weights=args.weights,
        backend=args.backend,
        device=args.device,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        boxes=args.boxes,
        max_pixels=args.max_pixels,
        decode_threads=args.decode_threads,
        overwrite=args.overwrite,
        ray=ray_options_from_args(args),
    )
    summary = extract_images(options)
    return summary.exit_code
