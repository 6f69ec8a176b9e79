"""Training and evaluation data read lazily from the shards of a dataset folder.

Shape shorthand: B images in a batch, C captions, D region feature size. Padded sizes are
the maxima over the batch: k regions, n words and E scene-graph edges.

The pair index joins `captions/index.parquet` to `regions/index.parquet` on the image id
and keeps the captions with status ok and at least one token whose image has status ok
and at least one region. Items read one image or caption from its shard. Each process
opens the HDF5 files it needs on first use, so DataLoader workers never share an HDF5
handle. The collate functions pad regions, edges and words and return masks.

Graph shards (`graphs/graphs-NNNNN.h5`) are aligned with the region shards: the same
images in the same order. They are optional. Without them the spatial and semantic graph
inputs are None.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from extractors.captions.vocab import Vocabulary
from pipeline.caption_shards import shard_file_name as caption_shard_name
from pipeline.h5io import read_strings
from pipeline.region_shards import RegionShard
from pipeline.region_shards import shard_file_name as region_shard_name

logger = logging.getLogger(__name__)

GRAPH_SCHEMA = "cmsei.graphs"
GRAPH_ARRAYS = (
    "image_ids",
    "spatial_offsets",
    "spatial_labels",
    "sg_offsets",
    "sg_subject",
    "sg_object",
    "sg_predicate",
    "sg_score",
    "predicate_names",
)
STATUS_OK = "ok"


class DataError(ValueError):
    """The dataset folder lacks a stage, a file or a split that training or evaluation needs."""


def graph_shard_name(shard_index: int) -> str:
    """Return the file name of graph shard `shard_index`, aligned with region shard `shard_index`."""
    return f"graphs-{shard_index:05d}.h5"


def load_vocabulary(root: str | os.PathLike) -> Vocabulary:
    """Load the caption vocabulary `captions/vocab.json` of a dataset folder.

    Raises:
        DataError: when the file is missing.
        extractors.captions.vocab.VocabularyError: when the file is malformed.
    """
    path = Path(root) / "captions" / "vocab.json"
    if not path.is_file():
        raise DataError(f"{path} not found; run `cmsei-prep captions --out {root}` first")
    return Vocabulary.load(path)


def build_pair_index(root: str | os.PathLike) -> pd.DataFrame:
    """Join the caption index and the region index of a dataset folder.

    Args:
        root: the dataset folder.

    Returns:
        One row per usable (image, caption) pair, ordered by region shard, region row and
        caption index, with the columns image_id, caption_index, split (str, "" when the
        caption file names none), caption_shard, caption_row, num_tokens, region_shard,
        region_row and num_regions.

    Raises:
        DataError: when an index is missing or no pair is left.
    """
    root = Path(root)
    captions = _read_index(root / "captions" / "index.parquet", "cmsei-prep captions")
    regions = _read_index(root / "regions" / "index.parquet", "cmsei-prep extract")

    captions = captions[(captions["status"] == STATUS_OK) & (captions["num_tokens"] > 0)]
    regions = regions[(regions["status"] == STATUS_OK) & (regions["num_regions"] > 0)]
    captions = captions.rename(columns={"shard": "caption_shard", "row": "caption_row"})
    regions = regions.rename(columns={"shard": "region_shard", "row": "region_row"})

    pairs = captions[["image_id", "caption_index", "split", "caption_shard", "caption_row", "num_tokens"]].merge(
        regions[["image_id", "region_shard", "region_row", "num_regions"]], on="image_id", how="inner"
    )
    _log_unmatched(captions, regions, pairs)
    if pairs.empty:
        raise DataError(
            f"{root}: no caption has an image with regions; check that the image ids of "
            f"captions/index.parquet match those of regions/index.parquet"
        )

    pairs["split"] = pairs["split"].fillna("").astype(str)
    for column in ("caption_index", "caption_shard", "caption_row", "num_tokens", "region_shard", "region_row",
                   "num_regions"):
        pairs[column] = pairs[column].astype(np.int64)
    pairs = pairs.sort_values(["region_shard", "region_row", "caption_index"], kind="stable")
    return pairs.reset_index(drop=True)


def _read_index(path: Path, command: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path} not found; run `{command}` on this dataset folder first")
    return pd.read_parquet(path)


def _log_unmatched(captions: pd.DataFrame, regions: pd.DataFrame, pairs: pd.DataFrame) -> None:
    without_regions = len(captions) - len(pairs)
    if without_regions:
        logger.warning("%d usable captions have no image with regions and are left out", without_regions)
    without_captions = regions["image_id"].nunique() - pairs["image_id"].nunique()
    if without_captions:
        logger.info("%d images with regions have no usable caption and are left out", without_captions)


def split_names(pairs: pd.DataFrame) -> list[str]:
    """Return the sorted split names of the pair index, without the empty name."""
    return sorted(name for name in pairs["split"].unique() if name)


def holdout_mask(image_ids: Sequence[str] | pd.Series, fraction: float) -> np.ndarray:
    """Assign images to a held-out set by a hash of their id.

    An image is held out when the first 8 bytes of the SHA-256 of its UTF-8 id, read as an
    unsigned big-endian integer and divided by 2**64, are below `fraction`. The assignment
    depends on the id alone, so it is the same in every process, run and dataset order.

    Args:
        image_ids: M image ids.
        fraction: expected share of held-out images, in (0, 1).

    Returns:
        (M,) bool, True for held-out images.

    Raises:
        ValueError: when `fraction` is not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    values = [
        int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
        for image_id in image_ids
    ]
    return np.asarray(values, dtype=np.float64) < fraction


@dataclass(frozen=True)
class SplitPlan:
    """The choice of training and validation pairs, stored in checkpoints.

    Attributes:
        train_splits: split names used for training; empty when the captions name no split.
        val_split: split name used for validation, or "" when the validation images are
            held out by hash.
        holdout_fraction: the hash fraction, or None when `val_split` names a split.
    """

    train_splits: tuple[str, ...]
    val_split: str
    holdout_fraction: float | None

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as plain JSON types."""
        return {
            "train_splits": list(self.train_splits),
            "val_split": self.val_split,
            "holdout_fraction": self.holdout_fraction,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SplitPlan:
        """Build a plan from `to_dict` output."""
        return cls(tuple(values["train_splits"]), values["val_split"], values["holdout_fraction"])


DEFAULT_HOLDOUT_FRACTION = 0.2


def plan_splits(
    pairs: pd.DataFrame,
    train_split: str,
    val_split: str,
    holdout_fraction: float | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, SplitPlan]:
    """Choose the training and validation pairs.

    Named splits are used when the captions carry them: `train_split` may list several
    names separated by commas ("train,restval"). When the captions carry no split name at
    all, every pair is a training candidate. When `val_split` is not among the names, the
    validation images are held out from the training candidates by `holdout_mask` with
    `holdout_fraction` (default 0.2).

    Args:
        pairs: `build_pair_index` output.
        train_split: training split name or comma-separated names.
        val_split: validation split name.
        holdout_fraction: hash fraction for the held-out validation images.

    Returns:
        The training pairs, the validation pairs and the plan.

    Raises:
        DataError: when the captions name splits but none of `train_split`, or when a
            selection is empty.
        ValueError: when `holdout_fraction` is not in (0, 1).
    """
    names = split_names(pairs)
    requested = tuple(name.strip() for name in train_split.split(",") if name.strip())
    if names:
        missing = [name for name in requested if name not in names]
        if len(missing) == len(requested):
            raise DataError(
                f"training split {train_split!r} not found; the captions name the splits {names}; "
                f"pass --train-split with one of them"
            )
        if missing:
            logger.warning("training splits %s not found in the captions; using %s", missing,
                           [name for name in requested if name in names])
        candidates = pairs[pairs["split"].isin(requested)]
        train_splits = tuple(name for name in requested if name in names)
    else:
        candidates = pairs
        train_splits = ()

    if val_split in names:
        plan = SplitPlan(train_splits, val_split, None)
        train, val = candidates, pairs[pairs["split"] == val_split]
    else:
        fraction = DEFAULT_HOLDOUT_FRACTION if holdout_fraction is None else holdout_fraction
        held_out = holdout_mask(candidates["image_id"], fraction)
        plan = SplitPlan(train_splits, "", fraction)
        train, val = candidates[~held_out], candidates[held_out]
        logger.warning(
            "the captions name no split %r (names: %s); holding out %.0f%% of the training images by "
            "a hash of their id for validation", val_split, names or "none", 100 * fraction,
        )

    for role, selection in (("training", train), ("validation", val)):
        if selection.empty:
            raise DataError(
                f"the {role} selection is empty ({len(pairs)} pairs, splits {names or 'none'}); "
                f"use more images, other split names or another --holdout-fraction"
            )
    return train.reset_index(drop=True), val.reset_index(drop=True), plan


def select_eval_split(pairs: pd.DataFrame, split: str, plan: SplitPlan | None) -> pd.DataFrame:
    """Choose the pairs of an evaluation split.

    A split named in the captions is used as is. Otherwise, when training held out its
    validation images by hash, any split other than a training split selects those held-out
    images, with a warning that they also chose the best checkpoint.

    Raises:
        DataError: when the split cannot be resolved or is empty.
    """
    names = split_names(pairs)
    if split in names:
        return pairs[pairs["split"] == split].reset_index(drop=True)

    if plan is not None and plan.holdout_fraction is not None and split not in plan.train_splits:
        pool = pairs[pairs["split"].isin(plan.train_splits)] if plan.train_splits else pairs
        held_out = pool[holdout_mask(pool["image_id"], plan.holdout_fraction)]
        if not held_out.empty:
            logger.warning(
                "the captions name no split %r; evaluating the %d images that training held out by hash "
                "(fraction %.2f), which also selected the best checkpoint", split, held_out["image_id"].nunique(),
                plan.holdout_fraction,
            )
            return held_out.reset_index(drop=True)
    raise DataError(f"split {split!r} not found; the captions name the splits {names or 'none'}")


def image_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """Return one row per image of `pairs` (image_id, region_shard, region_row, num_regions), in pair order."""
    images = pairs.drop_duplicates("image_id")[["image_id", "region_shard", "region_row", "num_regions"]]
    return images.reset_index(drop=True)


def limit_captions(pairs: pd.DataFrame, per_image: int | None) -> pd.DataFrame:
    """Keep the first `per_image` captions (by caption index) of every image; None keeps all."""
    if per_image is None:
        return pairs
    if per_image < 1:
        raise ValueError(f"captions per image must be >= 1, got {per_image}")
    rank = pairs.groupby("image_id", sort=False).cumcount()
    return pairs[rank < per_image].reset_index(drop=True)


@dataclass
class GraphInfo:
    """Summary of the graph shards of a dataset folder.

    Attributes:
        available: whether every region shard in use has a complete graph shard.
        predicate_names: P predicate names, background at index 0; empty when unavailable.
    """

    available: bool
    predicate_names: tuple[str, ...] = ()


def inspect_graphs(root: str | os.PathLike, region_shards: Sequence[int]) -> GraphInfo:
    """Check the graph shards that pair with `region_shards`.

    Returns:
        `GraphInfo(False)` when the folder `graphs/` contains no graph shard.

    Raises:
        DataError: when some but not all shards exist, when a shard is incomplete or of
            another schema, or when the shards disagree on the predicate names.
    """
    folder = Path(root) / "graphs"
    paths = {index: folder / graph_shard_name(index) for index in sorted(set(region_shards))}
    present = {index: path for index, path in paths.items() if path.is_file()}
    if not present:
        return GraphInfo(False)
    if len(present) != len(paths):
        missing = sorted(set(paths) - set(present))[:10]
        raise DataError(
            f"{folder} lacks the graph shards of region shards {missing}; rerun `cmsei-prep graphs --data {root}`"
        )

    names: tuple[str, ...] | None = None
    for index, path in present.items():
        with h5py.File(path, "r") as h5:
            _check_graph_file(h5, path)
            shard_names = tuple(read_strings(h5["predicate_names"]))
        if names is None:
            names = shard_names
        elif shard_names != names:
            raise DataError(f"{path} has other predicate names than {present[min(present)]}; rebuild the graphs stage")
    return GraphInfo(True, names or ())


def _check_graph_file(h5: h5py.File, path: Path) -> None:
    schema = h5.attrs.get("schema")
    if isinstance(schema, bytes):
        schema = schema.decode("utf-8")
    if schema != GRAPH_SCHEMA:
        raise DataError(f"{path} has schema {schema!r}, expected {GRAPH_SCHEMA!r}; it is not a graph shard")
    if not bool(h5.attrs.get("complete", False)):
        raise DataError(f"{path} is not marked complete; rerun `cmsei-prep graphs`")
    missing = [name for name in GRAPH_ARRAYS if name not in h5]
    if missing:
        raise DataError(f"{path} lacks the datasets {missing}; rebuild it with `cmsei-prep graphs`")


@dataclass
class ImageItem:
    """One image as read from the shards (R regions after the cap, E edges).

    Attributes:
        features: (R, D) float16 or float32 region features.
        boxes_norm: (R, 4) float32 boxes divided by the image width and height, in [0, 1].
        spatial_labels: (R, R) uint8 spatial relation labels, or None without graphs.
        sg_edges: (E, 2) int64 subject and object region indices, or None without graphs.
        sg_predicates: (E,) int64 predicate ids, or None.
        sg_scores: (E,) float32 edge scores, or None.
    """

    features: np.ndarray
    boxes_norm: np.ndarray
    spatial_labels: np.ndarray | None = None
    sg_edges: np.ndarray | None = None
    sg_predicates: np.ndarray | None = None
    sg_scores: np.ndarray | None = None


@dataclass
class ReaderOptions:
    """Settings of `ShardReader`.

    Attributes:
        spatial_graph: read the spatial labels from the graph shards.
        semantic_graph: read the scene-graph edges from the graph shards.
        max_regions: keep the first regions of each image, in shard order; None keeps all.
        max_words: keep the first words of each caption; None keeps all.
    """

    spatial_graph: bool = False
    semantic_graph: bool = False
    max_regions: int | None = None
    max_words: int | None = None


class ShardReader:
    """Read images and captions of one dataset folder, opening each HDF5 file on first use.

    Handles belong to the process that opened them: after a fork, the child opens its own.
    Pickling drops the handles, so the reader can be sent to DataLoader workers.

    Args:
        root: the dataset folder.
        vocabulary: maps caption words to ids.
        options: what to read.
    """

    def __init__(self, root: str | os.PathLike, vocabulary: Vocabulary, options: ReaderOptions) -> None:
        self.root = Path(root)
        self.vocabulary = vocabulary
        self.options = options
        self._pid = os.getpid()
        self._regions: dict[int, RegionShard] = {}
        self._graphs: dict[int, h5py.File] = {}
        self._graph_offsets: dict[int, tuple[np.ndarray, np.ndarray, list[str]]] = {}
        self._captions: dict[int, tuple[h5py.File, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_regions={}, _graphs={}, _graph_offsets={}, _captions={}, _pid=None)
        return state

    def _own_handles(self) -> None:
        """Forget handles inherited from another process; they stay open there."""
        if self._pid != os.getpid():
            self._regions, self._graphs, self._graph_offsets, self._captions = {}, {}, {}, {}
            self._pid = os.getpid()

    def read_image(self, region_shard: int, region_row: int, image_id: str) -> ImageItem:
        """Read one image's regions and, when configured, its graphs.

        Raises:
            DataError: when the shards do not contain `image_id` at that row, or its graph
                does not match its regions.
        """
        self._own_handles()
        shard = self._region_shard(region_shard)
        if shard.image_ids[region_row] != image_id:
            raise DataError(
                f"{shard.path} row {region_row} is {shard.image_ids[region_row]!r}, expected {image_id!r}; "
                f"regions/index.parquet is stale, rerun `cmsei-prep extract`"
            )
        regions = shard[region_row]
        height, width = regions.image_size
        count = len(regions.boxes)
        keep = count if self.options.max_regions is None else min(count, self.options.max_regions)

        scale = np.array([width, height, width, height], dtype=np.float32)
        boxes_norm = np.clip(regions.boxes[:keep] / scale, 0.0, 1.0).astype(np.float32)
        item = ImageItem(features=regions.features[:keep], boxes_norm=boxes_norm)
        if self.options.spatial_graph or self.options.semantic_graph:
            self._read_graph(item, region_shard, region_row, image_id, count, keep)
        return item

    def _region_shard(self, index: int) -> RegionShard:
        if index not in self._regions:
            self._regions[index] = RegionShard(self.root / "regions" / region_shard_name(index))
        return self._regions[index]

    def _graph_file(self, index: int) -> tuple[h5py.File, np.ndarray, np.ndarray, list[str]]:
        if index not in self._graphs:
            path = self.root / "graphs" / graph_shard_name(index)
            h5 = h5py.File(path, "r")
            _check_graph_file(h5, path)
            self._graphs[index] = h5
            self._graph_offsets[index] = (
                h5["spatial_offsets"][()],
                h5["sg_offsets"][()],
                read_strings(h5["image_ids"]),
            )
        spatial_offsets, sg_offsets, image_ids = self._graph_offsets[index]
        return self._graphs[index], spatial_offsets, sg_offsets, image_ids

    def _read_graph(self, item: ImageItem, shard: int, row: int, image_id: str, count: int, keep: int) -> None:
        h5, spatial_offsets, sg_offsets, image_ids = self._graph_file(shard)
        if row >= len(image_ids) or image_ids[row] != image_id:
            raise DataError(
                f"graph shard {graph_shard_name(shard)} row {row} does not hold image {image_id!r}; "
                f"the graphs are out of date, rerun `cmsei-prep graphs`"
            )

        if self.options.spatial_graph:
            start, stop = int(spatial_offsets[row]), int(spatial_offsets[row + 1])
            if stop - start != count * count:
                raise DataError(
                    f"graph shard {graph_shard_name(shard)}: image {image_id!r} has {stop - start} spatial labels "
                    f"but {count} regions ({count * count} labels expected); rerun `cmsei-prep graphs`"
                )
            labels = h5["spatial_labels"][start:stop].reshape(count, count)
            item.spatial_labels = np.ascontiguousarray(labels[:keep, :keep]).astype(np.uint8)

        if self.options.semantic_graph:
            start, stop = int(sg_offsets[row]), int(sg_offsets[row + 1])
            subjects = h5["sg_subject"][start:stop].astype(np.int64)
            objects = h5["sg_object"][start:stop].astype(np.int64)
            valid = (subjects >= 0) & (objects >= 0) & (subjects < keep) & (objects < keep)
            if np.any((subjects >= count) | (objects >= count) | (subjects < 0) | (objects < 0)):
                raise DataError(
                    f"graph shard {graph_shard_name(shard)}: image {image_id!r} has scene-graph edges outside "
                    f"its {count} regions; rerun `cmsei-prep graphs`"
                )
            item.sg_edges = np.stack([subjects[valid], objects[valid]], axis=1).reshape(-1, 2)
            item.sg_predicates = h5["sg_predicate"][start:stop].astype(np.int64)[valid]
            item.sg_scores = h5["sg_score"][start:stop].astype(np.float32)[valid]

    def read_caption(self, caption_shard: int, caption_row: int) -> np.ndarray:
        """Return one caption's token ids, (n,) int64, cut to `max_words`."""
        self._own_handles()
        h5, offsets = self._caption_file(caption_shard)
        start, stop = int(offsets[caption_row]), int(offsets[caption_row + 1])
        if self.options.max_words is not None:
            stop = min(stop, start + self.options.max_words)
        words = [word.decode("utf-8") if isinstance(word, bytes) else str(word) for word in h5["token_lower"][start:stop]]
        return np.asarray(self.vocabulary.encode(words), dtype=np.int64)

    def _caption_file(self, index: int) -> tuple[h5py.File, np.ndarray]:
        if index not in self._captions:
            h5 = h5py.File(self.root / "captions" / caption_shard_name(index), "r")
            self._captions[index] = (h5, h5["token_offsets"][()])
        return self._captions[index]

    def close(self) -> None:
        """Close the handles that this process opened."""
        if self._pid == os.getpid():
            for shard in self._regions.values():
                shard.close()
            for h5 in self._graphs.values():
                h5.close()
            for h5, _ in self._captions.values():
                h5.close()
        self._regions, self._graphs, self._graph_offsets, self._captions = {}, {}, {}, {}


class CachedReader:
    """A `ShardReader` whose items are read once, up front, and then served from memory.

    Features stay in their stored dtype (float16 by default), so the cache takes about
    R * D * 2 bytes per image.

    Args:
        reader: the reader to fill the cache from.
        images: `image_table` rows to cache.
        pairs: pairs whose captions to cache.
    """

    def __init__(self, reader: ShardReader, images: pd.DataFrame, pairs: pd.DataFrame) -> None:
        self.options = reader.options
        self._images = {
            (int(row.region_shard), int(row.region_row)): reader.read_image(
                int(row.region_shard), int(row.region_row), row.image_id
            )
            for row in images.itertuples(index=False)
        }
        self._captions = {
            (int(row.caption_shard), int(row.caption_row)): reader.read_caption(
                int(row.caption_shard), int(row.caption_row)
            )
            for row in pairs.itertuples(index=False)
        }
        reader.close()
        feature_bytes = sum(item.features.nbytes for item in self._images.values())
        logger.info("cached %d images (%.1f MiB of features) and %d captions", len(self._images),
                    feature_bytes / 2**20, len(self._captions))

    def read_image(self, region_shard: int, region_row: int, image_id: str) -> ImageItem:
        """Return the cached image; raises KeyError for an image that was not cached."""
        return self._images[(region_shard, region_row)]

    def read_caption(self, caption_shard: int, caption_row: int) -> np.ndarray:
        """Return the cached caption; raises KeyError for a caption that was not cached."""
        return self._captions[(caption_shard, caption_row)]

    def close(self) -> None:
        """Release nothing; the cache lives as long as the reader."""


Reader = ShardReader | CachedReader


class PairDataset(Dataset):
    """Image-caption pairs for training: item i is pair i of `pairs`.

    Each item is (ImageItem, token ids (n,) int64, image position). The image position is
    the index of the pair's image in `image_table(pairs)`, so the loss can tell which pairs
    show the same image.
    """

    def __init__(self, reader: Reader, pairs: pd.DataFrame) -> None:
        self.reader = reader
        self.pairs = pairs.reset_index(drop=True)
        positions = {image_id: index for index, image_id in enumerate(self.pairs["image_id"].unique())}
        self.image_positions = self.pairs["image_id"].map(positions).to_numpy(np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[ImageItem, np.ndarray, int]:
        row = self.pairs.iloc[index]
        image = self.reader.read_image(int(row.region_shard), int(row.region_row), row.image_id)
        tokens = self.reader.read_caption(int(row.caption_shard), int(row.caption_row))
        return image, tokens, int(self.image_positions[index])


class ImageDataset(Dataset):
    """The images of an `image_table`, for encoding each image once."""

    def __init__(self, reader: Reader, images: pd.DataFrame) -> None:
        self.reader = reader
        self.images = images.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> ImageItem:
        row = self.images.iloc[index]
        return self.reader.read_image(int(row.region_shard), int(row.region_row), row.image_id)


class CaptionDataset(Dataset):
    """The captions of a pair table, for encoding each caption once."""

    def __init__(self, reader: Reader, pairs: pd.DataFrame) -> None:
        self.reader = reader
        self.pairs = pairs.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> np.ndarray:
        row = self.pairs.iloc[index]
        return self.reader.read_caption(int(row.caption_shard), int(row.caption_row))


@dataclass
class ImageBatch:
    """Padded images, ready for `CMSEI.encode_images`.

    Attributes:
        features: (B, k, D) float32.
        region_mask: (B, k) bool, True for real regions.
        boxes_norm: (B, k, 4) float32.
        spatial_labels: (B, k, k) uint8, or None without the spatial graph.
        sg_edges: (B, E, 2) int64, or None without the semantic graph; likewise the next three.
        sg_predicates: (B, E) int64.
        sg_scores: (B, E) float32.
        sg_mask: (B, E) bool, True for real edges.
    """

    features: torch.Tensor
    region_mask: torch.Tensor
    boxes_norm: torch.Tensor
    spatial_labels: torch.Tensor | None = None
    sg_edges: torch.Tensor | None = None
    sg_predicates: torch.Tensor | None = None
    sg_scores: torch.Tensor | None = None
    sg_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def _map(self, function: Any) -> ImageBatch:
        values = {name: None if value is None else function(value) for name, value in self.__dict__.items()}
        return ImageBatch(**values)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageBatch:
        """Return a copy on `device`."""
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> ImageBatch:
        """Return a copy in pinned memory; the DataLoader calls this with `pin_memory=True`."""
        return self._map(lambda tensor: tensor.pin_memory())

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        """Return the tensors as keyword arguments of `CMSEI.encode_images`."""
        return dict(self.__dict__)


@dataclass
class CaptionBatch:
    """Padded captions: token_ids (C, n) int64 padded with 0, lengths (C,) int64."""

    token_ids: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CaptionBatch:
        """Return a copy on `device`."""
        return CaptionBatch(self.token_ids.to(device, non_blocking=non_blocking),
                            self.lengths.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CaptionBatch:
        """Return a copy in pinned memory."""
        return CaptionBatch(self.token_ids.pin_memory(), self.lengths.pin_memory())


@dataclass
class PairBatch:
    """A training batch: B images, their B captions and (B,) int64 image positions."""

    images: ImageBatch
    captions: CaptionBatch
    image_positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """Return a copy on `device`."""
        return PairBatch(self.images.to(device, non_blocking), self.captions.to(device, non_blocking),
                         self.image_positions.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PairBatch:
        """Return a copy in pinned memory."""
        return PairBatch(self.images.pin_memory(), self.captions.pin_memory(), self.image_positions.pin_memory())


def collate_images(items: Sequence[ImageItem]) -> ImageBatch:
    """Pad images to the most regions and edges of the batch.

    Raises:
        ValueError: when `items` is empty or mixes images with and without graphs.
    """
    if not items:
        raise ValueError("cannot collate an empty list of images")
    batch = len(items)
    k = max(len(item.boxes_norm) for item in items)
    feature_dim = items[0].features.shape[1]

    features = torch.zeros(batch, k, feature_dim, dtype=torch.float32)
    region_mask = torch.zeros(batch, k, dtype=torch.bool)
    boxes = torch.zeros(batch, k, 4, dtype=torch.float32)
    for index, item in enumerate(items):
        count = len(item.boxes_norm)
        features[index, :count] = torch.from_numpy(np.asarray(item.features, dtype=np.float32))
        region_mask[index, :count] = True
        boxes[index, :count] = torch.from_numpy(item.boxes_norm)
    result = ImageBatch(features, region_mask, boxes)

    has_spatial = [item.spatial_labels is not None for item in items]
    if any(has_spatial):
        if not all(has_spatial):
            raise ValueError("some images of the batch have spatial labels and some do not")
        result.spatial_labels = torch.zeros(batch, k, k, dtype=torch.uint8)
        for index, item in enumerate(items):
            count = len(item.boxes_norm)
            result.spatial_labels[index, :count, :count] = torch.from_numpy(item.spatial_labels)

    has_edges = [item.sg_edges is not None for item in items]
    if any(has_edges):
        if not all(has_edges):
            raise ValueError("some images of the batch have scene-graph edges and some do not")
        _collate_edges(result, items)
    return result


def _collate_edges(result: ImageBatch, items: Sequence[ImageItem]) -> None:
    batch = len(items)
    edges = max(len(item.sg_edges) for item in items)
    result.sg_edges = torch.zeros(batch, edges, 2, dtype=torch.int64)
    result.sg_predicates = torch.zeros(batch, edges, dtype=torch.int64)
    result.sg_scores = torch.zeros(batch, edges, dtype=torch.float32)
    result.sg_mask = torch.zeros(batch, edges, dtype=torch.bool)
    for index, item in enumerate(items):
        count = len(item.sg_edges)
        result.sg_edges[index, :count] = torch.from_numpy(item.sg_edges)
        result.sg_predicates[index, :count] = torch.from_numpy(item.sg_predicates)
        result.sg_scores[index, :count] = torch.from_numpy(item.sg_scores)
        result.sg_mask[index, :count] = True


def collate_captions(items: Sequence[np.ndarray]) -> CaptionBatch:
    """Pad token id arrays with 0 to the longest caption of the batch.

    Raises:
        ValueError: when `items` is empty or contains an empty caption.
    """
    if not items:
        raise ValueError("cannot collate an empty list of captions")
    lengths = torch.tensor([len(tokens) for tokens in items], dtype=torch.int64)
    if int(lengths.min()) < 1:
        raise ValueError("a caption has no tokens; the pair index should have dropped it")
    token_ids = torch.zeros(len(items), int(lengths.max()), dtype=torch.int64)
    for index, tokens in enumerate(items):
        token_ids[index, : len(tokens)] = torch.from_numpy(tokens)
    return CaptionBatch(token_ids, lengths)


def collate_pairs(items: Sequence[tuple[ImageItem, np.ndarray, int]]) -> PairBatch:
    """Collate `PairDataset` items into a `PairBatch`."""
    images = collate_images([item[0] for item in items])
    captions = collate_captions([item[1] for item in items])
    positions = torch.tensor([item[2] for item in items], dtype=torch.int64)
    return PairBatch(images, captions, positions)


class DistinctImageBatchSampler(Sampler[list[int]]):
    """Batches of pair indices in which every image appears at most once.

    An epoch visits every pair once, in rounds. Each image's captions are shuffled, and
    round r takes caption r of every image that has more than r captions, in a shuffled
    image order. Each round is cut into batches on its own, so a batch never contains two
    captions of one image and the positives of the similarity matrix lie on its diagonal.
    Batches of a single pair have no negative and are dropped. The order depends only on
    (seed, epoch), so a resumed run sees the same batches.

    With several processes, process `rank` takes every `world_size`-th batch, and every
    process gets the same number of batches.

    Args:
        image_positions: (M,) int64 image position of every pair.
        batch_size: pairs per batch, >= 2.
        seed: base seed.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self, image_positions: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 2:
            raise ValueError(f"batch size must be >= 2, so that every pair has a negative; got {batch_size}")
        self.image_positions = np.asarray(image_positions, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        order = np.argsort(self.image_positions, kind="stable")
        boundaries = np.flatnonzero(np.diff(self.image_positions[order])) + 1
        self._groups = np.split(order, boundaries) if len(order) else []

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of epoch `epoch` (counted from 0)."""
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        shuffled = [rng.permutation(group) for group in self._groups]
        rounds = max((len(group) for group in shuffled), default=0)
        batches = []
        for round_index in range(rounds):
            pairs = np.array([group[round_index] for group in shuffled if len(group) > round_index], dtype=np.int64)
            pairs = pairs[rng.permutation(len(pairs))]
            for start in range(0, len(pairs), self.batch_size):
                batch = pairs[start : start + self.batch_size]
                if len(batch) >= 2:
                    batches.append(batch.tolist())
        return batches

    def __iter__(self):
        batches = self._all_batches()
        per_rank = len(batches) // self.world_size
        yield from batches[self.rank : per_rank * self.world_size : self.world_size]

    def __len__(self) -> int:
        return len(self._all_batches()) // self.world_size
