"""Benchmark CMSEI training samples/s and evaluation pairs/s on the CPU or a GPU.

Shape shorthand: B pairs per training batch, k regions, n words, d embedding size.

Inputs are random tensors with the shapes of real data: k regions of 2048-dim features with
boxes, spatial labels and 25 scene-graph edges per image, and captions of n words over a
10,000-word vocabulary. The defaults are d = 1024, k = 36 and n = 12.

- Training: full optimiser steps as `cmsei-train` runs them (forward, bidirectional
  hardest-negative triplet loss over the (B, B) scores, backward, gradient clipping, Adam),
  with gradient checkpointing, for each batch size of `--train-batch-sizes`. A step scores
  B * B pairs, so samples/s falls roughly as 1 / B for large B.
- Evaluation: encode the images and captions once, then score every pair with
  `similarity_matrix` as `cmsei-eval` does, and compute the recall metrics. `--eval-images`
  and `--eval-captions` set the size (1,000 and 5,000 for a Flickr30K-style 1K test set).
  `--chunk-sizes` first times the scoring of 100 images x 500 captions with each given
  number of pairs per chunk.

Run from the repository root:

    .venv/bin/python benchmarks/bench_model.py [--eval-images 100 --eval-captions 500] [--json out.json]

It prints a Markdown table for docs/benchmarks-model.md.
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmsei_model.config import CMSEIConfig  # noqa: E402
from cmsei_model.distributed import resolve_device  # noqa: E402
from cmsei_model.evaluate import recall_metrics, similarity_matrix  # noqa: E402
from cmsei_model.loss import triplet_ranking_loss  # noqa: E402
from cmsei_model.model import CMSEI, CaptionEmbedding, ImageEmbedding  # noqa: E402
from pipeline.atomic import write_json  # noqa: E402

logger = logging.getLogger(__name__)

FEATURE_DIM = 2048
VOCAB_SIZE = 10_000
EDGES = 25
NUM_PREDICATES = 51


def random_images(count: int, regions: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Return `CMSEI.encode_images` inputs for `count` images of `regions` regions."""
    corners = torch.rand(count, regions, 2, generator=generator) * 0.6
    sizes = 0.05 + torch.rand(count, regions, 2, generator=generator) * 0.35
    return {
        "features": torch.randn(count, regions, FEATURE_DIM, generator=generator).abs(),
        "region_mask": torch.ones(count, regions, dtype=torch.bool),
        "boxes_norm": torch.cat([corners, corners + sizes], dim=-1),
        "spatial_labels": torch.randint(0, 12, (count, regions, regions), generator=generator, dtype=torch.uint8),
        "sg_edges": torch.randint(0, regions, (count, EDGES, 2), generator=generator),
        "sg_predicates": torch.randint(1, NUM_PREDICATES, (count, EDGES), generator=generator),
        "sg_scores": torch.rand(count, EDGES, generator=generator),
        "sg_mask": torch.ones(count, EDGES, dtype=torch.bool),
    }


def random_captions(count: int, words: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Return `CMSEI.encode_captions` inputs for `count` captions of `words` words."""
    return {
        "token_ids": torch.randint(4, VOCAB_SIZE, (count, words), generator=generator),
        "lengths": torch.full((count,), words, dtype=torch.int64),
    }


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_training(config: CMSEIConfig, batch_size: int, steps: int, regions: int, words: int,
                   device: torch.device) -> dict[str, Any]:
    """Time `steps` optimiser steps after one warm-up step; return samples/s and scored pairs/s."""
    generator = torch.Generator().manual_seed(batch_size)
    model = CMSEI(config, VOCAB_SIZE).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    images = _to(random_images(batch_size, regions, generator), device)
    captions = _to(random_captions(batch_size, words, generator), device)
    image_ids = torch.arange(batch_size, device=device)

    def step() -> None:
        similarity = model(**images, **captions)
        loss = triplet_ranking_loss(similarity, config.margin, hardest_negative=True, image_ids=image_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()

    step()
    _synchronise(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronise(device)
    seconds = (time.perf_counter() - started) / steps
    return {
        "batch_size": batch_size,
        "seconds_per_step": seconds,
        "samples_per_s": batch_size / seconds,
        "pairs_per_s": batch_size * batch_size / seconds,
    }


@torch.no_grad()
def bench_evaluation(config: CMSEIConfig, n_images: int, n_captions: int, regions: int, words: int,
                     device: torch.device, chunk_sizes: list[int], encode_batch: int = 128) -> dict[str, Any]:
    """Encode and score an n_images x n_captions test set; return encode time and scored pairs/s.

    Each size in `chunk_sizes` is first timed on the first 100 images x 500 captions.
    """
    generator = torch.Generator().manual_seed(0)
    model = CMSEI(config, VOCAB_SIZE).to(device).eval()

    started = time.perf_counter()
    image_blocks, caption_blocks = [], []
    for start in range(0, n_images, encode_batch):
        count = min(encode_batch, n_images - start)
        encoded = model.encode_images(**_to(random_images(count, regions, generator), device))
        image_blocks.append(encoded.to("cpu"))
    for start in range(0, n_captions, encode_batch):
        count = min(encode_batch, n_captions - start)
        encoded = model.encode_captions(**_to(random_captions(count, words, generator), device))
        caption_blocks.append(encoded.to("cpu"))
    images = ImageEmbedding(*(torch.cat([getattr(b, name) for b in image_blocks])
                              for name in ("regions", "region_mask", "image_vector")))
    captions = CaptionEmbedding(*(torch.cat([getattr(b, name) for b in caption_blocks])
                                  for name in ("words", "word_mask", "sentence")))
    _synchronise(device)
    encode_seconds = time.perf_counter() - started

    chunks = [_time_chunk_size(model, images, captions, size, device) for size in chunk_sizes]

    started = time.perf_counter()
    scores = similarity_matrix(model, images, captions, progress=True)
    _synchronise(device)
    score_seconds = time.perf_counter() - started

    started = time.perf_counter()
    captions_per_image = n_captions // n_images if n_captions % n_images == 0 else None
    metrics = recall_metrics(scores, captions_per_image) if captions_per_image else {}
    rank_seconds = time.perf_counter() - started
    pairs = n_images * n_captions
    return {
        "images": n_images,
        "captions": n_captions,
        "encode_seconds": encode_seconds,
        "score_seconds": score_seconds,
        "rank_seconds": rank_seconds,
        "pairs_per_s": pairs / score_seconds,
        "rsum_untrained": metrics.get("rsum"),
        "chunk_sizes": chunks,
    }


def _time_chunk_size(model: CMSEI, images: ImageEmbedding, captions: CaptionEmbedding, pairs_per_chunk: int,
                     device: torch.device) -> dict[str, Any]:
    """Time `similarity_matrix` with a given chunk size on the first 100 images and 500 captions."""
    images = images.slice(0, 100)
    captions = captions.slice(0, 500)
    started = time.perf_counter()
    similarity_matrix(model, images, captions, max_pairs_per_chunk=pairs_per_chunk)
    _synchronise(device)
    seconds = time.perf_counter() - started
    result = {"pairs_per_chunk": pairs_per_chunk, "pairs": len(images) * len(captions), "seconds": seconds,
              "pairs_per_s": len(images) * len(captions) / seconds}
    logger.info("chunks of %d pairs: %.0f pairs/s", pairs_per_chunk, result["pairs_per_s"])
    return result


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embed-size", type=int, default=1024, help="d (default: 1024)")
    parser.add_argument("--regions", type=int, default=36, help="k regions per image (default: 36)")
    parser.add_argument("--words", type=int, default=12, help="n words per caption (default: 12)")
    parser.add_argument("--train-batch-sizes", type=int, nargs="*", default=[8, 16, 32],
                        help="training batch sizes to time (default: 8 16 32)")
    parser.add_argument("--train-steps", type=int, default=2, help="timed steps per batch size (default: 2)")
    parser.add_argument("--eval-images", type=int, default=100, help="test images (default: 100)")
    parser.add_argument("--eval-captions", type=int, default=500, help="test captions (default: 500)")
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[],
                        help="pairs per chunk to time on 100 images x 500 captions before the evaluation")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = CMSEIConfig(embed_dim=args.embed_size, gradient_checkpointing=True, validate_inputs=False)
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "device": str(device),
        "torch": torch.__version__,
        "embed_size": args.embed_size,
        "regions": args.regions,
        "words": args.words,
        "training": [],
    }
    for batch_size in args.train_batch_sizes:
        result = bench_training(config, batch_size, args.train_steps, args.regions, args.words, device)
        logger.info("training batch %d: %.2f s per step, %.2f samples/s, %.0f pairs/s", batch_size,
                    result["seconds_per_step"], result["samples_per_s"], result["pairs_per_s"])
        results["training"].append(result)

    results["evaluation"] = bench_evaluation(config, args.eval_images, args.eval_captions, args.regions,
                                             args.words, device, args.chunk_sizes)
    results["peak_rss_mib"] = _peak_rss_mib()
    logger.info("evaluation: %s", results["evaluation"])
    print(format_markdown(results))
    if args.json:
        write_json(args.json, results)
    return 0


def format_markdown(results: dict[str, Any]) -> str:
    """Return the results as Markdown tables."""
    lines = [
        f"d = {results['embed_size']}, k = {results['regions']}, n = {results['words']}, {results['device']}, "
        f"torch {results['torch']}, {results['machine']}",
    ]
    if results["training"]:
        lines += ["", "| training batch B | s per step | samples/s | scored pairs/s |", "| --- | --- | --- | --- |"]
    for row in results["training"]:
        lines.append(f"| {row['batch_size']} | {row['seconds_per_step']:.2f} | {row['samples_per_s']:.2f} | "
                     f"{row['pairs_per_s']:.0f} |")
    evaluation = results["evaluation"]
    lines += [
        "",
        "| evaluation | encode s | score s | rank s | pairs/s |",
        "| --- | --- | --- | --- | --- |",
        f"| {evaluation['images']} images x {evaluation['captions']} captions | {evaluation['encode_seconds']:.1f} | "
        f"{evaluation['score_seconds']:.1f} | {evaluation['rank_seconds']:.1f} | {evaluation['pairs_per_s']:.0f} |",
    ]
    if evaluation["chunk_sizes"]:
        lines += ["", "| pairs per chunk | pairs scored | s | pairs/s |", "| --- | --- | --- | --- |"]
        lines += [f"| {row['pairs_per_chunk']} | {row['pairs']} | {row['seconds']:.1f} | {row['pairs_per_s']:.0f} |"
                  for row in evaluation["chunk_sizes"]]
    lines += [
        "",
        f"peak resident memory {results['peak_rss_mib']:.0f} MiB",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
