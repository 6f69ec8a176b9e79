"""`cmsei-eval`: retrieval metrics of a trained run on one split of a dataset folder.

Encodes every image and caption of the split once, scores the pairs block by block and
reports R@1, R@5, R@10 for image-to-text and text-to-image retrieval, their sum (rSum) and
the median and mean ranks. The result is written to `RUN/eval-<split>.json` and printed as
a table, or as JSON with `--json`. Protocols are described in `cmsei_model/retrieval.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cmsei_model.checkpoint import BEST, LAST, build_model, load_checkpoint
from cmsei_model.data import (
    DataError,
    ReaderOptions,
    ShardReader,
    SplitPlan,
    build_pair_index,
    inspect_graphs,
    limit_captions,
    select_eval_split,
)
from cmsei_model.distributed import resolve_device
from cmsei_model.retrieval import PROTOCOLS, ScoringOptions, encode_split, evaluate_encoded
from cmsei_model.train import resolve_precision
from pipeline import __version__
from pipeline.atomic import write_json
from pipeline.cli import setup_logging

logger = logging.getLogger("cmsei_model.cli_eval")

METRIC_ROWS = (("i2t", "image-to-text"), ("t2i", "text-to-image"))


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of `cmsei-eval`."""
    parser = argparse.ArgumentParser(prog="cmsei-eval", description="Evaluate a cmsei-train run on one split.")
    parser.add_argument("--version", action="version", version=f"cmsei {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--run", required=True, help="run folder written by cmsei-train")
    parser.add_argument("--split", default="test", help="caption split to evaluate (default: test)")
    parser.add_argument("--data", help="dataset folder (default: the one the run was trained on)")
    parser.add_argument("--checkpoint", default="best", choices=["best", "last"],
                        help="RUN/best.pt or RUN/last.pt (default: best)")
    parser.add_argument("--protocol", default="5k", choices=PROTOCOLS,
                        help="5k: all images of the split; 1k: the first --fold-size images; coco-5fold: mean "
                             "over 5 folds of --fold-size images (default: 5k)")
    parser.add_argument("--fold-size", type=int, default=1000, help="images per fold for 1k and coco-5fold (default: 1000)")
    parser.add_argument("--captions-per-image", type=int, default=5,
                        help="use the first N captions of each image, by caption index; 0 = all (default: 5)")
    parser.add_argument("--block-size", type=int,
                        help="image-caption pairs scored at once; peak memory grows with it "
                             "(default: a cache-sized chunk on the CPU, the run's --pairs-per-chunk on a GPU)")
    parser.add_argument("--batch-size", type=int, default=128, help="images or captions per encoder batch (default: 128)")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader worker processes (default: 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast precision of encoding and scoring (default: fp32)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    return parser


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the run that `args` describe and return the result written to `eval-<split>.json`.

    Raises:
        CheckpointError: when the checkpoint is missing or unreadable.
        DataError: when the split or a stage is missing.
        ValueError: for invalid options or too few images for the protocol.
    """
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {args.block_size}")
    if args.captions_per_image < 0 or args.batch_size < 1 or args.loader_workers < 0:
        raise ValueError("--captions-per-image and --loader-workers must be >= 0 and --batch-size >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run)
    checkpoint_path = run_dir / (BEST if args.checkpoint == "best" else LAST)
    checkpoint = load_checkpoint(checkpoint_path)
    model, vocabulary = build_model(checkpoint)
    options = dict(checkpoint["options"])
    data_root = Path(args.data or options["data"])

    pairs = build_pair_index(data_root)
    split_pairs = select_eval_split(pairs, args.split, SplitPlan.from_dict(dict(checkpoint["splits"])))
    split_pairs = limit_captions(split_pairs, args.captions_per_image or None)
    _check_graphs(model.config, data_root, split_pairs, list(checkpoint["predicate_names"]))

    device = resolve_device(args.device)
    autocast_dtype, _ = resolve_precision(args.precision, device)
    model.to(device)
    reader = ShardReader(data_root, vocabulary, ReaderOptions(
        spatial_graph=model.config.spatial_graph, semantic_graph=model.config.semantic_graph,
        max_regions=options.get("max_regions"), max_words=options.get("max_words"),
    ))
    started = time.perf_counter()
    encoded = encode_split(model, reader, split_pairs, device, args.batch_size, args.loader_workers, autocast_dtype)
    scoring = ScoringOptions(max_pairs_per_chunk=args.block_size, autocast_dtype=autocast_dtype, progress=True)
    result = evaluate_encoded(model, encoded, args.protocol, args.fold_size, scoring)
    reader.close()

    result.update({
        "run": str(run_dir),
        "checkpoint": args.checkpoint,
        "epoch": int(checkpoint["epoch"]),
        "data": str(data_root),
        "split": args.split,
        "captions_per_image": args.captions_per_image or "all",
        "device": str(device),
        "precision": args.precision,
        "encode_seconds": encoded.seconds,
        "total_seconds": time.perf_counter() - started,
    })
    write_json(run_dir / f"eval-{args.split}.json", result)
    return result


def _check_graphs(config: Any, data_root: Path, pairs: Any, predicate_names: list[str]) -> None:
    """Raise DataError when the model needs graph shards that the dataset folder lacks or that differ."""
    if not (config.spatial_graph or config.semantic_graph):
        return
    graphs = inspect_graphs(data_root, sorted(set(pairs["region_shard"])))
    if not graphs.available:
        raise DataError(
            f"the model uses graphs but {data_root}/graphs contains no graph shards; run `cmsei-prep graphs "
            f"--data {data_root}` with the options used for training"
        )
    if config.semantic_graph and list(graphs.predicate_names) != predicate_names:
        raise DataError(
            f"the graph shards of {data_root} name other predicates than the model was trained with; "
            f"rebuild them with the relation predictor used for training"
        )


def format_table(result: dict[str, Any]) -> str:
    """Return the result as a plain-text table."""
    metrics = result["metrics"]
    lines = [
        f"split {result['split']}, protocol {result['protocol']}: {result['num_images']} images, "
        f"{result['num_captions']} captions ({result['checkpoint']} checkpoint, epoch {result['epoch']})",
        f"{'':15}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'meanr':>8}",
    ]
    for prefix, name in METRIC_ROWS:
        values = [metrics[f"{prefix}_r1"], metrics[f"{prefix}_r5"], metrics[f"{prefix}_r10"],
                  metrics[f"{prefix}_medr"], metrics[f"{prefix}_meanr"]]
        lines.append(f"{name:15}" + "".join(f"{value:8.1f}" for value in values))
    lines.append(f"{'rSum':15}{metrics['rsum']:8.1f}")
    lines.append(f"scored {result['pairs_scored']} pairs in {result['seconds']:.1f} s "
                 f"({result['pairs_per_s']:.0f} pairs/s on {result['device']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `cmsei-eval`; returns the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        result = evaluate_run(args)
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except (ValueError, FileNotFoundError, PermissionError) as error:
        if args.verbose:
            logger.exception("evaluation failed")
        else:
            logger.error("%s", error)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
