"""The ``graphs`` stage: spatial relation graphs and scene graphs for every region shard.

Python API behind ``cmsei-prep graphs``::

    from pipeline.graphs_stage import GraphsOptions, build_graphs
    summary = build_graphs(GraphsOptions(data="DATA", relations="relations.pt"))

Shapes: N images in a region shard, R_i regions of image i, E scene-graph edges, P
predicates. One Ray task per region shard reads ``DATA/regions/shard-NNNNN.h5`` and
writes ``DATA/graphs/graphs-NNNNN.h5`` with the same images in the same order. It stores
the (R_i, R_i) spatial labels of every image (``graphs.spatial``) and its top-K
scene-graph edges. The edges come from a relation predictor checkpoint, or from
Scene-Graph-Benchmark or VinVL output. A rerun with the same inputs and options skips
shards that verify and redoes missing or broken ones.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphs.imported import DEFAULT_MATCH_IOU, ImportedSceneGraph, MatchCounts, SceneGraphImport, match_to_regions
from graphs.predicates import BACKGROUND
from graphs.relation_data import object_names_digest
from graphs.spatial import relation_labels, relation_labels_batch
from pipeline.atomic import remove_temporaries, write_json
from pipeline.dataset import GRAPHS, REGIONS, DatasetFolder
from pipeline.graph_shards import GraphShardContent, SceneGraphEdges, shard_file_name, verify_graph_shard, write_graph_shard
from pipeline.manifest import file_sha256, prepare_stage, read_manifest
from pipeline.ray_runner import RayOptions, TaskOutcome, lookup_progress_counter
from pipeline.worker_pool import WorkerStartError
from pipeline.region_shards import RegionShard
from pipeline.stage_pool import PoolSize, run_stage_workers

logger = logging.getLogger(__name__)

PROGRESS_EVERY = 64


class GraphsError(ValueError):
    """Invalid graphs options or a dataset the stage cannot work on; the message names the fix."""


@dataclass
class GraphsOptions:
    """Options of one graphs run (see ``cmsei-prep graphs --help``)."""

    data: str | Path
    relations: str | Path | None = None
    import_sgb: str | Path | None = None
    sgb_info: str | Path | None = None
    sgb_min_size: int = 600
    sgb_max_size: int = 1000
    import_vinvl: str | Path | None = None
    vinvl_labelmap: str | Path | None = None
    match_iou: float = DEFAULT_MATCH_IOU
    top_k: int = 25
    weight_by_object_scores: bool = False
    device: str = "auto"
    overwrite: bool = False
    ray: RayOptions = field(default_factory=RayOptions)


@dataclass
class GraphsSummary:
    """Counts of one graphs run, over all graph shards present afterwards."""

    images: int
    images_with_regions: int
    shards_total: int
    shards_written: int
    shards_reused: int
    failed_shards: dict[int, str]
    spatial_edges: dict[str, int]
    scene_graphs: str
    scene_graph_edges: int
    scene_graph_predicates: dict[str, int]
    scene_graph_counts: dict[str, int]
    notes: list[str]
    seconds: float

    @property
    def exit_code(self) -> int:
        """0 when every shard was written, 1 otherwise."""
        return 1 if self.failed_shards else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GraphTask:
    """One region shard to turn into a graph shard."""

    shard_index: int
    region_path: str
    out_path: str
    image_ids: list[str]
    imported: dict[str, ImportedSceneGraph] | None
    attrs: dict[str, Any]


@dataclass
class GraphWorkerSettings:
    """Settings shared by every graph worker: the scene-graph source and its options."""

    relations: str | None
    device: str
    top_k: int
    weight_by_object_scores: bool
    predicate_names: list[str]
    match_iou: float
    torch_threads: int


def build_graphs(options: GraphsOptions) -> GraphsSummary:
    """Run the graphs stage and return its summary.

    Raises:
        GraphsError: invalid options, regions without boxes, or a checkpoint whose
            class count or feature size differs from the region shards'.
        FileNotFoundError: the dataset folder, its regions stage or an input file is missing.
        graphs.imported.SceneGraphImportError: an imported scene-graph file is invalid.
        pipeline.manifest.StageConflictError: DATA/graphs contains a run over other
            regions or with other options.
    """
    started = time.monotonic()
    _check_options(options)
    data = DatasetFolder(options.data)
    regions_manifest = _regions_manifest(data)
    region_paths = data.region_shard_paths()
    shard_ids = _planned_image_ids(data)

    imported = _read_import(options, [image_id for ids in shard_ids.values() for image_id in ids])
    scene_graphs, predicate_names = _scene_graph_source(options, region_paths, imported)
    config = {"top_k": options.top_k, "scene_graphs": scene_graphs, "spatial": "graphs.spatial 12 labels, min_size 1"}
    stage_dir = data.stage_dir(GRAPHS)
    prepare_stage(stage_dir, GRAPHS, _listing_digest(regions_manifest), config,
                  {"source": str(data.stage_dir(REGIONS)), "shard_size": regions_manifest.get("shard_size"),
                   "num_shards": len(region_paths)},
                  options.overwrite)
    removed = remove_temporaries(stage_dir)
    if removed:
        logger.info("removed %d partial graph shards of an interrupted run", len(removed))

    tasks, missing = _plan_tasks(region_paths, stage_dir, shard_ids, imported, config)
    logger.info("%d region shards; %d graph shards to build", len(region_paths), len(tasks))

    settings = GraphWorkerSettings(
        relations=str(options.relations) if options.relations else None, device=options.device,
        top_k=options.top_k, weight_by_object_scores=options.weight_by_object_scores,
        predicate_names=list(predicate_names), match_iou=options.match_iou, torch_threads=1,
    )
    outcomes = _run_workers(options, settings, tasks, stage_dir) if tasks else []
    failed = missing | {outcome.key: outcome.error for outcome in outcomes if outcome.error}

    reused = len(region_paths) - len(tasks) - len(missing)
    summary = _summarise(stage_dir, len(region_paths), reused, outcomes, failed, scene_graphs, imported,
                         time.monotonic() - started)
    write_json(stage_dir / "summary.json", summary.to_dict())
    _log_summary(summary)
    return summary


def _plan_tasks(region_paths: list[Path], stage_dir: Path, shard_ids: dict[int, list[str]],
                imported: SceneGraphImport | None, config: dict[str, Any]) -> tuple[list[GraphTask], dict[int, str]]:
    """Return a task for every graph shard to build, and the region shards that are missing."""
    missing = {index: f"region shard {path.name} is missing; rerun `cmsei-prep extract` to complete it"
               for index, path in enumerate(region_paths) if not path.exists()}
    tasks = []
    for index, region_path in enumerate(region_paths):
        out_path = stage_dir / shard_file_name(index)
        if index in missing or _shard_is_complete(out_path, region_path):
            continue
        ids = shard_ids.get(index, [])
        task_import = None if imported is None else {i: imported.graphs[i] for i in ids if i in imported.graphs}
        tasks.append(GraphTask(index, str(region_path), str(out_path), ids, task_import, {"config": config}))
    return tasks, missing


def _check_options(options: GraphsOptions) -> None:
    sources = [name for name, value in (("--relations", options.relations), ("--import-sgb", options.import_sgb),
                                        ("--import-vinvl", options.import_vinvl)) if value]
    if len(sources) > 1:
        raise GraphsError(f"{' and '.join(sources)} both give scene graphs; pass only one of them")
    if options.import_sgb and not options.sgb_info:
        raise GraphsError("--import-sgb needs --sgb-info, the custom_data_info.json written next to custom_prediction.json")
    if options.sgb_info and not options.import_sgb:
        raise GraphsError("--sgb-info is only used with --import-sgb PRED")
    if options.vinvl_labelmap and not options.import_vinvl:
        raise GraphsError("--vinvl-labelmap is only used with --import-vinvl TSV")
    if int(options.top_k) != options.top_k or options.top_k < 1:
        raise GraphsError(f"--top-k must be a positive integer, got {options.top_k!r}")
    if not 0.0 < options.match_iou <= 1.0:
        raise GraphsError(f"--match-iou must lie in (0, 1], got {options.match_iou}")


def _regions_manifest(data: DatasetFolder) -> dict[str, Any]:
    manifest = read_manifest(data.stage_dir(REGIONS))
    if manifest is None:
        raise FileNotFoundError(f"{data.root} has no regions stage; run `cmsei-prep extract --out {data.root}` first")
    if not manifest.get("has_boxes", True):
        raise GraphsError(
            f"the regions in {data.root} were imported without boxes (manifest has_boxes: false), and spatial "
            "graphs and scene graphs need boxes; import a source with boxes (for SCAN folders, the GSMN "
            "_ims_bbx.npy and _ims_size.npy files) or extract regions with `cmsei-prep extract`"
        )
    return manifest


def _planned_image_ids(data: DatasetFolder) -> dict[int, list[str]]:
    """Return the image ids of every region shard as the regions listing plans them."""
    from pipeline.manifest import read_listing

    listing = read_listing(data.stage_dir(REGIONS))
    return {int(shard): list(group.sort_values("row")["image_id"]) for shard, group in listing.groupby("shard", sort=True)}


def _listing_digest(regions_manifest: dict[str, Any]) -> str:
    text = f"{regions_manifest.get('listing_digest')}\n{regions_manifest.get('config_digest')}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_import(options: GraphsOptions, image_ids: list[str]) -> SceneGraphImport | None:
    if options.import_sgb:
        from graphs.import_sgb import read_sgb_predictions

        return read_sgb_predictions(options.import_sgb, options.sgb_info, image_ids,
                                    min_size=options.sgb_min_size, max_size=options.sgb_max_size)
    if options.import_vinvl:
        from graphs.import_vinvl import read_vinvl_predictions

        return read_vinvl_predictions(options.import_vinvl, image_ids, labelmap_path=options.vinvl_labelmap)
    return None


def _scene_graph_source(
    options: GraphsOptions, region_paths: list[Path], imported: SceneGraphImport | None
) -> tuple[dict[str, Any] | str, tuple[str, ...]]:
    """Describe the scene-graph source for the configuration and return its predicate names."""
    if imported is not None:
        return {**imported.source, "match_iou": options.match_iou}, imported.predicate_names
    if not options.relations:
        return "none", (BACKGROUND,)

    from graphs.train_relations import load_checkpoint

    model, meta = load_checkpoint(options.relations, device="cpu")
    _check_class_space(model, meta, region_paths, Path(options.relations))
    source = {"format": "predictor", "checkpoint_sha256": file_sha256(options.relations),
              "weight_by_object_scores": options.weight_by_object_scores}
    return source, tuple(model.predicate_names)


def _check_class_space(model: Any, meta: dict[str, Any], region_paths: list[Path], checkpoint: Path) -> None:
    present = [path for path in region_paths if path.exists()]
    if not present:
        return
    with RegionShard(present[0]) as shard:
        num_classes = len(shard.object_names)
        feature_dim = int(shard.attrs["feature_dim"])
        names_digest = object_names_digest(shard.object_names)
    if model.num_object_classes != num_classes or model.feature_dim != feature_dim:
        raise GraphsError(
            f"{checkpoint} was trained for {model.num_object_classes} object classes and {model.feature_dim} "
            f"features, but the region shards have {num_classes} classes and {feature_dim} features; train it with "
            "`cmsei-prep train-relations` on regions of the same detector"
        )
    trained_digest = meta.get("object_names_sha256")
    if trained_digest and trained_digest != names_digest:
        logger.warning("%s was trained on regions whose object class names differ from these shards' names; "
                       "class ids may mean different things", checkpoint)


def _shard_is_complete(path: Path, region_path: Path) -> bool:
    if not path.exists():
        return False
    with RegionShard(region_path) as regions:
        image_ids = regions.image_ids
        counts = np.diff(regions.offsets)
    problems = verify_graph_shard(path, image_ids, counts)
    if problems:
        logger.warning("redoing %s: %s", path.name, "; ".join(problems))
        path.unlink()
    return not problems


class GraphWorker:
    """Ray actor body: load the relation predictor once, then build graph shards."""

    def __init__(self, settings: GraphWorkerSettings, progress_name: str) -> None:
        import torch

        torch.set_num_threads(max(1, settings.torch_threads))
        self.settings = settings
        self.predictor = None
        if settings.relations:
            from graphs.train_relations import load_checkpoint

            self.predictor, _ = load_checkpoint(settings.relations, device=settings.device)
        self.progress = lookup_progress_counter(progress_name)

    def describe(self) -> dict[str, str]:
        """Return where this worker runs; the pool logs it once the worker is ready."""
        from pipeline.cluster import current_node_label

        device = "none" if self.predictor is None else str(self.predictor.frequency_bias.weight.device)
        return {"node": current_node_label(), "predictor_device": device}

    def process_shard(self, task: GraphTask) -> dict[str, int]:
        """Build and publish one graph shard; return its scene-graph counts."""
        reported = 0

        def report(done: int) -> None:
            nonlocal reported
            self.progress.add.remote(task.shard_index, done - reported, 0)
            reported = done

        content, region_counts, counts = build_shard_content(task, self.settings, self.predictor, report)
        write_graph_shard(task.out_path, task.shard_index, content, {**task.attrs, "scene_graph_counts": counts},
                          expected_region_counts=region_counts)
        report(len(content.image_ids))
        return counts


def build_shard_content(
    task: GraphTask,
    settings: GraphWorkerSettings,
    predictor: Any,
    report: Any = None,
) -> tuple[GraphShardContent, np.ndarray, dict[str, int]]:
    """Compute the spatial labels and scene graphs of every image of one region shard.

    Args:
        task: the shard to process.
        settings: top-K, import matching and score options.
        predictor: a ``RelationPredictor``, or None for imported or no scene graphs.
        report: optional callable taking the number of images done so far.

    Returns:
        The shard content, the (N,) region counts and the scene-graph counts.

    Raises:
        ValueError: when the region shard lists other images than planned, or an
            image's boxes cannot be labelled (the message names the image).
    """
    with RegionShard(task.region_path) as shard:
        if shard.image_ids != task.image_ids:
            raise ValueError(f"{task.region_path} lists other images than the regions listing plans for shard "
                             f"{task.shard_index}; rerun `cmsei-prep extract` to complete the regions stage first")
        columns = _ShardColumns.read(shard, with_features=predictor is not None)
    labels, label_offsets = _spatial_labels(columns, task)
    counts = MatchCounts()
    edges = []
    for row in range(len(task.image_ids)):
        graph, image_counts = _scene_graph(columns, row, task, settings, predictor)
        edges.append(graph)
        counts.add(image_counts)
        if report is not None and (row + 1) % PROGRESS_EVERY == 0:
            report(row + 1)
    content = GraphShardContent.from_images(task.image_ids, labels, label_offsets, edges, settings.predicate_names)
    if task.imported is not None:
        result = asdict(counts) | {"images_without_import": len(task.image_ids) - counts.images}
    elif predictor is not None:
        result = {"images": counts.images, "edges": counts.edges}
    else:
        result = {}
    return content, np.diff(columns.offsets), result


@dataclass
class _ShardColumns:
    """The region columns of one shard read whole: one read per column instead of one per image.

    Features of a 1000-image shard with 36 regions of 2048 float16 values take about 150 MB.
    """

    offsets: np.ndarray
    image_sizes: np.ndarray
    boxes: np.ndarray
    object_ids: np.ndarray
    object_scores: np.ndarray
    features: np.ndarray | None

    @classmethod
    def read(cls, shard: RegionShard, with_features: bool) -> "_ShardColumns":
        return cls(
            offsets=np.asarray(shard.offsets), image_sizes=np.asarray(shard.image_sizes), boxes=shard.array("boxes"),
            object_ids=shard.array("object_ids"), object_scores=shard.array("object_scores"),
            features=shard.array("features") if with_features else None,
        )

    def rows(self, row: int) -> slice:
        return slice(int(self.offsets[row]), int(self.offsets[row + 1]))

    def image_size(self, row: int) -> tuple[int, int]:
        return int(self.image_sizes[row][0]), int(self.image_sizes[row][1])


def _spatial_labels(columns: _ShardColumns, task: GraphTask) -> tuple[np.ndarray, np.ndarray]:
    # Failed images have size (0, 0) and no regions. Any size that passes the min_size
    # check of relation_labels_batch leaves them without labels.
    sizes = np.where(columns.image_sizes > 0, columns.image_sizes, 1000)
    try:
        return relation_labels_batch(columns.boxes, columns.offsets, sizes)
    except ValueError:
        for row, image_id in enumerate(task.image_ids):
            try:
                relation_labels(columns.boxes[columns.rows(row)], tuple(sizes[row]))
            except ValueError as error:
                raise ValueError(f"image {image_id!r} of {Path(task.region_path).name}: {error}") from None
        raise


def _scene_graph(
    columns: _ShardColumns, row: int, task: GraphTask, settings: GraphWorkerSettings, predictor: Any
) -> tuple[SceneGraphEdges, MatchCounts]:
    rows = columns.rows(row)
    if task.imported is not None:
        graph = task.imported.get(task.image_ids[row])
        if graph is None:
            return SceneGraphEdges.empty(), MatchCounts()
        return match_to_regions(graph, columns.boxes[rows], columns.image_size(row), settings.top_k, settings.match_iou)

    if predictor is None:
        return SceneGraphEdges.empty(), MatchCounts()
    if rows.stop - rows.start < 2:
        return SceneGraphEdges.empty(), MatchCounts()
    pairs, predicates, scores = predictor.predict_image(
        columns.features[rows], columns.object_ids[rows], columns.boxes[rows], columns.image_size(row),
        top_k=settings.top_k,
        object_scores=columns.object_scores[rows] if settings.weight_by_object_scores else None,
    )
    edges = SceneGraphEdges(pairs[:, 0].copy(), pairs[:, 1].copy(), predicates, scores)
    return edges, MatchCounts(images=1, edges=len(edges), edges_kept=len(edges))


def _run_workers(options: GraphsOptions, settings: GraphWorkerSettings, tasks: list[GraphTask],
                 stage_dir: Path) -> list[TaskOutcome]:
    def worker_args(size: PoolSize, progress_name: str) -> tuple:
        settings.torch_threads = max(1, int(size.cpus))
        return settings, progress_name

    # A GPU only serves the relation predictor.
    # NOTE: only CPU workers have been run; the predictor on a CUDA worker is untested.
    device = options.device if settings.relations else None
    try:
        return run_stage_workers(
            GraphWorker, worker_args, tasks,
            options=options.ray,
            stage_dir=stage_dir,
            device=device,
            total_items=sum(len(task.image_ids) for task in tasks),
            description="graphs",
        )
    except WorkerStartError as error:
        raise GraphsError(f"no graph worker could start: {error}") from None


def _summarise(stage_dir: Path, num_shards: int, reused: int, outcomes: list[TaskOutcome],
               failed: dict[int, str], scene_graphs: dict[str, Any] | str, imported: SceneGraphImport | None,
               seconds: float) -> GraphsSummary:
    from pipeline.graph_inspect import count_graph_shards

    paths = [stage_dir / shard_file_name(index) for index in range(num_shards)]
    totals = count_graph_shards([path for path in paths if path.exists()])
    notes = []
    if scene_graphs == "none":
        notes.append("no scene graphs were built: pass --relations CKPT, --import-sgb or --import-vinvl")
    if imported is not None and imported.unmatched_keys:
        examples = ", ".join(repr(key) for key in imported.unmatched_keys[:3])
        notes.append(f"{len(imported.unmatched_keys)} images of the imported file match no image of the dataset (e.g. {examples})")
    counts = totals["scene_graph_counts"]
    if imported is not None:
        counts["file_images_unmatched"] = len(imported.unmatched_keys)
        if counts.get("boxes"):
            notes.append(f"{counts['boxes'] - counts['boxes_matched']} of {counts['boxes']} imported boxes match no "
                         f"region at IoU >= the match threshold, which dropped {counts['edges_unmatched_box']} edges")
    written = sum(1 for outcome in outcomes if outcome.error is None)
    return GraphsSummary(
        images=totals["images"], images_with_regions=totals["images_with_regions"], shards_total=num_shards,
        shards_written=written, shards_reused=reused,
        failed_shards={int(key): value for key, value in failed.items()}, spatial_edges=totals["spatial_edges"],
        scene_graphs=scene_graphs if isinstance(scene_graphs, str) else scene_graphs["format"],
        scene_graph_edges=totals["scene_graph_edges"], scene_graph_predicates=totals["scene_graph_predicates"],
        scene_graph_counts=counts, notes=notes, seconds=round(seconds, 3),
    )


def _log_summary(summary: GraphsSummary) -> None:
    spatial = sum(summary.spatial_edges.values())
    logger.info(
        "graphs: %d images (%d with regions) in %d shards; %d written, %d reused, %d failed; %d spatial edges; "
        "scene graphs from %s: %d edges; %.1f s",
        summary.images, summary.images_with_regions, summary.shards_total, summary.shards_written,
        summary.shards_reused, len(summary.failed_shards), spatial, summary.scene_graphs, summary.scene_graph_edges,
        summary.seconds,
    )
    for note in summary.notes:
        logger.info("note: %s", note)
    for shard, reason in summary.failed_shards.items():
        logger.error("graph shard %d failed: %s", shard, reason)

