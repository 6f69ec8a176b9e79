"""Import of bottom-up-attention and LXMERT TSV files into region shards (real HDF5, real sample TSV)."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.dataset import DatasetFolder
from pipeline.importers import read_vocabulary
from pipeline.importers.stage import FeatureImportError, ImportOptions, import_features, map_image_id
from pipeline.inspect import verify_dataset
from pipeline.manifest import StageConflictError
from pipeline.region_shards import RegionShard, verify_region_shard

SAMPLE_TSV = "butd_features/train2014_obj36.tsv"


def b64(values, dtype: str) -> bytes:
    """Base64 of ``values`` as raw little-endian bytes of ``dtype``."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes())


def lxmert_line(image_id: str, height: int, width: int, boxes: np.ndarray, features: np.ndarray,
                num_boxes: int | None = None) -> bytes:
    """One 10-column LXMERT row; labels are 0..R-1 with confidence 0.5."""
    count = boxes.shape[0]
    fields = [
        image_id.encode(), str(height).encode(), str(width).encode(),
        b64(np.arange(count), "<i8"), b64(np.full(count, 0.5), "<f4"),
        b64(np.arange(count) % 3, "<i8"), b64(np.full(count, 0.25), "<f4"),
        str(count if num_boxes is None else num_boxes).encode(),
        b64(boxes, "<f4"), b64(features, "<f4"),
    ]
    return b"\t".join(fields) + b"\n"


def butd_line(image_id: str, height: int, width: int, boxes: np.ndarray, features: np.ndarray) -> bytes:
    """One 6-column bottom-up-attention row (width before height)."""
    fields = [image_id.encode(), str(width).encode(), str(height).encode(), str(boxes.shape[0]).encode(),
              b64(boxes, "<f4"), b64(features, "<f4")]
    return b"\t".join(fields) + b"\r\n"


def random_regions(seed: int, count: int = 36, dim: int = 2048, height: int = 300, width: int = 400):
    """Boxes (count, 4) inside a height x width image and features (count, dim), float32."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, width / 2, count)
    y1 = rng.uniform(0, height / 2, count)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, width / 2, count), y1 + rng.uniform(1, height / 2, count)], axis=1)
    features = rng.gamma(1.0, 1.0, (count, dim))
    return boxes.astype(np.float32), features.astype(np.float32)


def replace_field(line: bytes, index: int, value: bytes) -> bytes:
    fields = line.rstrip(b"\r\n").split(b"\t")
    fields[index] = value
    return b"\t".join(fields) + b"\n"


def decode_sample_rows(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Decode the sample TSV the way LXMERT's reader does, keyed by img_id."""
    rows = {}
    for line in path.read_bytes().splitlines():
        fields = line.split(b"\t")
        count = int(fields[7])
        rows[fields[0].decode()] = {
            "size": (int(fields[1]), int(fields[2])),
            "object_ids": np.frombuffer(base64.b64decode(fields[3]), np.int64),
            "boxes": np.frombuffer(base64.b64decode(fields[8]), np.float32).reshape(count, 4),
            "features": np.frombuffer(base64.b64decode(fields[9]), np.float32).reshape(count, -1),
        }
    return rows


@pytest.fixture(scope="module")
def sample_import(sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample-import")
    labels = sample_data / "labels"
    summary = import_features(ImportOptions(
        sources=[sample_data / SAMPLE_TSV], out=out,
        objects_vocab=labels / "objects_vocab.txt", attributes_vocab=labels / "attributes_vocab.txt",
    ))
    return out, summary


def test_sample_tsv_six_images(sample_data, sample_import):
    out, summary = sample_import
    assert summary.format == "lxmert-tsv"
    assert summary.num_ok == 6
    assert summary.num_failed == 0

    regions = list(DatasetFolder(out).iter_regions())
    assert len(regions) == 6
    for image in regions:
        assert image.boxes.shape == (36, 4)
        assert image.features.shape == (36, 2048)
        assert image.features.dtype == np.float16


def test_sample_ids_name_image_files(sample_data, sample_import):
    out, _ = sample_import
    folder = sample_data / "butd_features"
    for image in DatasetFolder(out).iter_regions():
        path = folder / image.image_id
        assert path.is_file(), image.image_id
        with Image.open(path) as photo:
            assert image.image_size == (photo.height, photo.width)


def test_sample_names_from_vocabularies(sample_data, sample_import):
    out, _ = sample_import
    objects = read_vocabulary(sample_data / "labels/objects_vocab.txt")
    expected = decode_sample_rows(sample_data / SAMPLE_TSV)
    shard_path = DatasetFolder(out).region_shard_paths()[0]
    with RegionShard(shard_path) as shard:
        assert len(shard.object_names) == 1600
        assert len(shard.attribute_names) == 400
        assert shard.object_names == objects
        for row in range(len(shard)):
            image = shard[row]
            source = expected[image.image_id.removesuffix(".jpg")]
            np.testing.assert_array_equal(image.object_ids, source["object_ids"])
            np.testing.assert_array_equal(image.boxes, source["boxes"])
            np.testing.assert_allclose(image.features, source["features"], rtol=1e-3, atol=1e-3)
    assert verify_region_shard(shard_path) == []
    assert verify_dataset(out) == {"regions": []}


def test_sample_float32_is_exact(sample_data, tmp_path):
    import_features(ImportOptions(sources=[sample_data / SAMPLE_TSV], out=tmp_path, dtype="float32"))
    expected = decode_sample_rows(sample_data / SAMPLE_TSV)
    for image in DatasetFolder(tmp_path).iter_regions():
        assert image.features.dtype == np.float32
        np.testing.assert_array_equal(image.features, expected[image.image_id[:-4]]["features"])


def test_sample_manifest_records_source(sample_data, sample_import):
    out, _ = sample_import
    with RegionShard(DatasetFolder(out).region_shard_paths()[0]) as shard:
        config = shard.attrs["config"]
    assert config["format"] == "lxmert-tsv"
    assert config["sources"][0]["name"] == "train2014_obj36.tsv"
    assert len(config["sources"][0]["sha256"]) == 64
    assert config["has_boxes"] is True


@pytest.fixture(scope="module")
def bad_tsv(tmp_path_factory) -> tuple[Path, dict[str, tuple[str, int]]]:
    """A TSV mixing good rows with one bad row per failure case.

    Returns the file and ``{image id: (expected code or "ok", line number)}``.
    """
    lines: list[bytes] = []
    expected: dict[str, tuple[str, int]] = {}

    def add(image_id: str, line: bytes, outcome: str) -> None:
        lines.append(line)
        expected[image_id + ".jpg"] = (outcome, len(lines))

    good = {name: random_regions(seed) for seed, name in enumerate(["good_a", "good_b", "good_c", "dup"])}
    add("good_a", lxmert_line("good_a", 300, 400, *good["good_a"]), "ok")

    line = lxmert_line("truncated", 300, 400, *good["good_b"])
    add("truncated", line[: len(line) - 1003] + b"\n", "invalid-base64")

    line = lxmert_line("bad_padding", 300, 400, *random_regions(11, count=35))
    add("bad_padding", replace_field(line, 8, line.split(b"\t")[8].rstrip(b"=")), "invalid-base64")

    line = lxmert_line("few_fields", 300, 400, *good["good_b"])
    add("few_fields", b"\t".join(line.split(b"\t")[:9]) + b"\n", "field-count")

    boxes, features = good["good_b"]
    add("short_features", lxmert_line("short_features", 300, 400, boxes, features[:35], num_boxes=36), "num-boxes-mismatch")

    nan_features = features.copy()
    nan_features[3, 7] = np.nan
    add("nan_features", lxmert_line("nan_features", 300, 400, boxes, nan_features), "non-finite")

    inf_boxes = boxes.copy()
    inf_boxes[0, 2] = np.inf
    add("inf_boxes", lxmert_line("inf_boxes", 300, 400, inf_boxes, features), "non-finite")

    outside = boxes.copy()
    outside[5] = (10, 10, 450, 100)
    add("outside", lxmert_line("outside", 300, 400, outside, features), "box-outside-image")

    add("dup", lxmert_line("dup", 300, 400, *good["dup"]), "duplicate-id")
    add("good_b", lxmert_line("good_b", 300, 400, *good["good_b"]), "ok")
    lines.append(lxmert_line("dup", 300, 400, *good["good_c"]))
    lines.append(b"\n")
    lines.append(b"\t" + lxmert_line("x", 300, 400, *good["good_c"]).split(b"\t", 1)[1])
    add("good_c", lxmert_line("good_c", 300, 400, *good["good_c"]), "ok")

    path = tmp_path_factory.mktemp("bad-tsv") / "mixed.tsv"
    path.write_bytes(b"".join(lines))
    return path, expected


@pytest.fixture(scope="module")
def bad_import(bad_tsv, tmp_path_factory):
    path, _ = bad_tsv
    out = tmp_path_factory.mktemp("bad-import")
    summary = import_features(ImportOptions(sources=[path], out=out, dtype="float32", shard_size=4))
    return out, summary


def test_bad_rows_recorded_with_line(bad_tsv, bad_import):
    _, expected = bad_tsv
    out, _ = bad_import
    index = DatasetFolder(out).region_index().set_index("image_id")
    for image_id, (outcome, line) in expected.items():
        row = index.loc[image_id]
        if outcome == "ok":
            assert row["status"] == "ok", (image_id, row["reason"])
            assert row["num_regions"] == 36, image_id
            continue
        assert row["status"] == "failed", image_id
        assert row["reason"].startswith(outcome + ": "), (image_id, row["reason"])
        assert f"line {line}" in row["reason"], (image_id, row["reason"])


def test_bad_rows_reason_texts(bad_import):
    out, _ = bad_import
    index = DatasetFolder(out).region_index().set_index("image_id")
    assert index.loc["short_features.jpg", "reason"] == (
        "num-boxes-mismatch: line 5: num_boxes 36 but field features contains 35 rows"
    )
    assert "line 9 and line 11" in index.loc["dup.jpg", "reason"]
    assert "450.0" in index.loc["outside.jpg", "reason"]


def test_row_without_id_skipped(bad_import):
    out, summary = bad_import
    index = DatasetFolder(out).region_index()
    skipped = index[index["status"] == "skipped"]
    assert list(skipped["image_id"]) == ["mixed.tsv:13"]
    assert skipped.iloc[0]["reason"].startswith("missing-id: line 13")
    assert summary.num_skipped == 1


def test_good_rows_survive_bad_ones(bad_tsv, bad_import):
    out, summary = bad_import
    ok = {image.image_id: image for image in DatasetFolder(out).iter_regions()}
    assert sorted(ok) == ["good_a.jpg", "good_b.jpg", "good_c.jpg"]
    boxes, features = random_regions(1)
    np.testing.assert_array_equal(ok["good_b.jpg"].features, features)
    np.testing.assert_array_equal(ok["good_b.jpg"].boxes, boxes)
    assert summary.num_failed == 8
    assert summary.exit_code == 0
    assert verify_dataset(out) == {"regions": []}


def test_row_checks_table(tmp_path):
    boxes, features = random_regions(5, count=4, dim=8)
    inverted = boxes.copy()
    inverted[2] = (50, 10, 20, 40)
    cases = {
        "fine": (lxmert_line("fine", 300, 400, boxes, features), "ok"),
        "huge": (lxmert_line("huge", 300, 400, boxes, features * 1e6), "feature-overflow: line 2: "),
        "inverted": (lxmert_line("inverted", 300, 400, inverted, features), "invalid-box: line 3: box 2 "),
        "no_height": (lxmert_line("no_height", 0, 400, boxes, features), "invalid-size: line 4: "),
        "text_width": (replace_field(lxmert_line("text_width", 300, 400, boxes, features), 2, b"wide"),
                       "invalid-number: line 5: img_w 'wide'"),
    }
    path = tmp_path / "checks.tsv"
    path.write_bytes(b"".join(line for line, _ in cases.values()))
    vocabulary = tmp_path / "objects.txt"
    vocabulary.write_text("a\nb\nc\nd\n", encoding="utf-8")

    import_features(ImportOptions(sources=[path], out=tmp_path / "data", objects_vocab=vocabulary))
    index = DatasetFolder(tmp_path / "data").region_index().set_index("image_id")
    for image_id, (_, expected) in cases.items():
        row = index.loc[image_id + ".jpg"]
        if expected == "ok":
            assert row["status"] == "ok", (image_id, row["reason"])
        else:
            assert row["reason"].startswith(expected), (image_id, row["reason"])

    import_features(ImportOptions(sources=[path], out=tmp_path / "labels", objects_vocab=vocabulary, dtype="float32"))
    index = DatasetFolder(tmp_path / "labels").region_index().set_index("image_id")
    assert index.loc["huge.jpg", "status"] == "ok"
    vocabulary.write_text("a\nb\nc\n", encoding="utf-8")
    import_features(ImportOptions(sources=[path], out=tmp_path / "short-vocab", objects_vocab=vocabulary))
    index = DatasetFolder(tmp_path / "short-vocab").region_index().set_index("image_id")
    assert index.loc["fine.jpg", "reason"] == "invalid-label: line 1: object id 3 is outside the 3-entry objects vocabulary"


def test_identical_duplicates_import_once(tmp_path):
    line = lxmert_line("twice", 300, 400, *random_regions(7))
    path = tmp_path / "twice.tsv"
    path.write_bytes(line + line)
    summary = import_features(ImportOptions(sources=[path], out=tmp_path / "data"))
    assert summary.num_images == 1
    assert summary.num_ok == 1


def test_butd_six_columns(tmp_path):
    boxes, features = random_regions(3, count=10, dim=64, height=200, width=500)
    boxes[0] = (480.0, 10.0, 499.5, 190.0)
    path = tmp_path / "butd.tsv"
    path.write_bytes(butd_line("139", 200, 500, boxes, features) + butd_line("285", 200, 500, *random_regions(4, 10, 64, 200, 500)))

    summary = import_features(ImportOptions(sources=[path], out=tmp_path / "data", id_template="{id:0>12}.jpg", dtype="float32"))
    assert summary.format == "butd-tsv"
    assert summary.feature_dim == 64
    images = {image.image_id: image for image in DatasetFolder(tmp_path / "data").iter_regions()}
    assert sorted(images) == ["000000000139.jpg", "000000000285.jpg"]
    first = images["000000000139.jpg"]
    assert first.image_size == (200, 500)
    np.testing.assert_array_equal(first.features, features)
    assert (first.object_ids == -1).all()
    assert (first.attribute_ids == -1).all()
    assert (first.object_scores == 0).all()


def test_several_tsv_files(tmp_path):
    first, second = tmp_path / "part.tsv.0", tmp_path / "part.tsv.1"
    first.write_bytes(lxmert_line("a", 300, 400, *random_regions(1, dim=32)))
    boxes, features = random_regions(2, dim=32)
    second.write_bytes(lxmert_line("b", 300, 400, *random_regions(3, dim=32))
                       + lxmert_line("c", 300, 400, boxes, features[:5], num_boxes=36))

    summary = import_features(ImportOptions(sources=[first, second], out=tmp_path / "data"))
    index = DatasetFolder(tmp_path / "data").region_index().set_index("image_id")
    assert summary.num_ok == 2
    assert index.loc["c.jpg", "reason"].startswith("num-boxes-mismatch: part.tsv.1 line 2: ")
    assert index.loc["b.jpg", "path"] == str(second)


def test_resume_reuses_valid_shards(sample_data, tmp_path):
    source = sample_data / SAMPLE_TSV
    options = ImportOptions(sources=[source], out=tmp_path, shard_size=2)
    first = import_features(options)
    assert first.shards_written == 3

    stage = tmp_path / "regions"
    (stage / "shard-00001.h5").unlink()
    (stage / "shard-00002.h5").write_bytes(b"not hdf5")
    (stage / "shard-00000.h5.tmp-leftover").write_bytes(b"partial")
    second = import_features(options)
    assert second.shards_reused == 1
    assert second.shards_written == 2
    assert not (stage / "shard-00000.h5.tmp-leftover").exists()
    assert verify_dataset(tmp_path) == {"regions": []}


def test_rerun_other_source_conflicts(sample_data, tmp_path):
    import_features(ImportOptions(sources=[sample_data / SAMPLE_TSV], out=tmp_path / "data"))
    other = tmp_path / "other.tsv"
    other.write_bytes(lxmert_line("x", 300, 400, *random_regions(1)))
    with pytest.raises(StageConflictError):
        import_features(ImportOptions(sources=[other], out=tmp_path / "data"))
    summary = import_features(ImportOptions(sources=[other], out=tmp_path / "data", overwrite=True))
    assert summary.num_images == 1


def test_map_image_id_rules():
    assert map_image_id("COCO_train2014_000000132417", 0, None, ".jpg", "") == "COCO_train2014_000000132417.jpg"
    assert map_image_id("a/b.PNG", 0, None, ".jpg", "") == "a/b.PNG"
    assert map_image_id("139", 0, None, "", "") == "139"
    assert map_image_id("139", 4, "COCO_val2014_{id:0>12}.jpg", ".jpg", "") == "COCO_val2014_000000000139.jpg"
    assert map_image_id("x", 4, "{split}-{row:06d}", ".jpg", "test") == "test-000004"


def test_invalid_id_template_rejected(sample_data, tmp_path):
    with pytest.raises(FeatureImportError, match="--id-template"):
        import_features(ImportOptions(sources=[sample_data / SAMPLE_TSV], out=tmp_path, id_template="{name}.jpg"))


def test_vocabulary_first_synonym(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("man,men\n  dog \nbus,buses", encoding="utf-8")
    assert read_vocabulary(path) == ["man", "dog", "bus"]
    path.write_text("man\n\ndog\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is empty"):
        read_vocabulary(path)


def test_cli_import_and_errors(sample_data, tmp_path):
    copy = tmp_path / "features.txt"
    shutil.copy(sample_data / SAMPLE_TSV, copy)
    assert cli_main(["import", "--source", str(copy), "--out", str(tmp_path / "data"), "--image-ext", ".png"]) == 0
    ids = list(DatasetFolder(tmp_path / "data").region_index()["image_id"])
    assert all(image_id.endswith(".png") for image_id in ids)

    assert cli_main(["import", "--source", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "other")]) == 2
    assert cli_main(["import", "--source", str(copy), "--out", str(tmp_path / "x"), "--image-ext", "jpg"]) == 2
