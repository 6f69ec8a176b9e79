"""The ``captions`` stage: read a caption file, parse every caption with spaCy on Ray
workers, and write caption shards, the vocabulary and a per-caption status table.

Python API behind ``cmsei-prep captions``::

    from pipeline.captions_stage import CaptionsOptions, build_captions
    summary = build_captions(CaptionsOptions(captions="captions.jsonl", out="DATA"))

Captions keep their file order and are cut into fixed-size shards, so the output is
deterministic and a rerun redoes only missing or broken shards.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.atomic import atomic_path, remove_temporaries, write_json
from pipeline.caption_shards import CaptionShard, CaptionShardWriter, shard_file_name, verify_caption_shard
from pipeline.dataset import CAPTIONS, REGIONS
from pipeline.manifest import file_sha256, prepare_stage, read_manifest
from pipeline.ray_runner import RayOptions, TaskOutcome, lookup_progress_counter
from pipeline.stage_pool import run_stage_workers

logger = logging.getLogger(__name__)

INDEX_NAME = "index.parquet"
VOCAB_NAME = "vocab.json"


@dataclass
class CaptionsOptions:
    """Options of one captions run (see ``cmsei-prep captions --help``)."""

    captions: str | Path
    out: str | Path
    format: str | None = None
    split: str | None = None
    split_file: str | Path | None = None
    encoding: str = "utf-8"
    max_chars: int = 1000
    image_column: str = "image"
    caption_column: str = "caption"
    captions_per_image: int = 5
    spacy_model: str | None = None
    batch_size: int = 512
    shard_size: int = 5000
    vocab_split: str = "train"
    vocab_threshold: int = 4
    vocab_file: str | Path | None = None
    overwrite: bool = False
    ray: RayOptions = field(default_factory=RayOptions)


@dataclass
class CaptionsSummary:
    """Counts of one captions run."""

    format: str
    captions: int
    skipped: int
    truncated: int
    tokens: int
    objects: int
    relations: int
    with_relations: int
    images: int
    unmatched_images: int | None
    vocab_size: int
    vocab_source: str
    shards_total: int
    shards_written: int
    failed_shards: dict[int, str]
    notes: list[str]
    seconds: float
    captions_per_s: float

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_shards else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CaptionTask:
    """One shard of captions to parse: parallel lists in file order."""

    shard_index: int
    image_ids: list[str]
    caption_indices: list[int]
    splits: list[str | None]
    texts: list[str]
    out_path: str
    attrs: dict[str, Any]


class CaptionWorker:
    """Ray actor body: load the spaCy model once, then parse and write caption shards."""

    def __init__(self, model: str | None, batch_size: int, progress_name: str) -> None:
        from extractors.captions.parser import CaptionParser

        self.parser = CaptionParser(model, batch_size=batch_size)
        self.progress = lookup_progress_counter(progress_name)

    def model_name(self) -> str:
        return self.parser.model

    def process_shard(self, task: CaptionTask) -> dict[str, Any]:
        """Parse every caption of ``task`` and publish the shard; return its counts."""
        writer = CaptionShardWriter(Path(task.out_path), task.shard_index, task.attrs)
        relation_counts = []
        reported = 0
        for row, parse in enumerate(self.parser.parse_many(task.texts)):
            writer.add(task.image_ids[row], task.caption_indices[row], task.splits[row], parse)
            relation_counts.append(len(parse.relations))
            if (row + 1) % self.parser.batch_size == 0:
                self.progress.add.remote(task.shard_index, row + 1 - reported, 0)
                reported = row + 1
        counts = writer.close()
        self.progress.add.remote(task.shard_index, len(task.texts) - reported, 0)
        return counts | {"with_relations": sum(1 for count in relation_counts if count)}


def build_captions(options: CaptionsOptions) -> CaptionsSummary:
    """Run the captions stage and return its summary.

    Raises:
        extractors.captions.CaptionFormatError: the caption file cannot be read; the
            message names the file, position and field.
        extractors.captions.parser.ModelNotFoundError: the spaCy model is not installed.
        pipeline.manifest.StageConflictError: the output contains a run over other captions.
    """
    from extractors.captions.parser import default_model, load_model
    from extractors.captions.readers import read_captions

    started = time.monotonic()
    table = read_captions(
        options.captions, format=options.format, split=options.split, split_file=options.split_file,
        encoding=options.encoding, max_chars=options.max_chars, image_column=options.image_column,
        caption_column=options.caption_column, captions_per_image=options.captions_per_image,
    )
    model = options.spacy_model or default_model()
    load_model(model)  # fail early, on the driver, with the installation hint
    stage_dir = Path(options.out) / CAPTIONS
    records = table.records
    shards = [records[start : start + options.shard_size] for start in range(0, len(records), options.shard_size)]
    config = {"source_sha256": file_sha256(options.captions), "format": table.format, "split": options.split,
              "max_chars": options.max_chars, "spacy_model": model}
    prepare_stage(stage_dir, CAPTIONS, _records_digest(records), config,
                  {"source": str(options.captions), "shard_size": options.shard_size, "num_shards": len(shards)},
                  options.overwrite)
    remove_temporaries(stage_dir)

    tasks = [
        CaptionTask(index, [r.image_id for r in shard], [r.caption_index for r in shard], [r.split for r in shard],
                    [r.text for r in shard], str(stage_dir / shard_file_name(index)), {"config": config})
        for index, shard in enumerate(shards)
        if not _shard_is_complete(stage_dir / shard_file_name(index), len(shard))
    ]
    logger.info("%d captions in %d shards; %d shards to parse", len(records), len(shards), len(tasks))
    outcomes = _run_workers(options, model, tasks) if tasks else []
    failed = {outcome.key: outcome.error for outcome in outcomes if outcome.error}

    index = _write_index(stage_dir, table, len(shards), options.shard_size, failed)
    vocab_size, vocab_source = _write_vocabulary(stage_dir, options, index)
    summary = _summarise(options, table, index, len(shards), outcomes, failed, vocab_size, vocab_source,
                         time.monotonic() - started)
    write_json(stage_dir / "summary.json", summary.to_dict())
    _log_summary(summary)
    return summary


def _records_digest(records: list[Any]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record.image_id}\t{record.caption_index}\t{record.split}\t{record.text}\n".encode("utf-8"))
    return digest.hexdigest()


def _shard_is_complete(path: Path, count: int) -> bool:
    if not path.exists():
        return False
    problems = verify_caption_shard(path, expected_count=count)
    if problems:
        logger.warning("redoing %s: %s", path.name, "; ".join(problems))
        path.unlink()
    return not problems


def _run_workers(options: CaptionsOptions, model: str, tasks: list[CaptionTask]) -> list[TaskOutcome]:
    logger.info("caption workers parse with spaCy model %s", model)
    return run_stage_workers(
        CaptionWorker,
        lambda size, progress_name: (model, options.batch_size, progress_name),
        tasks,
        options=options.ray,
        stage_dir=Path(tasks[0].out_path).parent,
        device=None,
        total_items=sum(len(task.texts) for task in tasks),
        description="captions",
        unit="caption",
        probe_ready=False,
    )


def _write_index(stage_dir: Path, table: Any, num_shards: int, shard_size: int, failed: dict[int, str]) -> pd.DataFrame:
    """Write the per-caption status table: every parsed, skipped or failed caption with its place."""
    rows = []
    for shard_index in range(num_shards):
        path = stage_dir / shard_file_name(shard_index)
        if not path.exists():
            rows.extend(_pending_rows(table.records[shard_index * shard_size:(shard_index + 1) * shard_size],
                                      shard_index, failed.get(shard_index)))
            continue
        with CaptionShard(path) as shard:
            counts = {name: offsets[1:] - offsets[:-1] for name, offsets in shard.offsets.items()}
            for row in range(len(shard)):
                rows.append({
                    "image_id": shard.image_ids[row], "caption_index": int(shard.caption_index[row]),
                    "split": shard.splits[row] or None, "shard": shard_index, "row": row, "status": "ok",
                    "reason": "", "num_tokens": int(counts["token_offsets"][row]),
                    "num_objects": int(counts["object_offsets"][row]),
                    "num_relations": int(counts["relation_offsets"][row]),
                })
    for skipped in table.skipped:
        rows.append({"image_id": skipped.image_id, "caption_index": skipped.caption_index, "split": None,
                     "shard": -1, "row": -1, "status": "skipped",
                     "reason": f"{skipped.reason} (line {skipped.source_line})" if skipped.source_line else skipped.reason,
                     "num_tokens": 0, "num_objects": 0, "num_relations": 0})
    frame = pd.DataFrame(rows, columns=["image_id", "caption_index", "split", "shard", "row", "status", "reason",
                                        "num_tokens", "num_objects", "num_relations"])
    with atomic_path(stage_dir / INDEX_NAME) as tmp:
        frame.to_parquet(tmp, index=False)
    return frame


def _pending_rows(records: list[Any], shard_index: int, error: str | None) -> list[dict[str, Any]]:
    reason = f"shard {shard_index} failed: {error}" if error else f"shard {shard_index} not written yet"
    return [{"image_id": r.image_id, "caption_index": r.caption_index, "split": r.split, "shard": shard_index,
             "row": row, "status": "pending", "reason": reason, "num_tokens": 0, "num_objects": 0, "num_relations": 0}
            for row, r in enumerate(records)]


def _write_vocabulary(stage_dir: Path, options: CaptionsOptions, index: pd.DataFrame) -> tuple[int, str]:
    """Load ``--vocab`` as is, or build the vocabulary from the chosen split's tokens."""
    from extractors.captions.vocab import Vocabulary

    if options.vocab_file:
        vocab = Vocabulary.load(options.vocab_file)
        source = f"loaded from {options.vocab_file}"
    else:
        ok = index[index["status"] == "ok"]
        chosen = ok[ok["split"] == options.vocab_split]
        source = f"split {options.vocab_split}, count >= {options.vocab_threshold}"
        if chosen.empty:
            logger.warning("no captions in split %r; building the vocabulary from all %d captions (use --vocab-split)",
                           options.vocab_split, len(ok))
            chosen, source = ok, f"all captions (no split {options.vocab_split!r}), count >= {options.vocab_threshold}"
        vocab = Vocabulary.build(_token_lists(stage_dir, chosen), threshold=options.vocab_threshold)
    vocab.save(stage_dir / VOCAB_NAME)
    return len(vocab), source


def _token_lists(stage_dir: Path, chosen: pd.DataFrame):
    for shard_index, group in chosen.groupby("shard", sort=True):
        with CaptionShard(stage_dir / shard_file_name(int(shard_index))) as shard:
            lower = shard.column("token_lower")
            offsets = shard.offsets["token_offsets"]
            for row in group["row"]:
                yield lower[int(offsets[row]):int(offsets[row + 1])]


def _unmatched_images(out: Path, image_ids: set[str]) -> int | None:
    """Count caption images without regions, when the dataset folder has a regions stage."""
    regions_dir = out / REGIONS
    if read_manifest(regions_dir) is None or not (regions_dir / "index.parquet").exists():
        return None
    regions = pd.read_parquet(regions_dir / "index.parquet")
    with_regions = set(regions.loc[regions["status"] == "ok", "image_id"])
    return len(image_ids - with_regions)


def _summarise(options: CaptionsOptions, table: Any, index: pd.DataFrame, num_shards: int,
               outcomes: list[TaskOutcome], failed: dict, vocab_size: int, vocab_source: str,
               seconds: float) -> CaptionsSummary:
    ok = index[index["status"] == "ok"]
    image_ids = set(ok["image_id"])
    notes = list(table.notes)
    unmatched = _unmatched_images(Path(options.out), image_ids)
    if unmatched:
        notes.append(f"{unmatched} caption images have no regions in {options.out}/regions")
    return CaptionsSummary(
        format=table.format, captions=len(ok), skipped=len(table.skipped), truncated=table.truncated,
        tokens=int(ok["num_tokens"].sum()), objects=int(ok["num_objects"].sum()),
        relations=int(ok["num_relations"].sum()), with_relations=int((ok["num_relations"] > 0).sum()),
        images=len(image_ids), unmatched_images=unmatched, vocab_size=vocab_size, vocab_source=vocab_source,
        shards_total=num_shards, shards_written=sum(1 for o in outcomes if o.error is None),
        failed_shards={int(k): v for k, v in failed.items()}, notes=notes, seconds=seconds,
        captions_per_s=len(ok) / seconds if seconds else 0.0,
    )


def _log_summary(summary: CaptionsSummary) -> None:
    logger.info(
        "captions (%s): %d parsed, %d skipped, %d truncated; %d tokens, %d objects, %d relations "
        "(%d captions with at least one); %d images; vocabulary of %d words (%s); %.1f s, %.0f captions/s",
        summary.format, summary.captions, summary.skipped, summary.truncated, summary.tokens, summary.objects,
        summary.relations, summary.with_relations, summary.images, summary.vocab_size, summary.vocab_source,
        summary.seconds, summary.captions_per_s,
    )
    if summary.unmatched_images is not None:
        logger.info("%d caption images have no regions in the dataset folder", summary.unmatched_images)
    for note in summary.notes:
        logger.info("note: %s", note)
    for shard, reason in summary.failed_shards.items():
        logger.error("caption shard %d failed: %s", shard, reason)
