"""``cmsei-prep export``: region shards to SCAN precomp files or a bottom-up-attention / LXMERT TSV."""

from __future__ import annotations

import argparse
import logging

from pipeline.exporters import EXPORT_FORMATS, ExportOptions, export_features

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write region shards as SCAN precomp .npy files or a bottom-up-attention / LXMERT TSV",
        description="Export the ok images of DATA/regions/ for SCAN, VSRN, SGRAF, GSMN, vse_infty or LXMERT code. "
        "Each output file is written under a temporary name and renamed when complete.",
    )
    parser.add_argument("--data", required=True, help="dataset folder with a regions stage")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="output format")
    parser.add_argument("--out", required=True,
                        help="output folder; for the TSV formats a path ending in .tsv names the file (default name: SPLIT.tsv)")
    parser.add_argument("--split", default="all",
                        help="'all' exports every ok image; another name needs --images-file and names the files, "
                        "e.g. test_ims.npy (default: all)")
    parser.add_argument("--images-file", help="text file of image ids, one per line, selecting and ordering the images")
    parser.add_argument("--num-regions", type=int,
                        help="scan: regions per image k; images with fewer are zero-padded (default: the common count)")
    parser.add_argument("--image-ext", default=".jpg",
                        help="TSV: suffix removed from image ids, as the TSV layouts store ids without it (default: .jpg)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run(args: argparse.Namespace) -> int:
    options = ExportOptions(
        data=args.data,
        out=args.out,
        format=args.format,
        split=args.split,
        images_file=args.images_file,
        num_regions=args.num_regions,
        image_ext=args.image_ext,
        overwrite=args.overwrite,
    )
    export_features(options)
    return 0
