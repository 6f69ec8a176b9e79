"""Tests of the scene-graph imports: Scene-Graph-Benchmark custom output and VinVL predictions.tsv.

The import files are written here in the layouts those tools produce, for synthetic
scenes whose regions the real extraction stage pooled at the annotated boxes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from graphs.import_sgb import read_sgb_predictions
from graphs.import_vinvl import read_vinvl_predictions
from graphs.imported import (
    ImportedSceneGraph,
    SceneGraphImportError,
    box_iou,
    greedy_match,
    match_image_keys,
    match_to_regions,
    resized_frame_size,
)
from pipeline.extract import ExtractOptions, extract_images
from pipeline.graph_shards import GraphShard
from pipeline.graphs_stage import GraphsOptions, build_graphs
from pipeline.ray_runner import RayOptions
from pipeline.region_shards import RegionShard
from pipeline.synth import generate_scenes

ONE_WORKER = RayOptions(workers=1, cpus_per_worker=1)
SGB_PREDICATES = ["__background__", "above", "left of", "on"]
# A box far from every shape of the scenes; it matches no region.
STRAY_BOX = [0.0, 0.0, 2.0, 2.0]


@pytest.fixture(scope="module")
def regions(tmp_path_factory, ray_local) -> Path:
    """Three synthetic scenes extracted at their annotated boxes."""
    root = tmp_path_factory.mktemp("sg-import")
    summary = generate_scenes(root / "synth", 3, seed=5)
    extract_images(ExtractOptions(images=root / "synth" / "images", out=root / "data", detector="tiny",
                                  weights="untrained", device="cpu", boxes=summary.annotations_path, ray=ONE_WORKER))
    return root / "data"


def region_boxes(data: Path) -> dict[str, np.ndarray]:
    with RegionShard(data / "regions" / "shard-00000.h5") as shard:
        return {shard.image_ids[row]: shard[row].boxes.astype(np.float64) for row in range(len(shard))}


def fresh_copy(data: Path, target: Path) -> Path:
    shutil.copytree(data / "regions", target / "regions")
    return target


def sgb_record(boxes: np.ndarray, scale: float) -> dict:
    """An SGB prediction whose boxes are the regions in reverse order, in the resized frame, plus a stray box.

    Relations: box 0 -> box 1 "left of" (0.9), box 1 -> box 0 "above" (0.8), box 0 ->
    stray box "on" (0.95, dropped: no region), and box 0 -> box 1 "left of" again (0.5,
    dropped: duplicate).
    """
    reordered = (boxes[::-1] * scale).tolist() + [STRAY_BOX]
    stray = len(reordered) - 1
    return {
        "bbox": reordered,
        "bbox_labels": [1] * len(reordered),
        "bbox_scores": [0.9] * len(reordered),
        "rel_pairs": [[0, 1], [1, 0], [0, stray], [0, 1]],
        "rel_labels": [2, 1, 3, 2],
        "rel_scores": [0.9, 0.8, 0.95, 0.5],
        "rel_all_scores": [[0.0] * 4] * 4,
    }


def write_sgb(folder: Path, boxes: dict[str, np.ndarray]) -> tuple[Path, Path]:
    # Synthetic scenes are 256 x 256, so the default resize (600, 1000) makes them 600 x 600.
    scale = 600 / 256
    files = ["/elsewhere/images/scene_00000.png", "scene_00001.png", "/elsewhere/images/not_in_dataset.png"]
    predictions = {"0": sgb_record(boxes["scene_00000.png"], scale), "1": sgb_record(boxes["scene_00001.png"], scale),
                   "2": sgb_record(boxes["scene_00000.png"], scale)}
    info = {"idx_to_files": files, "ind_to_classes": ["__background__", "circle"], "ind_to_predicates": SGB_PREDICATES}
    prediction_path, info_path = folder / "custom_prediction.json", folder / "custom_data_info.json"
    prediction_path.write_text(json.dumps(predictions))
    info_path.write_text(json.dumps(info))
    return prediction_path, info_path


def vinvl_line(key: str, boxes: np.ndarray) -> str:
    objects = [{"rect": box.tolist(), "bbox_id": index, "class": "circle", "conf": 0.9}
               for index, box in enumerate(boxes[::-1])]
    objects.append({"rect": STRAY_BOX, "bbox_id": len(objects), "class": "dot", "conf": 0.2})
    relations = [
        {"subj_id": 0, "obj_id": 1, "class": "on", "conf": 0.7},
        {"subj_id": 1, "obj_id": 0, "class": "near", "conf": 0.6},
        {"subj_id": 1, "obj_id": len(objects) - 1, "class": "near", "conf": 0.99},
    ]
    return f"{key}\t{json.dumps({'objects': objects, 'relations': relations})}\n"


def expected_edges(boxes: np.ndarray, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Map pairs of reversed-order box indices back to region rows."""
    last = boxes.shape[0] - 1
    return [(last - subject, last - object_) for subject, object_ in pairs]


# Stage runs.


@pytest.mark.ray
def test_sgb_import_matches_boxes_to_regions(regions, tmp_path):
    data = fresh_copy(regions, tmp_path / "data")
    boxes = region_boxes(regions)
    prediction_path, info_path = write_sgb(tmp_path, boxes)
    summary = build_graphs(GraphsOptions(data=data, import_sgb=prediction_path, sgb_info=info_path, ray=ONE_WORKER))

    with GraphShard(data / "graphs" / "graphs-00000.h5") as graphs:
        assert graphs.predicate_names == SGB_PREDICATES
        for image_id in ("scene_00000.png", "scene_00001.png"):
            edges = graphs.scene_graph(graphs.row(image_id))
            pairs = list(zip(edges.subject.tolist(), edges.object.tolist()))
            assert pairs == expected_edges(boxes[image_id], [(0, 1), (1, 0)])
            assert edges.predicate.tolist() == [2, 1]
            np.testing.assert_allclose(edges.score, [0.9, 0.8])
        assert len(graphs.scene_graph(graphs.row("scene_00002.png"))) == 0
        assert graphs.attrs["config"]["scene_graphs"]["format"] == "sgb-custom"

    counts = summary.scene_graph_counts
    assert counts["images"] == 2
    assert counts["images_without_import"] == 1
    assert counts["file_images_unmatched"] == 1
    assert counts["boxes"] == counts["boxes_matched"] + 2
    assert counts["edges_unmatched_box"] == 2
    assert counts["edges_duplicate"] == 2
    assert counts["edges_kept"] == 4
    assert any("not_in_dataset.png" in note for note in summary.notes)
    assert any("2 of" in note and "imported boxes match no region" in note for note in summary.notes)


@pytest.mark.ray
def test_vinvl_import_keeps_top_k(regions, tmp_path):
    boxes = region_boxes(regions)
    tsv = tmp_path / "predictions.tsv"
    tsv.write_text(vinvl_line("scene_00001", boxes["scene_00001.png"]) + vinvl_line("other", boxes["scene_00000.png"]))
    labelmap = tmp_path / "labelmap.json"
    labelmap.write_text(json.dumps({"label_to_idx": {"circle": 1}, "predicate_to_idx": {"on": 1, "near": 2, "has": 3}}))

    data = fresh_copy(regions, tmp_path / "data")
    summary = build_graphs(GraphsOptions(data=data, import_vinvl=tsv, vinvl_labelmap=labelmap, top_k=1, ray=ONE_WORKER))
    with GraphShard(data / "graphs" / "graphs-00000.h5") as graphs:
        assert graphs.predicate_names == ["__background__", "on", "near", "has"]
        edges = graphs.scene_graph(graphs.row("scene_00001.png"))
        assert list(zip(edges.subject.tolist(), edges.object.tolist())) == expected_edges(boxes["scene_00001.png"], [(0, 1)])
        assert edges.predicate.tolist() == [1]
        assert graphs.attrs["config"]["scene_graphs"]["format"] == "vinvl-tsv"
    counts = summary.scene_graph_counts
    assert counts["edges_over_top_k"] == 1
    assert counts["edges_unmatched_box"] == 1
    assert counts["file_images_unmatched"] == 1


def test_vinvl_reader_without_labelmap_sorts_predicates(tmp_path):
    boxes = np.array([[10.0, 10.0, 50.0, 40.0], [60.0, 20.0, 90.0, 70.0], [5.0, 80.0, 30.0, 99.0]])
    tsv = tmp_path / "predictions.tsv"
    tsv.write_text(vinvl_line("scene_00001", boxes))
    imported = read_vinvl_predictions(tsv, ["scene_00000.png", "scene_00001.png"])
    assert imported.predicate_names == ("__background__", "near", "on")
    graph = imported.graphs["scene_00001.png"]
    assert graph.predicate.tolist() == [2, 1, 1]
    assert graph.resized_frame is None
    np.testing.assert_allclose(graph.boxes[:-1], boxes[::-1])


# Readers and matching without Ray.


def test_resized_frame_size_follows_the_test_resize():
    assert resized_frame_size((480, 640), 600, 1000) == (600, 800)
    assert resized_frame_size((427, 640), 600, 1000) == (600, 899)
    assert resized_frame_size((640, 427), 600, 1000) == (899, 600)
    # The longer side would reach 1500, so the shorter side shrinks to 400, its own length.
    assert resized_frame_size((400, 1000), 600, 1000) == (400, 1000)
    assert resized_frame_size((256, 256), 600, 1000) == (600, 600)


def test_greedy_match_takes_highest_iou_first():
    iou = np.array([[0.9, 0.8], [0.95, 0.6], [0.4, 0.3]])
    # Box 1 takes region 0 (0.95), box 0 then takes region 1 (0.8), box 2 is below the threshold.
    assert greedy_match(iou, 0.5).tolist() == [1, 0, -1]
    assert greedy_match(iou, 0.99).tolist() == [-1, -1, -1]
    assert greedy_match(np.zeros((0, 3)), 0.5).tolist() == []


def test_box_iou_values():
    first = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    second = np.array([[5, 0, 15, 10], [0, 0, 10, 10]])
    np.testing.assert_allclose(box_iou(first, second), [[50 / 150, 1.0], [0.0, 0.0]])


def test_match_to_regions_scales_resized_boxes():
    regions = np.array([[10.0, 20.0, 50.0, 60.0], [100.0, 100.0, 180.0, 150.0]])
    # Image 300 x 200 (height x width): resized to 900 x 600, scale 3.
    graph = ImportedSceneGraph(boxes=regions[::-1] * 3, subject=np.array([0]), object=np.array([1]),
                               predicate=np.array([4]), score=np.array([0.7], np.float32), resized_frame=(600, 1000))
    edges, counts = match_to_regions(graph, regions, (300, 200), top_k=5)
    assert (edges.subject.tolist(), edges.object.tolist(), edges.predicate.tolist()) == ([1], [0], [4])
    assert counts.boxes_matched == 2


def test_match_image_keys_rules():
    ids = ["a/1.jpg", "b/1.jpg", "c/2.jpg", "3.png"]
    matched, unmatched = match_image_keys(["/data/x/a/1.jpg", "1.jpg", "2", "3.png", "c/2.jpg", "4.png"], ids)
    assert matched == {"/data/x/a/1.jpg": "a/1.jpg", "2": "c/2.jpg", "3.png": "3.png", "c/2.jpg": "c/2.jpg"}
    # "1.jpg" is ambiguous (a/1.jpg or b/1.jpg), "4.png" names no image.
    assert unmatched == ["1.jpg", "4.png"]


def test_sgb_reader_rejects_bad_files(tmp_path):
    prediction_path, info_path = write_sgb(tmp_path, {"scene_00000.png": np.ones((2, 4)), "scene_00001.png": np.ones((2, 4))})
    predictions = json.loads(prediction_path.read_text())

    predictions["1"]["rel_labels"][0] = 4
    prediction_path.write_text(json.dumps(predictions))
    with pytest.raises(SceneGraphImportError, match=r'image "1" \(scene_00001.png\): rel_labels must lie in 1..3'):
        read_sgb_predictions(prediction_path, info_path, ["scene_00000.png", "scene_00001.png"])

    del predictions["1"]
    prediction_path.write_text(json.dumps(predictions))
    with pytest.raises(SceneGraphImportError, match='no prediction "1"'):
        read_sgb_predictions(prediction_path, info_path, ["scene_00000.png", "scene_00001.png"])

    predictions["0"]["bbox"] = [[1, 2, 3]]
    prediction_path.write_text(json.dumps(predictions))
    with pytest.raises(SceneGraphImportError, match="'bbox' is not a numeric array|'bbox' has shape"):
        read_sgb_predictions(prediction_path, info_path, ["scene_00000.png"])

    info_path.write_text(json.dumps({"idx_to_files": []}))
    with pytest.raises(SceneGraphImportError, match="ind_to_predicates"):
        read_sgb_predictions(prediction_path, info_path, ["scene_00000.png"])

    info_path.write_text("{not json")
    with pytest.raises(SceneGraphImportError, match="not valid JSON"):
        read_sgb_predictions(prediction_path, info_path, ["scene_00000.png"])

    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_sgb_predictions(prediction_path, tmp_path / "missing.json", ["scene_00000.png"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a.png {}", "has no tab"),
        ("a.png\t{not json", "not valid JSON"),
        ("a.png\t" + json.dumps({"relations": []}), "no list 'objects'"),
        ("a.png\t" + json.dumps({"objects": [{"rect": [0, 0, 1, 1]}], "relations": [{"subj_id": 0, "obj_id": 3, "class": "on"}]}),
         "obj_id is 3"),
        ("a.png\t" + json.dumps({"objects": [{"rect": [0, 0, 1]}], "relations": []}), "rect"),
    ],
)
def test_vinvl_reader_rejects_bad_lines(tmp_path, line, message):
    path = tmp_path / "predictions.tsv"
    path.write_text(line + "\n")
    with pytest.raises(SceneGraphImportError, match=f"line 1.*{message}|{message}"):
        read_vinvl_predictions(path, ["a.png"])


def test_vinvl_reader_rejects_predicate_missing_from_labelmap(tmp_path):
    path = tmp_path / "predictions.tsv"
    path.write_text("a.png\t" + json.dumps({"objects": [{"rect": [0, 0, 1, 1]}, {"rect": [2, 2, 3, 3]}],
                                            "relations": [{"subj_id": 0, "obj_id": 1, "class": "under", "conf": 0.5}]}) + "\n")
    labelmap = tmp_path / "labelmap.json"
    labelmap.write_text(json.dumps({"predicate_to_idx": {"on": 1}}))
    with pytest.raises(SceneGraphImportError, match="predicate 'under'"):
        read_vinvl_predictions(path, ["a.png"], labelmap_path=labelmap)
