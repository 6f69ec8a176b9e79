"""``cmsei-prep train-relations``: train the relation predictor on annotated relations.

The dataset folder must hold regions extracted at the annotated boxes
(``cmsei-prep extract --boxes ANNOTATIONS``), so region k of an image is annotation
object k. A fraction of the images is held out and the predicate recall@20/50/100 on
them is logged, stored in the checkpoint and, with ``--report``, written as JSON.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pipeline.atomic import write_json

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-relations",
        help="train the relation predictor on Visual-Genome-style relation annotations",
        description="Train a relation predictor on regions pooled at annotated boxes (extract --boxes) and the "
                    "annotated relation triplets, report predicate recall@K on held-out images and save a checkpoint "
                    "for `cmsei-prep graphs --relations`.",
    )
    parser.add_argument("--data", required=True, help="dataset folder whose regions were extracted with --boxes ANNOTATIONS")
    parser.add_argument("--annotations", required=True, help="annotations.json: images[].objects[].box/label and images[].relations[] subject/predicate/object")
    parser.add_argument("--out", required=True, help="checkpoint file to write (atomically)")
    parser.add_argument("--predicates", help="VG-SGG-dicts-with-attri.json whose idx_to_predicate gives the predicate vocabulary (default: the annotation file's 'predicates')")
    parser.add_argument("--classes", choices=["detector", "annotations"], default="detector",
                        help="object classes to train with: the detector's predicted object_ids (what inference sees) or the annotated labels mapped to the detector's class names (default: detector)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training images (default: 10)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 0.003)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the held-out split, negative sampling and dropout (default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--negative-ratio", type=float, default=3.0, help="unrelated pairs sampled per relation of an image (default: 3)")
    parser.add_argument("--images-per-batch", type=int, default=16, help="images per optimiser step (default: 16)")
    parser.add_argument("--hidden-dim", type=int, default=256, help="width of the pair MLP (default: 256)")
    parser.add_argument("--embed-dim", type=int, default=64, help="size of the object class embedding (default: 64)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout probability in the pair MLP (default: 0.1)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the annotated images held out for recall@K (default: 0.1)")
    parser.add_argument("--report", help="also write the training report (counts, losses, recall, skipped images) to this JSON file")


def run(args: argparse.Namespace) -> int:
    from graphs.predicates import load_vg150_vocab
    from graphs.relation_data import load_training_set, read_relation_annotations, split_images
    from graphs.train_relations import save_checkpoint, train_relation_predictor
    from pipeline.dataset import DatasetFolder

    data = DatasetFolder(args.data)
    vocabulary = load_vg150_vocab(args.predicates).predicate_names if args.predicates else None
    annotations = read_relation_annotations(args.annotations, vocabulary)
    training_set = load_training_set(data, annotations, args.classes)
    _log_skipped(training_set.skipped)

    train_ids, val_ids = split_images(list(training_set.samples), args.val_fraction, args.seed)
    logger.info("%d training images, %d held out, %d skipped", len(train_ids), len(val_ids), len(training_set.skipped))
    model, metrics = train_relation_predictor(
        [training_set.samples[i] for i in train_ids], annotations.predicate_names, len(training_set.object_names),
        training_set.feature_dim, args.epochs, args.lr, args.seed, args.device,
        negative_ratio=args.negative_ratio, images_per_batch=args.images_per_batch, embed_dim=args.embed_dim,
        hidden_dim=args.hidden_dim, dropout=args.dropout,
    )
    recall = _held_out_recall(model, [training_set.samples[i] for i in val_ids])

    report = _report(args, data, annotations, training_set, len(train_ids), len(val_ids), metrics, recall)
    save_checkpoint(args.out, model, report)
    if args.report:
        import torch

        write_json(args.report, report | {"skipped": training_set.skipped, "torch": torch.__version__})
    _log_result(args.out, metrics, recall)
    return 0


def _log_skipped(skipped: dict[str, str], listed: int = 10) -> None:
    for image_id, reason in list(skipped.items())[:listed]:
        logger.warning("skipped %s: %s", image_id, reason)
    if len(skipped) > listed:
        logger.warning("... %d more images skipped (see --report)", len(skipped) - listed)


def _report(args: argparse.Namespace, data: Any, annotations: Any, training_set: Any, train_images: int,
            val_images: int, metrics: dict[str, Any], recall: dict[str, float] | None) -> dict[str, Any]:
    """Return the training record stored in the checkpoint's meta (JSON types only)."""
    from graphs.relation_data import object_names_digest
    from pipeline.dataset import REGIONS
    from pipeline.manifest import read_manifest

    regions_manifest = read_manifest(data.stage_dir(REGIONS)) or {}
    return {
        "data": str(data.root),
        "annotations": str(args.annotations),
        "annotations_sha256": annotations.sha256,
        "regions_config_digest": regions_manifest.get("config_digest"),
        "object_names_sha256": object_names_digest(training_set.object_names),
        "class_source": args.classes,
        "train_images": train_images,
        "val_images": val_images,
        "skipped_images": len(training_set.skipped),
        "settings": {"epochs": args.epochs, "lr": args.lr, "seed": args.seed, "negative_ratio": args.negative_ratio,
                     "images_per_batch": args.images_per_batch, "val_fraction": args.val_fraction},
        "training": metrics,
        "recall": recall,
    }


def _held_out_recall(model: Any, samples: list[dict]) -> dict[str, float] | None:
    from graphs.train_relations import evaluate_recall

    if not samples:
        logger.warning("no held-out images (--val-fraction 0), so no recall is reported")
        return None
    try:
        return evaluate_recall(model, samples, ks=(20, 50, 100))
    except ValueError as error:
        logger.warning("held-out recall not computed: %s", error)
        return None


def _log_result(out: str, metrics: dict[str, Any], recall: dict[str, float] | None) -> None:
    logger.info("trained on %d images with %d relations in %.1f s on %s; final loss %.4f",
                metrics["images"], metrics["relations"], metrics["seconds"], metrics["device"], metrics["final_loss"])
    if recall is not None:
        logger.info("held-out predicate recall@20 %.3f, @50 %.3f, @100 %.3f over %d triplets in %d images",
                    recall["recall@20"], recall["recall@50"], recall["recall@100"], recall["triplets"], recall["images"])
    logger.info("saved the relation predictor to %s", out)
