"""``cmsei-prep import``: precomputed region features (TSV, SCAN precomp, .npz, .npy) into region shards.

The module name is a Python keyword, so the CLI loads it with
``importlib.import_module("pipeline.commands.import")``.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.importers import IMPORT_FORMATS
from pipeline.importers.stage import DEFAULT_BOX_TOLERANCE, ImportOptions, import_features

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="turn precomputed region features into region shards, as if extracted here",
        description="Read bottom-up-attention or LXMERT TSV, SCAN precomp, bottom-up-attention.pytorch .npz or "
        "MMF .npy features and write DATA/regions/ like `cmsei-prep extract`. Bad rows are recorded as failed "
        "images with the line and the reason; the rest is imported. Rerun the same command to resume.",
    )
    parser.add_argument("--source", required=True, nargs="+",
                        help="TSV file(s), SCAN precomp folder or {split}_ims.npy file, or folder of per-image .npz/.npy files")
    parser.add_argument("--out", required=True, help="dataset folder; shards go to OUT/regions/")
    parser.add_argument("--format", default="auto", choices=["auto", *IMPORT_FORMATS],
                        help="source format (default: auto, detected from the content)")
    parser.add_argument("--split", help="SCAN split to import, e.g. test for test_ims.npy (needed when the folder contains several)")
    parser.add_argument("--image-ext", default=".jpg",
                        help="appended to source ids without an image extension, so ids name the image files "
                        "(default: .jpg; pass '' to keep ids unchanged)")
    parser.add_argument("--id-template",
                        help="image id template with {id}, {row} and {split}, e.g. 'COCO_val2014_{id:0>12}.jpg'; replaces --image-ext")
    parser.add_argument("--objects-vocab", help="object vocabulary, one class per line, first comma-separated synonym used")
    parser.add_argument("--attributes-vocab", help="attribute vocabulary in the same layout")
    parser.add_argument("--feature-dim", type=int, help="feature size D (default: inferred from the source)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                        help="stored feature dtype; float32 keeps float32 sources bit-exact (default: float16)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard file (default: 1000)")
    parser.add_argument("--box-tolerance", type=float, default=DEFAULT_BOX_TOLERANCE,
                        help=f"pixels a box may reach beyond the image border (default: {DEFAULT_BOX_TOLERANCE:g})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing regions stage built from another source or options")


def run(args: argparse.Namespace) -> int:
    options = ImportOptions(
        sources=args.source,
        out=args.out,
        format=args.format,
        split=args.split,
        image_ext=args.image_ext,
        id_template=args.id_template,
        objects_vocab=args.objects_vocab,
        attributes_vocab=args.attributes_vocab,
        feature_dim=args.feature_dim,
        dtype=args.dtype,
        shard_size=args.shard_size,
        box_tolerance=args.box_tolerance,
        overwrite=args.overwrite,
    )
    summary = import_features(options)
    return summary.exit_code
