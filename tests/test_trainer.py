"""Tests of `cmsei-train` on a tiny dataset folder built with the real stages.

The folder comes from `synth --paired` scenes and features of the untrained tiny detector
pooled at the ground-truth boxes (real Ray, real HDF5). Its captions are parsed by spaCy.
Its graph shards are written with h5py in the graph shard schema: spatial labels from
`graphs.spatial.relation_labels_batch`, and the ground-truth relations as scene-graph edges.
Models use d = 32 so that every run takes seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cmsei_model import cli_train
from cmsei_model.checkpoint import BEST, LAST, CheckpointError, load_checkpoint
from cmsei_model.data import (
    CachedReader,
    DataError,
    DistinctImageBatchSampler,
    GraphInfo,
    ImageItem,
    ReaderOptions,
    ShardReader,
    build_pair_index,
    collate_images,
    collate_pairs,
    holdout_mask,
    image_table,
    inspect_graphs,
    load_vocabulary,
    plan_splits,
)
from cmsei_model.train import TrainOptions, build_config, train
from graphs.spatial import relation_labels_batch
from pipeline.captions_stage import CaptionsOptions, build_captions
from pipeline.extract import ExtractOptions, extract_images
from pipeline.ray_runner import RayOptions
from pipeline.region_shards import RegionShard
from pipeline.synth import PREDICATES, generate_scenes

SMALL_MODEL = {"embed_size": 32, "word_dim": 16, "batch_size": 6, "loader_workers": 0, "progress": False}
PREDICATE_NAMES = ("__background__", *PREDICATES)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_graph_shards(data: Path, annotations_path: Path) -> None:
    """Write one graph shard per region shard: spatial labels of the regions and the true relations."""
    annotations = json.loads(annotations_path.read_text(encoding="utf-8"))
    relations = {image["image"]: image["relations"] for image in annotations["images"]}
    folder = data / "graphs"
    folder.mkdir(exist_ok=True)
    for region_path in sorted((data / "regions").glob("shard-*.h5")):
        with RegionShard(region_path) as shard:
            labels, label_offsets = relation_labels_batch(shard.array("boxes"), shard.offsets, shard.image_sizes)
            image_ids = shard.image_ids
        edges: dict[str, list] = {"sg_subject": [], "sg_object": [], "sg_predicate": [], "sg_score": []}
        edge_offsets = [0]
        for image_id in image_ids:
            for relation in relations[image_id]:
                edges["sg_subject"].append(relation["subject"])
                edges["sg_object"].append(relation["object"])
                edges["sg_predicate"].append(PREDICATE_NAMES.index(relation["predicate"]))
                edges["sg_score"].append(1.0)
            edge_offsets.append(len(edges["sg_subject"]))

        index = int(region_path.stem.split("-")[1])
        with h5py.File(folder / f"graphs-{index:05d}.h5", "w") as h5:
            strings = h5py.string_dtype("utf-8")
            h5.create_dataset("image_ids", data=np.array(image_ids, dtype=object), dtype=strings)
            h5.create_dataset("spatial_offsets", data=np.asarray(label_offsets, dtype=np.int64))
            h5.create_dataset("spatial_labels", data=np.asarray(labels, dtype=np.uint8))
            h5.create_dataset("sg_offsets", data=np.asarray(edge_offsets, dtype=np.int64))
            for name in ("sg_subject", "sg_object", "sg_predicate"):
                h5.create_dataset(name, data=np.asarray(edges[name], dtype=np.int32))
            h5.create_dataset("sg_score", data=np.asarray(edges["sg_score"], dtype=np.float32))
            h5.create_dataset("predicate_names", data=np.array(PREDICATE_NAMES, dtype=object), dtype=strings)
            h5.attrs["schema"] = "cmsei.graphs"
            h5.attrs["schema_version"] = 1
            h5.attrs["complete"] = True


def build_tiny_dataset(
    root: Path, n_images: int, write_captions: Callable[[Path], Path] | None = None
) -> tuple[Path, Path]:
    """Build synth scenes and a dataset folder with regions, captions and graphs; return (scenes, data).

    Args:
        root: empty folder to build in.
        n_images: even number of paired scenes.
        write_captions: writes another caption file from the scenes folder and returns its
            path; by default the scenes' captions.jsonl is parsed.
    """
    scenes = root / "scenes"
    data = root / "data"
    generate_scenes(out_dir=scenes, n_images=n_images, seed=3, paired=True, size=96)
    captions = write_captions(scenes) if write_captions else scenes / "captions.jsonl"
    ray = RayOptions(workers=1, cpus_per_worker=1)
    extract_images(ExtractOptions(images=scenes / "images", out=data, detector="tiny", weights="untrained",
                                  boxes=scenes / "annotations.json", ray=ray))
    build_captions(CaptionsOptions(captions=captions, out=data, ray=ray, vocab_threshold=1))
    write_graph_shards(data, scenes / "annotations.json")
    return scenes, data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ray_local) -> tuple[Path, Path]:
    return build_tiny_dataset(tmp_path_factory.mktemp("trainer"), 20)


@pytest.fixture(scope="module")
def tiny_without_graphs(tiny, tmp_path_factory) -> Path:
    """The same regions and captions in a dataset folder without a graphs stage."""
    _, data = tiny
    copy = tmp_path_factory.mktemp("no-graphs") / "data"
    copy.mkdir()
    for stage in ("regions", "captions"):
        (copy / stage).symlink_to(data / stage, target_is_directory=True)
    return copy


def _options(data: Path, out: Path, **changes) -> TrainOptions:
    return TrainOptions(data=data, out=out, **(SMALL_MODEL | changes))


@pytest.fixture(scope="module")
def two_epoch_run(tiny, tmp_path_factory):
    _, data = tiny
    out = tmp_path_factory.mktemp("run") / "run"
    summary = train(_options(data, out, epochs=2, max_steps_per_epoch=3))
    return out, summary


def test_run_writes_checkpoints_and_metrics(two_epoch_run):
    out, summary = two_epoch_run
    for name in (LAST, BEST, "metrics.csv", "metrics.json", "curves.png", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary.epochs_completed == 2
    assert 1 <= summary.best_epoch <= 2

    rows = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert [row["hardest_negative"] for row in rows] == [False, True]
    assert [row["step"] for row in rows] == [3, 6]
    for key in ("train_loss", "samples_per_s", "val_i2t_r1", "val_t2i_r10", "val_rsum"):
        assert np.isfinite(rows[-1][key]), key
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["epoch", "step"]
    assert "val_rsum" in header


def test_checkpoint_contents(two_epoch_run, tiny):
    out, summary = two_epoch_run
    last = load_checkpoint(out / LAST)
    assert last["epoch"] == 2
    assert last["step"] == 6
    assert last["best_rsum"] == pytest.approx(summary.best_rsum)
    for key in ("optimizer", "scheduler", "rng", "vocabulary", "config", "splits", "predicate_names"):
        assert key in last, key
    assert last["config"]["embed_dim"] == 32
    assert last["config"]["spatial_graph"] and last["config"]["semantic_graph"]
    assert last["config"]["num_predicates"] == len(PREDICATE_NAMES)
    assert last["vocabulary"] == dict(load_vocabulary(tiny[1]).items())

    best = load_checkpoint(out / BEST)
    assert best["epoch"] == summary.best_epoch
    assert "optimizer" not in best


def test_existing_run_needs_resume_or_overwrite(two_epoch_run, tiny):
    out, _ = two_epoch_run
    with pytest.raises(FileExistsError, match="--resume"):
        train(_options(tiny[1], out, epochs=1))


def test_resume_without_checkpoint_fails(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        train(_options(tiny[1], tmp_path / "empty", resume=True))


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    _, data = tiny
    settings = {"max_steps_per_epoch": 2, "seed": 5}
    train(_options(data, tmp_path / "whole", epochs=2, **settings))
    train(_options(data, tmp_path / "split", epochs=1, **settings))
    first = load_checkpoint(tmp_path / "split" / LAST)
    assert first["epoch"] == 1

    summary = train(_options(data, tmp_path / "split", epochs=2, resume=True, **settings))
    assert summary.epochs_completed == 2
    whole = load_checkpoint(tmp_path / "whole" / LAST)
    resumed = load_checkpoint(tmp_path / "split" / LAST)
    assert resumed["epoch"] == whole["epoch"] == 2
    assert resumed["step"] == whole["step"] == 4
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert resumed["scheduler"] == whole["scheduler"]

    rows = json.loads((tmp_path / "split" / "metrics.json").read_text())["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2]
    whole_rows = json.loads((tmp_path / "whole" / "metrics.json").read_text())["epochs"]
    assert rows[1]["train_loss"] == pytest.approx(whole_rows[1]["train_loss"], rel=1e-6)


def test_resume_drops_metrics_of_unfinished_epoch(tiny, tmp_path):
    _, data = tiny
    out = tmp_path / "run"
    train(_options(data, out, epochs=1, max_steps_per_epoch=1))
    metrics_path = out / "metrics.json"
    rows = json.loads(metrics_path.read_text())["epochs"]
    metrics_path.write_text(json.dumps({"epochs": rows + [dict(rows[0], epoch=2)]}))

    train(_options(data, out, epochs=2, max_steps_per_epoch=1, resume=True))
    rows = json.loads(metrics_path.read_text())["epochs"]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[1]["step"] == 2


def test_training_without_graph_shards(tiny_without_graphs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cmsei_model.train"):
        summary = train(_options(tiny_without_graphs, tmp_path / "run", epochs=1, max_steps_per_epoch=1))
    assert "no graph shards" in caplog.text
    config = load_checkpoint(tmp_path / "run" / LAST)["config"]
    assert not config["spatial_graph"]
    assert not config["semantic_graph"]
    assert summary.epochs_completed == 1


def test_explicit_graph_flag_without_graphs_fails(tiny_without_graphs, tmp_path):
    with pytest.raises(DataError, match="--no-spatial-graph"):
        train(_options(tiny_without_graphs, tmp_path / "run", spatial_graph=True))


def test_cached_training_runs(tiny, tmp_path):
    summary = train(_options(tiny[1], tmp_path / "run", epochs=1, max_steps_per_epoch=2, cache=True,
                             loader_workers=1))
    assert summary.last_row["train_pairs"] == 12


def _parse(*flags: str) -> TrainOptions:
    args = cli_train.build_parser().parse_args(["--data", "DATA", "--out", "RUN", *flags])
    return cli_train.options_from_args(args)


def test_ablation_flags_change_config():
    graphs = GraphInfo(True, PREDICATE_NAMES)
    full = build_config(_parse(), 256, graphs, Path("DATA"))
    for name in ("spatial_graph", "semantic_graph", "interaction", "cross_level", "box_geometry"):
        assert getattr(full, name), name
    assert full.num_predicates == len(PREDICATE_NAMES)

    cases = {
        "--no-spatial-graph": "spatial_graph",
        "--no-semantic-graph": "semantic_graph",
        "--no-interaction": "interaction",
        "--no-cross-level": "cross_level",
    }
    for flag, field_name in cases.items():
        config = build_config(_parse(flag), 256, graphs, Path("DATA"))
        assert not getattr(config, field_name), flag
        others = [name for name in cases.values() if name != field_name]
        assert all(getattr(config, name) for name in others), flag


def test_baseline_and_size_flags():
    graphs = GraphInfo(True, PREDICATE_NAMES)
    baseline = build_config(_parse("--baseline", "--embed-size", "64"), 256, graphs, Path("DATA"))
    assert baseline.alignment == "t2i"
    assert not (baseline.spatial_graph or baseline.semantic_graph or baseline.interaction or baseline.cross_level)
    assert baseline.embed_dim == 64

    sized = build_config(_parse("--embed-size", "48", "--word-dim", "20", "--relation-threshold", "0.3",
                                "--no-gradient-checkpointing", "--pairs-per-chunk", "99"), 256, graphs, Path("DATA"))
    assert (sized.embed_dim, sized.word_dim, sized.relation_threshold) == (48, 20, 0.3)
    assert not sized.gradient_checkpointing
    assert sized.max_pairs_per_chunk == 99
    assert build_config(_parse(), 256, graphs, Path("DATA")).gradient_checkpointing


def test_default_hyper_parameters():
    options = _parse()
    assert (options.lr, options.batch_size, options.grad_clip, options.margin) == (2e-4, 128, 2.0, 0.2)
    assert options.warmup_epochs == 1
    assert options.embed_size == 1024
    assert options.word_dim == 300
    assert options.threads is None
    assert _parse("--threads", "1").threads == 1


def test_cli_reports_missing_dataset(tmp_path, caplog):
    code = cli_train.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    assert "not found" in caplog.text


def test_cli_rejects_bad_option(tmp_path, caplog):
    code = cli_train.main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--batch-size", "1"])
    assert code == 2
    assert "--batch-size must be >= 2" in caplog.text


def test_single_process_gloo_group(tiny, tmp_path, monkeypatch, caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO, logger="cmsei_model.distributed"):
        summary = train(_options(tiny[1], tmp_path / "run", epochs=1, max_steps_per_epoch=1, device="cpu"))
    assert "process 0 of 1 on cpu (gloo)" in caplog.text
    assert summary.epochs_completed == 1
    assert not torch.distributed.is_initialized()


def test_reader_normalises_boxes_and_reads_graphs(tiny):
    scenes, data = tiny
    annotations = {image["image"]: image for image in json.loads((scenes / "annotations.json").read_text())["images"]}
    pairs = build_pair_index(data)
    row = image_table(pairs).iloc[3]
    reader = ShardReader(data, load_vocabulary(data), ReaderOptions(spatial_graph=True, semantic_graph=True))
    item = reader.read_image(int(row.region_shard), int(row.region_row), row.image_id)

    truth = annotations[row.image_id]
    expected = np.array([obj["box"] for obj in truth["objects"]], dtype=np.float32) / 96.0
    np.testing.assert_allclose(item.boxes_norm, expected, atol=1e-6)
    assert item.features.shape == (len(truth["objects"]), 256)
    assert item.spatial_labels.shape == (len(truth["objects"]),) * 2
    assert np.all(np.diag(item.spatial_labels) == 0)
    relations = {(r["subject"], r["object"], PREDICATE_NAMES.index(r["predicate"])) for r in truth["relations"]}
    read = set(zip(item.sg_edges[:, 0].tolist(), item.sg_edges[:, 1].tolist(), item.sg_predicates.tolist()))
    assert read == relations
    reader.close()


def test_reader_caps_regions_and_edges(tiny):
    _, data = tiny
    pairs = build_pair_index(data)
    images = image_table(pairs)
    row = images[images["num_regions"] >= 3].iloc[0]
    reader = ShardReader(data, load_vocabulary(data), ReaderOptions(True, True, max_regions=2, max_words=3))
    item = reader.read_image(int(row.region_shard), int(row.region_row), row.image_id)
    assert len(item.boxes_norm) == 2
    assert item.spatial_labels.shape == (2, 2)
    assert np.all(item.sg_edges < 2)
    caption = pairs.iloc[0]
    assert len(reader.read_caption(int(caption.caption_shard), int(caption.caption_row))) == 3


def test_reader_rejects_stale_index(tiny):
    _, data = tiny
    row = image_table(build_pair_index(data)).iloc[0]
    reader = ShardReader(data, load_vocabulary(data), ReaderOptions())
    with pytest.raises(DataError, match="stale"):
        reader.read_image(int(row.region_shard), int(row.region_row) + 1, row.image_id)


def test_cached_reader_matches_lazy_reader(tiny):
    _, data = tiny
    pairs = build_pair_index(data)
    options = ReaderOptions(spatial_graph=True, semantic_graph=True)
    lazy = ShardReader(data, load_vocabulary(data), options)
    cached = CachedReader(ShardReader(data, load_vocabulary(data), options), image_table(pairs), pairs)
    for row in pairs.iloc[::7].itertuples(index=False):
        from_disk = lazy.read_image(row.region_shard, row.region_row, row.image_id)
        from_memory = cached.read_image(row.region_shard, row.region_row, row.image_id)
        np.testing.assert_array_equal(from_disk.features, from_memory.features)
        np.testing.assert_array_equal(from_disk.sg_edges, from_memory.sg_edges)
        np.testing.assert_array_equal(lazy.read_caption(row.caption_shard, row.caption_row),
                                      cached.read_caption(row.caption_shard, row.caption_row))


def test_caption_tokens_use_the_vocabulary(tiny):
    _, data = tiny
    vocabulary = load_vocabulary(data)
    pairs = build_pair_index(data)
    reader = ShardReader(data, vocabulary, ReaderOptions())
    caption = pairs.iloc[0]
    ids = reader.read_caption(int(caption.caption_shard), int(caption.caption_row))
    assert ids.dtype == np.int64
    assert len(ids) == caption.num_tokens
    words = vocabulary.decode(ids.tolist())
    assert words[0] in {"a", "there", "the"}


def test_collate_pads_with_masks(tiny):
    _, data = tiny
    pairs = build_pair_index(data)
    images = image_table(pairs).sort_values("num_regions")
    reader = ShardReader(data, load_vocabulary(data), ReaderOptions(True, True))
    rows = [images.iloc[0], images.iloc[-1]]
    items = [reader.read_image(int(r.region_shard), int(r.region_row), r.image_id) for r in rows]
    batch = collate_images(items)

    k = max(len(item.boxes_norm) for item in items)
    assert batch.features.shape == (2, k, 256)
    assert batch.region_mask.sum(dim=1).tolist() == [len(item.boxes_norm) for item in items]
    assert batch.features.dtype == torch.float32
    small = len(items[0].boxes_norm)
    assert torch.all(batch.features[0, small:] == 0)
    assert torch.all(batch.spatial_labels[0, small:] == 0)
    assert batch.sg_mask.sum(dim=1).tolist() == [len(item.sg_edges) for item in items]


def test_collate_pairs_keeps_image_positions():
    features = np.ones((2, 4), dtype=np.float16)
    boxes = np.array([[0, 0, 0.5, 0.5], [0.2, 0.2, 1, 1]], dtype=np.float32)
    items = [
        (ImageItem(features, boxes), np.array([5, 6, 7]), 3),
        (ImageItem(features[:1], boxes[:1]), np.array([4]), 0),
    ]
    batch = collate_pairs(items)
    assert batch.image_positions.tolist() == [3, 0]
    assert batch.captions.lengths.tolist() == [3, 1]
    assert batch.captions.token_ids.tolist() == [[5, 6, 7], [4, 0, 0]]
    assert batch.images.spatial_labels is None


def test_batches_hold_distinct_images():
    positions = np.repeat(np.arange(10), [5, 5, 5, 3, 5, 5, 1, 5, 5, 5])
    sampler = DistinctImageBatchSampler(positions, batch_size=4, seed=1)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert len(set(positions[batch].tolist())) == len(batch)
        assert len(batch) >= 2
    seen = sorted(index for batch in batches for index in batch)
    assert len(seen) == len(set(seen))
    assert len(seen) >= len(positions) - 5


def test_batch_order_depends_on_seed_and_epoch():
    positions = np.repeat(np.arange(12), 5)
    sampler = DistinctImageBatchSampler(positions, batch_size=4, seed=1)
    sampler.set_epoch(3)
    first = list(sampler)
    again = DistinctImageBatchSampler(positions, batch_size=4, seed=1)
    again.set_epoch(3)
    assert list(again) == first
    sampler.set_epoch(4)
    assert list(sampler) != first


def test_batches_split_across_ranks():
    positions = np.repeat(np.arange(12), 5)
    whole = DistinctImageBatchSampler(positions, batch_size=3, seed=0)
    ranks = [DistinctImageBatchSampler(positions, batch_size=3, seed=0, rank=rank, world_size=2) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole) // 2
    assert sorted(map(tuple, list(ranks[0]) + list(ranks[1]))) == sorted(map(tuple, list(whole)[: 2 * len(ranks[0])]))


def test_holdout_mask_is_deterministic():
    ids = [f"image_{index:05d}.jpg" for index in range(2000)]
    mask = holdout_mask(ids, 0.2)
    assert mask.tolist() == holdout_mask(list(reversed(ids)), 0.2)[::-1].tolist()
    assert 0.15 < mask.mean() < 0.25
    assert np.all(holdout_mask(ids, 0.3)[mask])
    with pytest.raises(ValueError, match="holdout fraction"):
        holdout_mask(ids, 1.0)


def test_named_splits_are_used(tiny):
    _, data = tiny
    pairs = build_pair_index(data)
    images = pairs["image_id"].unique()
    named = pairs.copy()
    named["split"] = np.where(named["image_id"].isin(images[:4]), "val", "train")
    train_pairs, val_pairs, plan = plan_splits(named, "train", "val")
    assert set(val_pairs["image_id"]) == set(images[:4])
    assert plan.holdout_fraction is None
    assert plan.train_splits == ("train",)
    with pytest.raises(DataError, match="not found"):
        plan_splits(named, "restval", "val")


def test_holdout_split_without_names(tiny):
    _, data = tiny
    pairs = build_pair_index(data)
    train_pairs, val_pairs, plan = plan_splits(pairs, "train", "val", holdout_fraction=0.3)
    assert plan.holdout_fraction == 0.3
    assert plan.val_split == ""
    assert set(train_pairs["image_id"]).isdisjoint(val_pairs["image_id"])
    assert len(train_pairs) + len(val_pairs) == len(pairs)
    expected = set(pairs["image_id"][holdout_mask(pairs["image_id"], 0.3)])
    assert set(val_pairs["image_id"]) == expected


def test_inspect_graphs_detects_partial_stage(tiny, tmp_path):
    _, data = tiny
    copy = tmp_path / "data"
    copy.mkdir()
    (copy / "graphs").mkdir()
    info = inspect_graphs(copy, [0])
    assert not info.available
    shutil.copy(data / "graphs" / "graphs-00000.h5", copy / "graphs" / "graphs-00000.h5")
    assert inspect_graphs(copy, [0]).predicate_names == PREDICATE_NAMES
    with pytest.raises(DataError, match="lacks the graph shards"):
        inspect_graphs(copy, [0, 1])
    with h5py.File(copy / "graphs" / "graphs-00000.h5", "a") as h5:
        h5.attrs["complete"] = False
    with pytest.raises(DataError, match="not marked complete"):
        inspect_graphs(copy, [0])
