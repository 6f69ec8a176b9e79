"""`cmsei-train`: train the CMSEI retrieval model on the shards of a dataset folder.

Expected errors (missing stages, bad options, an occupied run folder) end with one log line
and exit code 2; a non-finite loss ends with exit code 1. docs/training.md lists the options
and the files of a run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline import __version__
from pipeline.cli import setup_logging

logger = logging.getLogger("cmsei_model.cli_train")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of `cmsei-train`."""
    parser = argparse.ArgumentParser(
        prog="cmsei-train",
        description="Train the CMSEI image-sentence retrieval model on DATA/regions, DATA/graphs and "
                    "DATA/captions; write checkpoints and metrics to RUN.",
    )
    parser.add_argument("--version", action="version", version=f"cmsei {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--data", required=True, help="dataset folder with the regions and captions stages")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder for checkpoints and metrics")
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN from RUN/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="delete the run in RUN and start again")
    _add_data_arguments(parser)
    _add_optimisation_arguments(parser)
    _add_model_arguments(parser)
    _add_runtime_arguments(parser)
    return parser


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--train-split", default="train",
                       help="caption split(s) to train on, comma-separated, e.g. train,restval (default: train)")
    group.add_argument("--val-split", default="val", help="caption split to validate on (default: val)")
    group.add_argument("--holdout-fraction", type=float,
                       help="share of training images held out for validation, chosen by a hash of the image id, "
                            "when the captions name no --val-split (default: 0.2)")
    group.add_argument("--max-regions", type=int, help="keep at most this many regions per image (default: all)")
    group.add_argument("--max-words", type=int, help="keep at most this many words per caption (default: all)")
    group.add_argument("--val-max-images", type=int, default=1000,
                       help="validate on the first N validation images and their captions; 0 = all (default: 1000)")
    group.add_argument("--cache", action="store_true",
                       help="read every used image and caption into memory before training (default: read lazily)")
    group.add_argument("--loader-workers", type=int, default=2,
                       help="DataLoader worker processes that read the shards (default: 2)")


def _add_optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=30, help="total epochs (default: 30)")
    group.add_argument("--batch-size", type=int, default=128,
                       help="image-caption pairs per step and process, all of distinct images (default: 128)")
    group.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default: 2e-4)")
    group.add_argument("--lr-step", type=int, default=15,
                       help="multiply the learning rate by --lr-gamma every this many epochs (default: 15)")
    group.add_argument("--lr-gamma", type=float, default=0.1, help="learning-rate decay factor (default: 0.1)")
    group.add_argument("--grad-clip", type=float, default=2.0, help="maximum gradient L2 norm (default: 2)")
    group.add_argument("--margin", type=float, default=0.2, help="triplet loss margin (default: 0.2)")
    group.add_argument("--warmup-epochs", type=int, default=1,
                       help="epochs that sum the loss over all negatives before the hardest negative (default: 1)")
    group.add_argument("--seed", type=int, default=0, help="seed of weights, batch order and generators (default: 0)")
    group.add_argument("--max-steps-per-epoch", type=int,
                       help="end each epoch after this many steps, for smoke tests and benchmarks (default: all)")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--embed-size", type=int, default=1024, help="joint embedding size d (default: 1024)")
    group.add_argument("--word-dim", type=int, default=300, help="word embedding size (default: 300)")
    group.add_argument("--relation-threshold", type=float, default=0.0,
                       help="ignore scene-graph edges with a lower score (default: 0)")
    group.add_argument("--spatial-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="spatial graph reasoning (default: on when DATA/graphs exists)")
    group.add_argument("--semantic-graph", action=argparse.BooleanOptionalAction, default=None,
                       help="scene-graph reasoning (default: on when DATA/graphs exists)")
    group.add_argument("--interaction", action=argparse.BooleanOptionalAction, default=True,
                       help="word-region interactive attention (default: on)")
    group.add_argument("--cross-level", action=argparse.BooleanOptionalAction, default=True,
                       help="object-sentence and word-image attention (default: on)")
    group.add_argument("--baseline", action="store_true",
                       help="train the plain SCAN-style region-word attention baseline instead")
    group.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                       help="recompute pair activations in the backward pass; without it a batch of 128 at "
                            "d=1024 keeps about 30 GiB of activations (default: on)")
    group.add_argument("--pairs-per-chunk", type=int, default=4096,
                       help="image-caption pairs scored at once; peak memory grows with it (default: 4096)")


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    group.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="autocast precision; auto = bf16 (else fp16) on CUDA, fp32 on the CPU (default: auto)")
    group.add_argument("--threads", type=int,
                       help="torch CPU threads of the training process; 1 is often fastest on a busy machine "
                            "(default: torch's choice, usually one per core)")
    group.add_argument("--eval-batch-size", type=int, default=128,
                       help="images or captions per encoder batch during validation (default: 128)")
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def options_from_args(args: argparse.Namespace):
    """Build `TrainOptions` from parsed arguments."""
    from cmsei_model.train import TrainOptions

    return TrainOptions(
        data=args.data, out=args.out, train_split=args.train_split, val_split=args.val_split,
        holdout_fraction=args.holdout_fraction, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_step=args.lr_step, lr_gamma=args.lr_gamma, grad_clip=args.grad_clip, margin=args.margin,
        warmup_epochs=args.warmup_epochs, seed=args.seed, loader_workers=args.loader_workers, cache=args.cache,
        device=args.device, precision=args.precision, threads=args.threads,
        val_max_images=args.val_max_images or None, eval_batch_size=args.eval_batch_size,
        max_regions=args.max_regions, max_words=args.max_words, max_steps_per_epoch=args.max_steps_per_epoch,
        resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
        embed_size=args.embed_size, word_dim=args.word_dim, relation_threshold=args.relation_threshold,
        spatial_graph=args.spatial_graph, semantic_graph=args.semantic_graph, interaction=args.interaction,
        cross_level=args.cross_level, baseline=args.baseline, gradient_checkpointing=args.gradient_checkpointing,
        pairs_per_chunk=args.pairs_per_chunk,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `cmsei-train`; returns the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)

    from cmsei_model.train import train

    try:
        summary = train(options_from_args(args))
    except KeyboardInterrupt:
        logger.error("interrupted; rerun with --resume to continue from the last finished epoch")
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as error:
        if args.verbose:
            logger.exception("training failed")
        else:
            logger.error("%s", error)
        return 2
    except FloatingPointError as error:
        logger.error("%s", error)
        return 1
    logger.info("done: %d epochs, best validation rSum %.2f at epoch %d, run folder %s", summary.epochs_completed,
                summary.best_rsum, summary.best_epoch, summary.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
