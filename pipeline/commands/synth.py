"""The `cmsei-prep synth` subcommand: render synthetic shape scenes with captions and scene graphs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.synth import MAX_SIZE, MIN_SIZE, generate_scenes

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `synth` subcommand and its options on `subparsers`."""
    parser = subparsers.add_parser(
        "synth",
        help="Render synthetic scenes of coloured shapes with captions and ground-truth relations.",
        description=(
            "Write DIR/images/scene_*.png, DIR/captions.jsonl (5 captions per image) and "
            "DIR/annotations.json (boxes, labels, attributes and relations per image)."
        ),
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="Output folder; created when missing."
    )
    parser.add_argument(
        "--images", required=True, type=int, metavar="N", help="Number of images to render (>= 1)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Random seed, an int >= 0 (default: 0).")
    parser.add_argument(
        "--paired",
        action="store_true",
        help=(
            "Render consecutive pairs with the same shapes in swapped relations; "
            "--images must be even (default: off)."
        ),
    )
    parser.add_argument(
        "--size",
        type=int,
        default=256,
        help=f"Image side in pixels, {MIN_SIZE} to {MAX_SIZE} (default: 256).",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=(
            "Replace the output of an earlier run in DIR "
            "(default: stop when DIR already contains scenes or annotations.json)."
        ),
    )


def run(args: argparse.Namespace) -> int:
    """Render the scenes that `args` describes.

    Args:
        args: parsed options from the parser that `add_parser` built.

    Returns:
        0 on success, 2 on invalid options or an output folder that is in use,
        1 when writing fails.
    """
    try:
        summary = generate_scenes(
            out_dir=args.out,
            n_images=args.images,
            seed=args.seed,
            paired=args.paired,
            size=args.size,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as error:
        logger.error("synth: %s", error)
        return 2
    except OSError as error:
        logger.error("synth: failed to write scenes to %s: %s", args.out, error)
        return 1

    counts = ", ".join(f"{name}={count}" for name, count in summary.predicate_counts.items())
    logger.info(
        "synth: %d images in %s, %d objects, relations: %s.",
        summary.n_images,
        summary.out_dir,
        summary.n_objects,
        counts,
    )
    return 0
