"""The ``import`` stage: turn precomputed region features into region shards.

Python API behind ``cmsei-prep import``::

    from pipeline.importers.stage import ImportOptions, import_features
    summary = import_features(ImportOptions(sources=["train2014_obj36.tsv"], out="DATA",
                                            objects_vocab="objects_vocab.txt"))

Shapes: N images in a shard, R regions of one image, D feature size.

The stage writes ``DATA/regions/`` as extraction does (manifest, listing, shards by
sorted image id, index, summary), so later stages cannot tell imported shards from
extracted ones. It runs in the calling process in two passes with bounded memory: the
reader first lists every row's image id and location, then the shards are written one
at a time, each image decoded from its row on demand. Shards are published atomically,
and a rerun with the same source and options skips the shards that verify.

A bad row becomes a failed image whose reason carries a code, the location and the
message, e.g. ``num-boxes-mismatch: line 7: num_boxes 36 but field features contains
35 rows``; the other rows import. Rows without a usable image id are listed as skipped.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.atomic import remove_temporaries, write_json
from pipeline.dataset import REGIONS
from pipeline.importers import (
    IMPORT_FORMATS,
    NO_LABEL,
    ImportedRegions,
    RowError,
    SourceIndex,
    SourceReader,
    SourceRow,
    read_vocabulary,
)
from pipeline.inputs import IMAGE_EXTENSIONS, ImageEntry, InputListing, SkippedFile
from pipeline.manifest import file_sha256, prepare_stage, write_listing
from pipeline.region_index import write_region_index
from pipeline.region_shards import RegionShardWriter, shard_file_name, verify_region_shard

logger = logging.getLogger(__name__)

TSV_FORMATS = ("butd-tsv", "lxmert-tsv")
LABELLED_FORMATS = ("lxmert-tsv", "butd-npz", "mmf-npy")
DEFAULT_BOX_TOLERANCE = 1.0
INT32_MAX = np.iinfo(np.int32).max


class FeatureImportError(ValueError):
    """Invalid import options or an unusable source; the message names the fix."""


@dataclass
class ImportOptions:
    """Options of one import run (see ``cmsei-prep import --help``).

    Attributes:
        sources: one file or folder; several files only for the TSV formats.
        out: dataset folder; shards go to ``out/regions/``.
        format: one of ``IMPORT_FORMATS``, or ``"auto"`` to detect it from the content.
        split: SCAN split name (``test`` for ``test_ims.npy``); also ``{split}`` in
            ``id_template``.
        image_ext: appended to source ids without an image extension, so that
            ``COCO_train2014_000000132417`` becomes ``COCO_train2014_000000132417.jpg``;
            ``""`` keeps ids unchanged.
        id_template: ``str.format`` template of the image id with fields ``{id}`` (the
            source id), ``{row}`` (0-based source row) and ``{split}``, e.g.
            ``COCO_val2014_{id:0>12}.jpg``; replaces the ``image_ext`` rule.
        objects_vocab, attributes_vocab: vocabulary text files for the shard's
            ``object_names`` and ``attribute_names``.
        feature_dim: D; inferred from the source when None.
        dtype: stored feature dtype, ``float16`` or ``float32`` (exact copy of float32 sources).
        shard_size: images per shard file.
        box_tolerance: pixels a box may reach beyond the image border.
        compression: ``"gzip"``, ``"lzf"`` or None.
        overwrite: replace a regions stage built from another source or options.
    """

    sources: list[str | Path]
    out: str | Path
    format: str = "auto"
    split: str | None = None
    image_ext: str = ".jpg"
    id_template: str | None = None
    objects_vocab: str | Path | None = None
    attributes_vocab: str | Path | None = None
    feature_dim: int | None = None
    dtype: str = "float16"
    shard_size: int = 1000
    box_tolerance: float = DEFAULT_BOX_TOLERANCE
    compression: str | None = "gzip"
    overwrite: bool = False


@dataclass
class ImportSummary:
    """Counts, throughput and source facts of one import run.

    ``bytes_read`` counts the source bytes decoded while writing shards in this run, and
    ``mb_per_s`` divides them by the whole run time, listing pass included.
    """

    format: str
    num_images: int
    num_ok: int
    num_failed: int
    num_skipped: int
    num_regions: int
    shards_total: int
    shards_written: int
    shards_reused: int
    failed_shards: dict[int, str]
    feature_dim: int
    has_boxes: bool
    bytes_read: int
    index_seconds: float
    seconds: float
    images_per_s: float
    mb_per_s: float
    source_facts: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when every shard was written (row failures are recorded), 1 otherwise."""
        return 1 if self.failed_shards else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegionChecks:
    """Limits every decoded image is checked against.

    Attributes:
        feature_dim: D every image must have.
        has_boxes: check image sizes and boxes; False for sources without boxes.
        box_tolerance: pixels a box may reach beyond the image border.
        num_objects, num_attributes: vocabulary sizes that bound the ids; None checks
            only the int32 range.
        feature_dtype: stored dtype, whose range the features must fit.
    """

    feature_dim: int
    has_boxes: bool
    box_tolerance: float
    num_objects: int | None
    num_attributes: int | None
    feature_dtype: str


def import_features(options: ImportOptions) -> ImportSummary:
    """Run the import stage and return its summary.

    Raises:
        FileNotFoundError: a source or vocabulary file does not exist.
        ValueError: bad options, an undetectable format or a source that is unusable as
            a whole (a subclass names the problem and the fix).
        pipeline.manifest.StageConflictError: the output contains a run over another source.
    """
    started = time.monotonic()
    _check_options(options)
    sources = [Path(source) for source in options.sources]
    object_names = read_vocabulary(options.objects_vocab) if options.objects_vocab else []
    attribute_names = read_vocabulary(options.attributes_vocab) if options.attributes_vocab else []
    format_name = resolve_format(options.format, sources)
    if not object_names and format_name in LABELLED_FORMATS:
        logger.warning("no --objects-vocab given: object ids are stored without class names")

    with open_reader(format_name, sources, options.split, options.feature_dim) as reader:
        index = reader.index()
        index_seconds = time.monotonic() - started
        template = options.id_template or index.extra.get("id_template")
        split = options.split or index.extra.get("split") or ""
        groups, listing = plan_images(index, template, options.image_ext, split)
        listing.source = ", ".join(str(source.resolve()) for source in sources)
        if not listing.entries:
            raise FeatureImportError(f"no rows with a usable image id in {listing.source} ({len(listing.skipped)} unreadable)")

        stage_dir = Path(options.out) / REGIONS
        config = _stage_config(options, format_name, index, template, split)
        shard_ids = _prepare_stage_dir(stage_dir, options, format_name, index, listing, config)
        checks = RegionChecks(index.feature_dim, index.has_boxes, options.box_tolerance,
                              len(object_names) or None, len(attribute_names) or None, options.dtype)
        writer_settings = {
            "feature_dim": index.feature_dim,
            "feature_dtype": options.dtype,
            "attrs": {"config": config, "weights_sha256": None,
                      "input": {"format": format_name, "has_boxes": index.has_boxes, "sources": index.files}},
            "object_names": object_names,
            "attribute_names": attribute_names,
            "compression": options.compression,
        }

        pending = [number for number, ids in enumerate(shard_ids) if not _shard_is_complete(stage_dir, number, ids)]
        logger.info("%d images in %d shards; %d shards to write", len(listing.entries), len(shard_ids), len(pending))
        failed_shards = _write_shards(reader, stage_dir, pending, shard_ids, groups, checks, writer_settings)
        bytes_read = reader.bytes_read

    index_frame = write_region_index(stage_dir, shard_ids, listing, failed_shards)
    seconds = time.monotonic() - started
    summary = _summarise(index_frame, format_name, index, shard_ids, pending, failed_shards,
                         bytes_read, index_seconds, seconds)
    write_json(stage_dir / "summary.json", summary.to_dict())
    _log_summary(summary)
    return summary


def _prepare_stage_dir(
    stage_dir: Path, options: ImportOptions, format_name: str, index: SourceIndex, listing: InputListing,
    config: dict[str, Any],
) -> list[list[str]]:
    """Check or create the stage folder, store the listing, and return the image ids per shard."""
    shard_ids = [
        [entry.image_id for entry in listing.entries[start : start + options.shard_size]]
        for start in range(0, len(listing.entries), options.shard_size)
    ]
    extra = {"source": listing.source, "format": format_name, "has_boxes": index.has_boxes,
             "shard_size": options.shard_size, "num_shards": len(shard_ids)}
    prepare_stage(stage_dir, REGIONS, listing.listing_digest(), config, extra, options.overwrite)
    write_listing(stage_dir, _listing_frame(listing, options.shard_size))

    removed = remove_temporaries(stage_dir)
    if removed:
        logger.info("removed %d partial shard files of an interrupted run", len(removed))
    return shard_ids


def _check_options(options: ImportOptions) -> None:
    if not options.sources:
        raise FeatureImportError("no source given: pass --source FILE or FOLDER")
    if options.format != "auto" and options.format not in IMPORT_FORMATS:
        raise FeatureImportError(f"--format must be auto or one of {', '.join(IMPORT_FORMATS)}, got {options.format!r}")
    if options.shard_size < 1:
        raise FeatureImportError(f"--shard-size must be at least 1, got {options.shard_size}")
    if options.dtype not in ("float16", "float32"):
        raise FeatureImportError(f"--dtype must be float16 or float32, got {options.dtype!r}")
    if options.feature_dim is not None and options.feature_dim < 1:
        raise FeatureImportError(f"--feature-dim must be at least 1, got {options.feature_dim}")
    if options.box_tolerance < 0:
        raise FeatureImportError(f"--box-tolerance must be 0 or more pixels, got {options.box_tolerance}")
    if options.image_ext and not options.image_ext.startswith("."):
        raise FeatureImportError(f"--image-ext must start with a dot, e.g. .jpg, or be empty; got {options.image_ext!r}")
    if options.id_template:
        try:
            options.id_template.format(id="0", row=0, split="split")
        except (KeyError, IndexError, ValueError) as error:
            raise FeatureImportError(
                f"--id-template {options.id_template!r} is invalid ({type(error).__name__}: {error}); "
                "use the fields {id} (a string), {row} (an integer) and {split}, e.g. COCO_val2014_{id:0>12}.jpg"
            ) from None


def resolve_format(requested: str, sources: list[Path]) -> str:
    """Return the format to read: ``requested``, or the one detected for every source.

    Raises:
        FileNotFoundError: a source does not exist.
        ValueError: undetectable content, sources of different formats, or several
            sources for a format that reads one.
    """
    from pipeline.importers.detect import detect_format

    missing = [str(source) for source in sources if not source.exists()]
    if missing:
        raise FileNotFoundError(f"import source not found: {', '.join(missing)}")
    if requested != "auto":
        found = requested
    else:
        detected = {source: detect_format(source) for source in sources}
        kinds = sorted(set(detected.values()))
        if len(kinds) > 1:
            listed = ", ".join(f"{source.name}: {kind}" for source, kind in detected.items())
            raise FeatureImportError(f"the sources are in different formats ({listed}); import them into separate dataset folders")
        found = kinds[0]
    if len(sources) > 1 and found not in TSV_FORMATS:
        raise FeatureImportError(f"format {found} reads one source, got {len(sources)}; only TSV formats accept several files")
    return found


def open_reader(format_name: str, sources: list[Path], split: str | None, feature_dim: int | None) -> SourceReader:
    """Create the reader of ``format_name`` over ``sources``."""
    if format_name == "butd-tsv":
        from pipeline.importers.butd_tsv import ButdTsvReader

        return ButdTsvReader(sources, feature_dim)
    if format_name == "lxmert-tsv":
        from pipeline.importers.lxmert_tsv import LxmertTsvReader

        return LxmertTsvReader(sources, feature_dim)
    if format_name == "scan":
        from pipeline.importers.scan_precomp import ScanPrecompReader

        return ScanPrecompReader(sources[0], split, feature_dim)
    if format_name == "butd-npz":
        from pipeline.importers.npz_dirs import ButdNpzReader

        return ButdNpzReader(sources[0], feature_dim)
    if format_name == "mmf-npy":
        from pipeline.importers.npz_dirs import MmfNpyReader

        return MmfNpyReader(sources[0], feature_dim)
    raise FeatureImportError(f"unknown import format {format_name!r}; use one of {', '.join(IMPORT_FORMATS)}")


def map_image_id(raw_id: str, row: int, template: str | None, image_ext: str, split: str) -> str:
    """Turn a source id into the image id the extractor would record for the image file.

    Without a template, ``image_ext`` is appended unless the id already ends in an image
    extension (``IMAGE_EXTENSIONS``, any case). The result is NFC-normalised.

    Raises:
        RowError: ``invalid-id`` when the template fails or the id is empty or contains
            a control character.
    """
    if template:
        try:
            image_id = template.format(id=raw_id, row=row, split=split)
        except (KeyError, IndexError, ValueError) as error:
            raise RowError("invalid-id", f"--id-template {template!r} fails on id {raw_id!r} ({error})") from None
    elif image_ext and Path(raw_id).suffix.lower() not in IMAGE_EXTENSIONS:
        image_id = raw_id + image_ext
    else:
        image_id = raw_id

    image_id = unicodedata.normalize("NFC", image_id)
    if not image_id or any(ord(character) < 32 for character in image_id):
        raise RowError("invalid-id", f"image id {image_id!r} is empty or contains a control character")
    return image_id


def plan_images(
    index: SourceIndex, template: str | None, image_ext: str, split: str
) -> tuple[dict[str, list[SourceRow]], InputListing]:
    """Group the source rows by image id and build the sorted listing.

    Returns:
        ``{image_id: rows}`` (more than one row for a duplicated id, in source order)
        and the listing: one entry per image id, sorted, with the file holding its first
        row as path, and the unreadable rows as skipped files.
    """
    groups: dict[str, list[SourceRow]] = {}
    skipped = [SkippedFile(row.label, row.path, row.reason) for row in index.unreadable]
    for row in index.rows:
        try:
            image_id = map_image_id(row.raw_id, row.row, template, image_ext, split)
        except RowError as error:
            skipped.append(SkippedFile(f"{row.path.name}:{row.where}", row.path, error.reason(row.where)))
            continue
        groups.setdefault(image_id, []).append(row)

    entries = [ImageEntry(image_id, groups[image_id][0].path) for image_id in sorted(groups)]
    duplicated = sum(1 for rows in groups.values() if len(rows) > 1)
    if duplicated:
        logger.warning("%d image ids occur on more than one row", duplicated)
    return groups, InputListing(entries=entries, skipped=sorted(skipped, key=lambda item: item.image_id))


def _stage_config(options: ImportOptions, format_name: str, index: SourceIndex, template: str | None, split: str) -> dict[str, Any]:
    return {
        "detector": f"imported ({format_name})",
        "format": format_name,
        "sources": index.files,
        "split": split or None,
        "image_ext": options.image_ext,
        "id_template": template,
        "objects_vocab_sha256": file_sha256(options.objects_vocab) if options.objects_vocab else None,
        "attributes_vocab_sha256": file_sha256(options.attributes_vocab) if options.attributes_vocab else None,
        "dtype": options.dtype,
        "feature_dim": index.feature_dim,
        "has_boxes": index.has_boxes,
        "box_tolerance": options.box_tolerance,
    }


def _listing_frame(listing: InputListing, shard_size: int) -> pd.DataFrame:
    rows = [
        {"image_id": entry.image_id, "path": str(entry.path), "shard": number // shard_size, "row": number % shard_size}
        for number, entry in enumerate(listing.entries)
    ]
    return pd.DataFrame(rows, columns=["image_id", "path", "shard", "row"])


def _shard_is_complete(stage_dir: Path, shard_index: int, image_ids: list[str]) -> bool:
    path = stage_dir / shard_file_name(shard_index)
    if not path.exists():
        return False
    problems = verify_region_shard(path, expected_ids=image_ids)
    if problems:
        logger.warning("rewriting %s: %s", path.name, "; ".join(problems))
        path.unlink()
        return False
    return True


def _write_shards(
    reader: SourceReader,
    stage_dir: Path,
    pending: list[int],
    shard_ids: list[list[str]],
    groups: dict[str, list[SourceRow]],
    checks: RegionChecks,
    writer_settings: dict[str, Any],
) -> dict[int, str]:
    """Write the pending shards one by one; return ``{shard: error}`` of those that failed."""
    failed: dict[int, str] = {}
    for done, shard_index in enumerate(pending, start=1):
        path = stage_dir / shard_file_name(shard_index)
        try:
            num_failed = _write_shard(reader, path, shard_index, shard_ids[shard_index], groups, checks, writer_settings)
        except (OSError, RuntimeError) as error:
            failed[shard_index] = f"{type(error).__name__}: {error}"
            logger.error("shard %d failed: %s", shard_index, error)
            continue
        finally:
            reader.release_pages()
        logger.info("shard %d written (%d of %d): %d images, %d failed",
                    shard_index, done, len(pending), len(shard_ids[shard_index]), num_failed)
    return failed


def _write_shard(
    reader: SourceReader,
    path: Path,
    shard_index: int,
    image_ids: list[str],
    groups: dict[str, list[SourceRow]],
    checks: RegionChecks,
    writer_settings: dict[str, Any],
) -> int:
    num_failed = 0
    with RegionShardWriter(path, shard_index, **writer_settings) as writer:
        for image_id in image_ids:
            outcome = load_image(reader, image_id, groups[image_id], checks)
            if isinstance(outcome, str):
                writer.add_failure(image_id, outcome)
                num_failed += 1
            else:
                writer.add_image(image_id, outcome.image_size, outcome.columns())
    return num_failed


def load_image(reader: SourceReader, image_id: str, rows: list[SourceRow], checks: RegionChecks) -> ImportedRegions | str:
    """Decode and check the rows of one image; return its regions or a failure reason.

    Several rows with one image id import once when their data are identical, and fail
    with ``duplicate-id`` naming every location otherwise.
    """
    decoded: list[ImportedRegions] = []
    for row in rows:
        try:
            regions = reader.read(row)
            check_regions(regions, checks)
        except RowError as error:
            if len(rows) == 1:
                return error.reason(row.where)
            logger.debug("image %s: %s", image_id, error.reason(row.where))
            break
        decoded.append(regions)

    if len(rows) == 1:
        return decoded[0]
    if len(decoded) == len(rows) and all(decoded[0].same_as(other) for other in decoded[1:]):
        logger.info("image %s: %d identical rows at %s, imported once", image_id, len(rows), _join_places(rows))
        return decoded[0]
    return (
        f"duplicate-id: {_join_places(rows)}: {len(rows)} rows carry image id {image_id!r} with different "
        "or invalid data; remove all but one"
    )


def _join_places(rows: list[SourceRow]) -> str:
    places = [row.where for row in rows]
    return " and ".join(places) if len(places) == 2 else ", ".join(places)


def check_regions(regions: ImportedRegions, checks: RegionChecks) -> None:
    """Check one image's regions before they are stored.

    Raises:
        RowError: ``feature-size``, ``invalid-size``, ``non-finite``, ``invalid-box``,
            ``box-outside-image``, ``invalid-label`` or ``feature-overflow``.
    """
    features = regions.features
    if features.ndim != 2 or features.shape[1] != checks.feature_dim:
        raise RowError("feature-size", f"features have shape {features.shape}, expected (R, {checks.feature_dim}) like the rest of the source")

    for name, values in (("features", features), ("boxes", regions.boxes),
                         ("object scores", regions.object_scores), ("attribute scores", regions.attribute_scores)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise RowError("non-finite", f"{name} contain {bad} NaN or infinite values")

    if checks.has_boxes:
        _check_boxes(regions, checks.box_tolerance)
    _check_label_ids(regions.object_ids, "object", checks.num_objects)
    _check_label_ids(regions.attribute_ids, "attribute", checks.num_attributes)

    limit = float(np.finfo(np.dtype(checks.feature_dtype)).max)
    if features.size and float(np.abs(features).max()) > limit:
        raise RowError("feature-overflow", f"features exceed the {checks.feature_dtype} range; rerun with --dtype float32")


def _check_boxes(regions: ImportedRegions, tolerance: float) -> None:
    height, width = regions.image_size
    if height <= 0 or width <= 0:
        raise RowError("invalid-size", f"image size {height} x {width} (height x width) is not positive")

    boxes = regions.boxes
    inverted = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    if inverted.size:
        raise RowError("invalid-box", f"box {inverted[0]} {_format_box(boxes[inverted[0]])} has x2 < x1 or y2 < y1")

    outside = np.flatnonzero(
        (boxes[:, 0] < -tolerance) | (boxes[:, 1] < -tolerance)
        | (boxes[:, 2] > width + tolerance) | (boxes[:, 3] > height + tolerance)
    )
    if outside.size:
        raise RowError(
            "box-outside-image",
            f"box {outside[0]} {_format_box(boxes[outside[0]])} lies outside the {width} x {height} image "
            f"(width x height) by more than {tolerance:g} px",
        )


def _format_box(box: np.ndarray) -> str:
    return "(" + ", ".join(f"{value:.1f}" for value in box) + ")"


def _check_label_ids(ids: np.ndarray, kind: str, vocabulary_size: int | None) -> None:
    if not ids.size:
        return
    low, high = int(ids.min()), int(ids.max())
    upper = vocabulary_size - 1 if vocabulary_size else INT32_MAX
    if low < NO_LABEL or high > upper:
        bad = low if low < NO_LABEL else high
        where = f"the {vocabulary_size}-entry {kind}s vocabulary" if vocabulary_size else "the int32 range"
        raise RowError("invalid-label", f"{kind} id {bad} is outside {where}")


def _summarise(
    index_frame: pd.DataFrame,
    format_name: str,
    index: SourceIndex,
    shard_ids: list[list[str]],
    pending: list[int],
    failed_shards: dict[int, str],
    bytes_read: int,
    index_seconds: float,
    seconds: float,
) -> ImportSummary:
    status = Counter(index_frame["status"])
    written = [number for number in pending if number not in failed_shards]
    images_done = sum(len(shard_ids[number]) for number in written)
    return ImportSummary(
        format=format_name,
        num_images=int(sum(len(ids) for ids in shard_ids)),
        num_ok=status.get("ok", 0),
        num_failed=status.get("failed", 0),
        num_skipped=status.get("skipped", 0),
        num_regions=int(index_frame["num_regions"].sum()),
        shards_total=len(shard_ids),
        shards_written=len(written),
        shards_reused=len(shard_ids) - len(pending),
        failed_shards={int(key): value for key, value in failed_shards.items()},
        feature_dim=index.feature_dim,
        has_boxes=index.has_boxes,
        bytes_read=bytes_read,
        index_seconds=round(index_seconds, 3),
        seconds=round(seconds, 3),
        images_per_s=round(images_done / seconds, 2) if seconds else 0.0,
        mb_per_s=round(bytes_read / 1e6 / seconds, 2) if seconds else 0.0,
        source_facts={key: value for key, value in index.extra.items() if key != "id_template"},
    )


def _log_summary(summary: ImportSummary) -> None:
    logger.info(
        "import %s: %d images, %d ok, %d failed, %d rows skipped, %d regions; shards %d written, %d reused, "
        "%d failed; %.1f s (%.1f images/s, %.1f MB/s)",
        summary.format, summary.num_images, summary.num_ok, summary.num_failed, summary.num_skipped,
        summary.num_regions, summary.shards_written, summary.shards_reused, len(summary.failed_shards),
        summary.seconds, summary.images_per_s, summary.mb_per_s,
    )
    if not summary.has_boxes:
        logger.warning("the source has no boxes: boxes are stored as zeros and spatial graphs cannot be built")
    for shard_index, reason in summary.failed_shards.items():
        logger.error("shard %d failed: %s", shard_index, reason)
    if summary.num_failed:
        logger.warning("%d images failed; `cmsei-prep inspect` lists them with reasons", summary.num_failed)
