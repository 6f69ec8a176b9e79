"""Benchmark the relation predictor on synthetic scenes: does it recover the generator's relations?

Pipeline, each step through the ``cmsei-prep`` command line:

1. ``synth``: TRAIN + HELD_OUT scenes of 2 to 4 shapes with every true relation recorded;
2. ``extract --boxes annotations.json`` with the ``tiny`` detector and untrained weights,
   so region k of a scene is its annotated object k;
3. ``train-relations`` with ``--val-fraction HELD_OUT / (TRAIN + HELD_OUT)``;
4. ``graphs --relations`` over all scenes, for its throughput.

Then the held-out scenes of step 3 (same seed, same split) are ranked again in this
process to report recall@K at more cut-offs, recall@20 per predicate, and the same
figures for an untrained predictor. The script prints a Markdown report and writes it
to docs/benchmarks-graphs.md.

Run: .venv/bin/python benchmarks/bench_relations.py [--train-images 600] [--held-out-images 100] [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from graphs.relation_data import load_training_set, read_relation_annotations, split_images  # noqa: E402
from graphs.predictor import RelationPredictor  # noqa: E402
from graphs.train_relations import load_checkpoint  # noqa: E402
from pipeline.atomic import atomic_path  # noqa: E402
from pipeline.dataset import DatasetFolder  # noqa: E402

logger = logging.getLogger("bench_relations")

DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks-graphs.md"
CUTOFFS = (5, 10, 20, 50, 100)


def run_step(name: str, arguments: list[str], log_dir: Path) -> float:
    """Run one ``cmsei-prep`` command, log its output to a file, and return its wall time in seconds.

    Raises:
        RuntimeError: when the command exits with a non-zero status; the message names the log.
    """
    command = [sys.executable, "-m", "pipeline.cli", *arguments]
    log_path = log_dir / f"{name}.log"
    logger.info("%s: %s", name, " ".join(arguments))
    started = time.monotonic()
    with log_path.open("w") as log:
        result = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"step {name} failed with exit code {result.returncode}; see {log_path}")
    return seconds


def ranked_triplets(model: RelationPredictor, sample: dict, top_k: int) -> list[tuple[int, int, int]]:
    pairs, predicates, _ = model.predict_image(sample["features"], sample["object_ids"], sample["boxes"],
                                               tuple(sample["image_size"]), top_k=top_k)
    return [(int(s), int(o), int(p)) for (s, o), p in zip(pairs, predicates)]


def recall_figures(model: RelationPredictor, samples: list[dict]) -> dict:
    """Return pooled recall@K for every cut-off, R-precision and recall@20 per predicate.

    R-precision is recall@K with K set per scene to its number of ground-truth triplets,
    so a perfect ranking reaches 1. Repeated ground-truth triplets count once.
    """
    hits = Counter()
    r_precision_hits, scenes, best_at_5 = 0, 0, 0
    per_predicate_hits, per_predicate_total = Counter(), Counter()
    total = 0
    for sample in samples:
        truth = {tuple(int(v) for v in row) for row in np.asarray(sample["relations"]).tolist()}
        if not truth:
            continue
        ranked = ranked_triplets(model, sample, max(CUTOFFS))
        total += len(truth)
        for k in CUTOFFS:
            hits[k] += len(truth.intersection(ranked[:k]))
        r_precision_hits += len(truth.intersection(ranked[:len(truth)]))
        scenes += 1
        best_at_5 += min(5, len(truth))
        top20 = set(ranked[:20])
        for triplet in truth:
            per_predicate_total[triplet[2]] += 1
            per_predicate_hits[triplet[2]] += triplet in top20
    return {
        "triplets": total,
        "recall": {k: hits[k] / total for k in CUTOFFS},
        "r_precision": r_precision_hits / total,
        "mean_triplets": total / scenes,
        "best_recall_at_5": best_at_5 / total,
        "per_predicate": {p: (per_predicate_hits[p] / per_predicate_total[p], per_predicate_total[p])
                          for p in sorted(per_predicate_total)},
    }


def untrained_model(trained: RelationPredictor, seed: int) -> RelationPredictor:
    torch.manual_seed(seed)
    config = trained.config()
    config["num_frequency_pairs"] = 0
    return RelationPredictor(**config).eval()


def format_report(args: argparse.Namespace, times: dict, report: dict, trained: dict, untrained: dict,
                  names: tuple[str, ...], graphs_summary: dict, load: tuple[float, float]) -> str:
    total_images = args.train_images + args.held_out_images
    lines = [
        "# Relation predictor benchmark",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_relations.py --train-images {args.train_images} "
        f"--held-out-images {args.held_out_images} --epochs {args.epochs} --seed {args.seed}`",
        "",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, device {report['training']['device']}. "
        f"1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end (other processes shared "
        "the CPUs, so the times are upper bounds).",
        f"- Data: {total_images} synthetic scenes of 256 x 256 px from `cmsei-prep synth --seed {args.seed}` "
        f"(2 to 4 shapes each, every true relation of 7 predicates recorded). Regions were pooled at the annotated "
        "boxes by the `tiny` detector with untrained weights (256 features, 1600 classes whose predicted ids "
        "carry no meaning). The predictor can use the box geometry and whatever the random features keep of shape and "
        "colour.",
        f"- Training: {report['train_images']} scenes, {report['training']['relations']} relations, "
        f"{args.epochs} epochs, lr 0.003, negative ratio 3, 16 images per step, classes from the detector. "
        f"Held out: {report['val_images']} scenes, {trained['triplets']} triplets (split by `--seed`).",
        "",
        "Wall time per step (seconds; Ray start-up included in extract and graphs):",
        "",
        "| synth | extract --boxes | train-relations | graphs --relations |",
        "| --- | --- | --- | --- |",
        f"| {times['synth']:.1f} | {times['extract']:.1f} | {times['train']:.1f} | {times['graphs']:.1f} |",
        "",
        f"Training alone took {report['training']['seconds']:.1f} s; the final epoch's mean loss was "
        f"{report['training']['final_loss']:.3f} (first epoch {report['training']['epoch_losses'][0]:.3f}). "
        f"The graphs stage wrote {graphs_summary['scene_graph_edges']} scene-graph edges (top 25 per scene) for "
        f"{graphs_summary['images']} scenes.",
        "",
        "Predicate recall@K on the held-out scenes (fraction of ground-truth triplets among the top K "
        "triplets of their scene; a scene of R regions has R (R - 1) 7 candidates, at most 84):",
        "",
        "| model | R-precision | " + " | ".join(f"R@{k}" for k in CUTOFFS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in CUTOFFS) + " |",
        f"| trained | {trained['r_precision']:.3f} | " + " | ".join(f"{trained['recall'][k]:.3f}" for k in CUTOFFS) + " |",
        f"| untrained | {untrained['r_precision']:.3f} | "
        + " | ".join(f"{untrained['recall'][k]:.3f}" for k in CUTOFFS) + " |",
        "",
        "R-precision is recall@K with K set per scene to its number of ground-truth triplets "
        f"({trained['mean_triplets']:.1f} on average here), so only a perfect ranking reaches 1; for the same reason "
        f"recall@5 cannot exceed {trained['best_recall_at_5']:.3f}. "
        "Every scene has at most 84 candidates, so recall@100 is 1 for any model. The untrained model has random "
        "weights and no frequency bias: its figures are the level of a ranking that ignores the input.",
        "",
        "Recall@20 per predicate (held-out triplets in brackets):",
        "",
        "| predicate | trained | untrained |",
        "| --- | --- | --- |",
    ]
    for predicate, (value, count) in trained["per_predicate"].items():
        lines.append(f"| {names[predicate]} ({count}) | {value:.3f} | {untrained['per_predicate'][predicate][0]:.3f} |")
    lines += [
        "",
        "The recall figures come from one seed and one held-out set of "
        f"{report['val_images']} scenes, so differences of a few thousandths are noise.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--held-out-images", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", help="keep the intermediate files here (default: a temporary folder)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="Markdown report to write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-relations-") as temporary:
        work = Path(args.work_dir or temporary)
        work.mkdir(parents=True, exist_ok=True)
        synth, data, checkpoint = work / "synth", work / "data", work / "relations.pt"
        total = args.train_images + args.held_out_images
        fraction = args.held_out_images / total
        times = {
            "synth": run_step("synth", ["synth", "--out", str(synth), "--images", str(total), "--seed", str(args.seed),
                                        "--overwrite"], work),
            "extract": run_step("extract", ["extract", "--images", str(synth / "images"), "--out", str(data),
                                            "--detector", "tiny", "--weights", "untrained", "--device", args.device,
                                            "--boxes", str(synth / "annotations.json"), "--overwrite"], work),
            "train": run_step("train", ["train-relations", "--data", str(data), "--annotations",
                                        str(synth / "annotations.json"), "--out", str(checkpoint), "--epochs",
                                        str(args.epochs), "--seed", str(args.seed), "--device", args.device,
                                        "--val-fraction", repr(fraction), "--report", str(work / "report.json")], work),
            "graphs": run_step("graphs", ["graphs", "--data", str(data), "--relations", str(checkpoint), "--device",
                                          args.device, "--overwrite"], work),
        }
        report = json.loads((work / "report.json").read_text())
        graphs_summary = json.loads((data / "graphs" / "summary.json").read_text())

        annotations = read_relation_annotations(synth / "annotations.json")
        training_set = load_training_set(DatasetFolder(data), annotations)
        _, held_out = split_images(list(training_set.samples), fraction, args.seed)
        samples = [training_set.samples[image_id] for image_id in held_out]
        model, _ = load_checkpoint(checkpoint, device="cpu")
        trained = recall_figures(model, samples)
        untrained = recall_figures(untrained_model(model, args.seed), samples)

    text = format_report(args, times, report, trained, untrained, annotations.predicate_names, graphs_summary,
                         (load_start, os.getloadavg()[0]))
    with atomic_path(args.output) as tmp:
        tmp.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
