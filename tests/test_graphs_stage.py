"""End-to-end tests of the graphs stage and relation training on synthetic scenes.

The scenes are real PNG files from the synth generator. Their regions come from the
real extraction stage, with the tiny detector and untrained weights pooling features at
the annotated boxes. Ray, HDF5 and the predictor are the real ones.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from graphs.image_graphs import load_image_graphs
from graphs.networkx_view import to_networkx
from graphs.predictor import RelationPredictor
from graphs.relation_data import load_training_set, read_relation_annotations, split_images
from graphs.spatial import COVER, INSIDE, NONE, OVERLAP, RELATION_NAMES, relation_labels
from graphs.train_relations import load_checkpoint, save_checkpoint, train_relation_predictor
from pipeline import cli
from pipeline.dataset import DatasetFolder
from pipeline.extract import ExtractOptions, extract_images
from pipeline.graph_shards import GraphShard, GraphShardContent, SceneGraphEdges, verify_graph_shard, write_graph_shard
from pipeline.graphs_stage import GraphsError, GraphsOptions, build_graphs
from pipeline.inspect import inspect_dataset, verify_dataset
from pipeline.manifest import StageConflictError
from pipeline.ray_runner import RayOptions
from pipeline.region_shards import RegionShard
from pipeline.synth import generate_scenes

pytestmark = pytest.mark.ray

ONE_WORKER = RayOptions(workers=1, cpus_per_worker=1)
BROKEN = "broken.png"

# Sectors of graphs.spatial, by the half plane of the direction from i's centre to j's.
RIGHT_HALF = {4, 5, 10, 11}  # [270, 360) and [0, 90): dx > 0
LEFT_HALF = {6, 7, 8, 9}  # [90, 270): dx < 0
UPPER_HALF = {4, 5, 6, 7}  # [0, 180): j above i in the picture
LOWER_HALF = {8, 9, 10, 11}  # [180, 360): j below i in the picture


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, ray_local) -> Path:
    """Eight synthetic scenes plus one broken file, extracted at the annotated boxes."""
    root = tmp_path_factory.mktemp("graphs-stage")
    summary = generate_scenes(root / "synth", 8, seed=3)
    (root / "synth" / "images" / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    extract_images(ExtractOptions(images=root / "synth" / "images", out=root / "data", detector="tiny",
                                  weights="untrained", device="cpu", boxes=summary.annotations_path, ray=ONE_WORKER))
    return root


@pytest.fixture(scope="module")
def checkpoint(scenes) -> Path:
    """A small predictor trained for two epochs on the scenes."""
    annotations = read_relation_annotations(scenes / "synth" / "annotations.json")
    training_set = load_training_set(DatasetFolder(scenes / "data"), annotations)
    model, _ = train_relation_predictor(list(training_set.samples.values()), annotations.predicate_names,
                                        len(training_set.object_names), training_set.feature_dim, epochs=2, lr=3e-3,
                                        seed=0, device="cpu", hidden_dim=32, embed_dim=8)
    path = scenes / "relations.pt"
    save_checkpoint(path, model)
    return path


def copy_regions(scenes: Path, target: Path) -> Path:
    """Return a fresh dataset folder holding a copy of the scenes' regions stage."""
    shutil.copytree(scenes / "data" / "regions", target / "regions")
    return target


@pytest.fixture(scope="module")
def predicted(scenes, checkpoint, tmp_path_factory):
    """A graphs run with the predictor and top-K 5, in its own dataset folder."""
    data = copy_regions(scenes, tmp_path_factory.mktemp("predicted"))
    summary = build_graphs(GraphsOptions(data=data, relations=checkpoint, top_k=5, device="cpu", ray=ONE_WORKER))
    return data, summary


def region_shard(data: Path) -> RegionShard:
    return RegionShard(data / "regions" / "shard-00000.h5")


def graph_shard(data: Path) -> GraphShard:
    return GraphShard(data / "graphs" / "graphs-00000.h5")


# The stage with a predictor.


def test_graph_shard_follows_region_shard(predicted):
    data, summary = predicted
    with region_shard(data) as regions, graph_shard(data) as graphs:
        assert graphs.image_ids == regions.image_ids
        assert len(graphs) == 9
        for row in range(len(regions)):
            image = regions[row]
            labels = graphs.spatial(row)
            if image.status == "ok":
                np.testing.assert_array_equal(labels, relation_labels(image.boxes, image.image_size))
            else:
                assert image.image_id == BROKEN
                assert labels.shape == (0, 0)
                assert len(graphs.scene_graph(row)) == 0
    assert summary.images == 9
    assert summary.images_with_regions == 8
    assert summary.exit_code == 0


def test_scene_graph_edges_are_the_predictor_top_k(predicted, checkpoint):
    data, _ = predicted
    model, _ = load_checkpoint(checkpoint, device="cpu")
    with region_shard(data) as regions, graph_shard(data) as graphs:
        assert graphs.predicate_names == list(model.predicate_names)
        for row in range(len(regions)):
            image = regions[row]
            edges = graphs.scene_graph(row)
            if image.status != "ok":
                continue
            pairs, predicates, scores = model.predict_image(image.features, image.object_ids, image.boxes,
                                                            image.image_size, top_k=5)
            np.testing.assert_array_equal(edges.subject, pairs[:, 0])
            np.testing.assert_array_equal(edges.object, pairs[:, 1])
            np.testing.assert_array_equal(edges.predicate, predicates)
            np.testing.assert_allclose(edges.score, scores, rtol=1e-6)
            assert len(edges) <= 5
            assert (np.diff(edges.score) <= 0).all()


def test_graph_shard_records_config(predicted, checkpoint):
    data, summary = predicted
    with graph_shard(data) as graphs:
        attrs = graphs.attrs
    assert attrs["schema"] == "cmsei.graphs"
    assert attrs["schema_version"] == 1
    assert attrs["complete"]
    assert attrs["num_images"] == 9
    assert attrs["config"]["top_k"] == 5
    assert attrs["config"]["scene_graphs"]["format"] == "predictor"
    assert len(attrs["config"]["scene_graphs"]["checkpoint_sha256"]) == 64
    assert attrs["num_edges"] == summary.scene_graph_edges
    assert summary.scene_graph_counts["images"] == 8


def test_summary_counts_spatial_labels(predicted):
    data, summary = predicted
    expected = np.zeros(len(RELATION_NAMES), dtype=np.int64)
    with region_shard(data) as regions:
        for row in range(len(regions)):
            image = regions[row]
            if image.status == "ok":
                expected += np.bincount(relation_labels(image.boxes, image.image_size).ravel(), minlength=12)
                expected[NONE] -= image.boxes.shape[0]
    assert summary.spatial_edges == dict(zip(RELATION_NAMES, expected.tolist()))
    written = json.loads((data / "graphs" / "summary.json").read_text())
    assert written["spatial_edges"] == summary.spatial_edges


def test_inspect_and_verify_graphs(predicted):
    data, summary = predicted
    stage = inspect_dataset(data)["stages"]["graphs"]
    assert stage["shards"] == 1
    assert stage["images"] == 9
    assert stage["spatial_edges"] == summary.spatial_edges
    assert sum(stage["scene_graph_predicates"].values()) == summary.scene_graph_edges
    assert verify_dataset(data)["graphs"] == []


def test_rerun_reuses_shard(predicted, checkpoint):
    data, _ = predicted
    again = build_graphs(GraphsOptions(data=data, relations=checkpoint, top_k=5, device="cpu", ray=ONE_WORKER))
    assert again.shards_written == 0
    assert again.shards_reused == 1


def test_rerun_with_other_options_conflicts(predicted, checkpoint):
    data, _ = predicted
    with pytest.raises(StageConflictError, match="different configuration"):
        build_graphs(GraphsOptions(data=data, relations=checkpoint, top_k=7, device="cpu", ray=ONE_WORKER))


def test_networkx_views_of_one_image(predicted):
    data, _ = predicted
    graphs = load_image_graphs(DatasetFolder(data), "scene_00000.png")
    spatial = to_networkx(graphs.spatial)
    count = graphs.regions.boxes.shape[0]
    assert spatial.number_of_nodes() == count
    assert spatial.number_of_edges() == int((graphs.spatial.labels != NONE).sum())
    for subject, object_, attributes in spatial.edges(data=True):
        assert attributes["relation"] == RELATION_NAMES[graphs.spatial.labels[subject, object_]]
        assert attributes["relation"] != "none"
    assert spatial.nodes[0]["box"] == tuple(float(v) for v in graphs.regions.boxes[0])
    assert spatial.nodes[0]["object"].startswith("object_")

    scene = to_networkx(graphs.scene)
    assert scene.number_of_edges() == len(graphs.scene.edges)
    subject, object_ = int(graphs.scene.edges.subject[0]), int(graphs.scene.edges.object[0])
    name = graphs.scene.predicate_names[graphs.scene.edges.predicate[0]]
    assert scene.edges[subject, object_, name]["score"] == pytest.approx(float(graphs.scene.edges.score[0]))
    assert to_networkx(graphs.scene, min_score=2.0).number_of_edges() == 0


def test_to_networkx_rejects_containers(predicted):
    data, _ = predicted
    graphs = load_image_graphs(DatasetFolder(data), "scene_00000.png")
    with pytest.raises(TypeError, match="graphs.spatial or graphs.scene"):
        to_networkx(graphs)
    with pytest.raises(TypeError, match="SpatialGraph"):
        to_networkx({"nodes": []})
    with pytest.raises(ValueError, match="scene graphs only"):
        to_networkx(graphs.spatial, min_score=0.5)


# Spatial labels against the generator's relations.


def spatial_agreement(predicate: str, label: int, boxes: np.ndarray, size: tuple[int, int], subject: int,
                      object_: int) -> bool:
    """Return whether spatial label(subject, object) agrees with the generator's predicate.

    - inside: the label is ``inside`` (the generator never makes identical boxes);
    - contains: the label is ``cover``;
    - overlapping: the label is neither ``inside`` nor ``cover`` (the boxes are not
      nested), and it is ``overlap`` exactly when their IoU is at least 0.5;
    - left of: when the centres are closer than half the image diagonal, the label is a
      sector of the right half plane, because the object's centre lies at least the
      margin to the right. Farther apart, the label is ``none``.
    - right of, above and below: the same with the left, lower and upper half plane
      (above means the object lies lower in the picture).
    """
    first, second = boxes[subject], boxes[object_]
    centre_offset = (second[:2] + second[2:]) / 2 - (first[:2] + first[2:]) / 2
    near = math.hypot(*centre_offset) < 0.5 * math.hypot(*size)
    if predicate == "inside":
        return label == INSIDE
    if predicate == "contains":
        return label == COVER
    if predicate == "overlapping":
        inter = np.clip(np.minimum(first[2:], second[2:]) - np.maximum(first[:2], second[:2]), 0, None).prod()
        union = np.prod(first[2:] - first[:2]) + np.prod(second[2:] - second[:2]) - inter
        return label not in (INSIDE, COVER) and (label == OVERLAP) == (inter / union >= 0.5)
    sectors = {"left of": RIGHT_HALF, "right of": LEFT_HALF, "above": LOWER_HALF, "below": UPPER_HALF}[predicate]
    return label in sectors if near else label == NONE


def test_stage_spatial_labels_agree_with_generator(predicted, scenes):
    data, _ = predicted
    annotations = json.loads((scenes / "synth" / "annotations.json").read_text())
    checked = 0
    with region_shard(data) as regions, graph_shard(data) as graphs:
        for image in annotations["images"]:
            row = graphs.row(image["image"])
            labels = graphs.spatial(row)
            boxes = regions[row].boxes.astype(np.float64)
            for relation in image["relations"]:
                subject, object_ = relation["subject"], relation["object"]
                label = int(labels[subject, object_])
                assert spatial_agreement(relation["predicate"], label, boxes, regions[row].image_size, subject,
                                         object_), (image["image"], relation, RELATION_NAMES[label])
                checked += 1
    assert checked > 20


def test_spatial_labels_agree_with_generator_on_many_scenes(tmp_path):
    summary = generate_scenes(tmp_path / "synth", 150, seed=11)
    annotations = json.loads(summary.annotations_path.read_text())
    counts: dict[str, int] = {}
    for image in annotations["images"]:
        boxes = np.array([obj["box"] for obj in image["objects"]], dtype=np.float64)
        size = (image["height"], image["width"])
        labels = relation_labels(boxes, size)
        for relation in image["relations"]:
            subject, object_, predicate = relation["subject"], relation["object"], relation["predicate"]
            label = int(labels[subject, object_])
            assert spatial_agreement(predicate, label, boxes, size, subject, object_), (image["image"], relation,
                                                                                        RELATION_NAMES[label])
            counts[predicate] = counts.get(predicate, 0) + 1
    assert set(counts) == {"left of", "right of", "above", "below", "inside", "contains", "overlapping"}


# Other scene-graph sources and invalid input.


def test_cli_graphs_without_scene_graphs(scenes, tmp_path):
    data = copy_regions(scenes, tmp_path)
    assert cli.main(["graphs", "--data", str(data), "--top-k", "3", "--workers", "1", "--cpus-per-worker", "1"]) == 0
    summary = json.loads((data / "graphs" / "summary.json").read_text())
    assert summary["scene_graphs"] == "none"
    assert summary["scene_graph_edges"] == 0
    assert any("no scene graphs" in note for note in summary["notes"])
    with graph_shard(data) as graphs:
        assert graphs.predicate_names == ["__background__"]
        assert graphs.attrs["config"] == {"top_k": 3, "scene_graphs": "none",
                                          "spatial": "graphs.spatial 12 labels, min_size 1"}
        assert (np.diff(graphs.sg_offsets) == 0).all()
        assert graphs.spatial(graphs.row("scene_00000.png")).shape[0] >= 2
    assert "no scene graphs" in inspect_dataset(data)["stages"]["graphs"]["note"]


def test_stage_rejects_regions_without_boxes(scenes, tmp_path):
    data = copy_regions(scenes, tmp_path)
    manifest_path = data / "regions" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(manifest | {"has_boxes": False}))
    with pytest.raises(GraphsError, match="imported without boxes"):
        build_graphs(GraphsOptions(data=data, ray=ONE_WORKER))
    assert not (data / "graphs").exists()


def test_stage_rejects_checkpoint_of_other_class_space(scenes, tmp_path):
    data = copy_regions(scenes, tmp_path)
    other = RelationPredictor(256, 10, ("__background__", "left of"), hidden_dim=8, embed_dim=4)
    save_checkpoint(tmp_path / "other.pt", other)
    with pytest.raises(GraphsError, match="trained for 10 object classes and 256 features.*1600 classes"):
        build_graphs(GraphsOptions(data=data, relations=tmp_path / "other.pt", device="cpu", ray=ONE_WORKER))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"relations": "a.pt", "import_vinvl": "b.tsv"}, "only one"),
        ({"import_sgb": "pred.json"}, "--sgb-info"),
        ({"sgb_info": "info.json"}, "only used with --import-sgb"),
        ({"top_k": 0}, "--top-k"),
        ({"match_iou": 0.0}, "--match-iou"),
    ],
)
def test_stage_rejects_bad_options(tmp_path, change, message):
    with pytest.raises(GraphsError, match=message):
        build_graphs(GraphsOptions(data=tmp_path, **change))


def test_verify_reports_damaged_and_missing_shards(predicted, tmp_path):
    data, _ = predicted
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    with h5py.File(copy / "graphs" / "graphs-00000.h5", "r+") as h5:
        h5["spatial_labels"][0] = 12
    problems = verify_dataset(copy)["graphs"]
    assert any("spatial label 12 is outside 0..11" in problem for problem in problems)

    (copy / "graphs" / "graphs-00000.h5").unlink()
    assert any("graphs-00000.h5 is missing" in problem for problem in verify_dataset(copy)["graphs"])


def test_write_graph_shard_rejects_inconsistent_content(tmp_path):
    edges = SceneGraphEdges(np.array([0], np.int32), np.array([2], np.int32), np.array([1], np.int32),
                            np.array([0.5], np.float32))
    content = GraphShardContent.from_images(["a.png"], np.zeros(4, np.uint8), np.array([0, 4]), [edges],
                                            ["__background__", "on"])
    with pytest.raises(RuntimeError, match="outside its image"):
        write_graph_shard(tmp_path / "graphs-00000.h5", 0, content, {"config": {}}, expected_region_counts=[2])
    assert list(tmp_path.iterdir()) == []

    content = GraphShardContent.from_images(["a.png"], np.zeros(4, np.uint8), np.array([0, 4]), [SceneGraphEdges.empty()],
                                            ["__background__", "on"])
    with pytest.raises(RuntimeError, match="do not match the region counts"):
        write_graph_shard(tmp_path / "graphs-00000.h5", 0, content, {"config": {}}, expected_region_counts=[3])
    write_graph_shard(tmp_path / "graphs-00000.h5", 0, content, {"config": {}}, expected_region_counts=[2])
    assert verify_graph_shard(tmp_path / "graphs-00000.h5", ["a.png"], [2]) == []
    assert verify_graph_shard(tmp_path / "graphs-00000.h5", ["b.png"], [2]) == ["image ids differ from the region shard's image ids"]


# The command line: graphs and train-relations.


def test_cli_graphs_reports_invalid_import(scenes, tmp_path, caplog):
    data = copy_regions(scenes, tmp_path)
    (tmp_path / "bad.tsv").write_text("scene_00000.png no tab here\n")
    assert cli.main(["graphs", "--data", str(data), "--import-vinvl", str(tmp_path / "bad.tsv")]) == 2
    assert "line 1 has no tab" in caplog.text


def test_cli_train_relations(scenes, tmp_path):
    annotations = json.loads((scenes / "synth" / "annotations.json").read_text())
    # One image gets an extra object that its regions lack; training must skip and report it.
    count = len(annotations["images"][0]["objects"])
    annotations["images"][0]["objects"].append({"box": [1, 1, 20, 20], "label": "circle"})
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(annotations))
    out, report_path = tmp_path / "relations.pt", tmp_path / "report.json"

    code = cli.main(["train-relations", "--data", str(scenes / "data"), "--annotations", str(path), "--out", str(out),
                     "--epochs", "1", "--hidden-dim", "16", "--embed-dim", "4", "--device", "cpu",
                     "--val-fraction", "0.25", "--report", str(report_path)])
    assert code == 0
    report = json.loads(report_path.read_text())
    skipped_id = annotations["images"][0]["image"]
    assert report["skipped"] == {skipped_id: report["skipped"][skipped_id]}
    assert f"{count + 1} objects but the region shard has {count} regions" in report["skipped"][skipped_id]
    assert report["train_images"] + report["val_images"] == 7
    assert report["val_images"] == 2
    assert set(report["recall"]) >= {"recall@20", "recall@50", "recall@100"}

    model, meta = load_checkpoint(out, device="cpu")
    assert model.num_object_classes == 1600
    assert model.feature_dim == 256
    assert meta["recall"] == report["recall"]
    assert meta["class_source"] == "detector"
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["predicate_names"][0] == "__background__"


def test_training_set_joins_regions_and_annotations(scenes):
    annotations = read_relation_annotations(scenes / "synth" / "annotations.json")
    training_set = load_training_set(DatasetFolder(scenes / "data"), annotations)
    assert sorted(training_set.samples) == sorted(annotations.images)
    sample = training_set.samples["scene_00000.png"]
    annotated = annotations.images["scene_00000.png"]
    np.testing.assert_allclose(sample["boxes"], annotated.boxes)
    np.testing.assert_array_equal(sample["relations"], annotated.relations)
    assert sample["features"].dtype == np.float16


def test_split_images_is_reproducible():
    ids = [f"{index}.png" for index in range(20)]
    train, held_out = split_images(ids, 0.1, seed=4)
    assert len(held_out) == 2
    assert sorted(train + held_out) == sorted(ids)
    assert split_images(list(reversed(ids)), 0.1, seed=4) == (train, held_out)
    assert split_images(ids, 0.1, seed=5) != (train, held_out)
