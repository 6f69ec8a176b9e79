"""Export of region shards to SCAN precomp and TSV files, and import-export-import round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main as cli_main
from pipeline.dataset import DatasetFolder
from pipeline.exporters import ExportOptions, export_features
from pipeline.importers.npz_dirs import load_npy_file
from pipeline.importers.stage import ImportOptions, import_features
from tests.test_import_scan import write_precomp
from tests.test_import_tsv import SAMPLE_TSV, lxmert_line, random_regions

COLUMNS = ("boxes", "features", "object_ids", "object_scores", "attribute_ids", "attribute_scores")


def images_of(data: Path) -> dict:
    return {image.image_id: image for image in DatasetFolder(data).iter_regions()}


def assert_same_images(first: Path, second: Path, columns=COLUMNS) -> None:
    left, right = images_of(first), images_of(second)
    assert sorted(left) == sorted(right)
    for image_id, image in left.items():
        other = right[image_id]
        assert image.image_size == other.image_size, image_id
        for name in columns:
            a, b = getattr(image, name), getattr(other, name)
            assert a.dtype == b.dtype, (image_id, name)
            np.testing.assert_array_equal(a, b, err_msg=f"{image_id} {name}")


@pytest.fixture(scope="module")
def sample_float32(sample_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample-float32")
    labels = sample_data / "labels"
    import_features(ImportOptions(
        sources=[sample_data / SAMPLE_TSV], out=out, dtype="float32",
        objects_vocab=labels / "objects_vocab.txt", attributes_vocab=labels / "attributes_vocab.txt",
    ))
    return out


def test_lxmert_round_trip(sample_data, sample_float32, tmp_path):
    export_features(ExportOptions(data=sample_float32, out=tmp_path / "export", format="lxmert-tsv"))
    exported = tmp_path / "export" / "all.tsv"
    first_fields = exported.read_bytes().split(b"\n")[0].split(b"\t")
    assert first_fields[0] == b"COCO_train2014_000000084002"
    assert len(first_fields) == 10

    import_features(ImportOptions(sources=[exported], out=tmp_path / "again", dtype="float32"))
    assert_same_images(sample_float32, tmp_path / "again")


def test_lxmert_export_matches_source_rows(sample_data, sample_float32, tmp_path):
    export_features(ExportOptions(data=sample_float32, out=tmp_path / "same.tsv", format="lxmert-tsv"))
    source = {line.split(b"\t")[0]: line for line in (sample_data / SAMPLE_TSV).read_bytes().splitlines()}
    exported = {line.split(b"\t")[0]: line for line in (tmp_path / "same.tsv").read_bytes().splitlines()}
    assert source == exported


def test_butd_round_trip(sample_float32, tmp_path):
    export_features(ExportOptions(data=sample_float32, out=tmp_path / "export", format="butd-tsv"))
    exported = tmp_path / "export" / "all.tsv"
    assert len(exported.read_bytes().split(b"\n")[0].split(b"\t")) == 6

    import_features(ImportOptions(sources=[exported], out=tmp_path / "again", dtype="float32"))
    assert_same_images(sample_float32, tmp_path / "again", columns=("boxes", "features"))
    for image in images_of(tmp_path / "again").values():
        assert (image.object_ids == -1).all()


def test_scan_round_trip(sample_float32, tmp_path):
    images_file = tmp_path / "test_images.txt"
    images_file.write_text("\n".join(sorted(images_of(sample_float32))), encoding="utf-8")
    export_features(ExportOptions(data=sample_float32, out=tmp_path / "precomp", format="scan", split="test",
                                  images_file=images_file))
    folder = tmp_path / "precomp"
    features = np.load(folder / "test_ims.npy", mmap_mode="r")
    assert features.shape == (6, 36, 2048)
    assert features.dtype == np.float32
    assert np.load(folder / "test_ims_bbx.npy").shape == (6, 36, 4)
    sizes = np.load(folder / "test_ims_size.npy", allow_pickle=True)
    assert sizes[1] == {"image_h": 333, "image_w": 500}
    assert (folder / "test_ids.txt").read_text(encoding="utf-8").splitlines()[1] == "COCO_train2014_000000132417.jpg"

    import_features(ImportOptions(sources=[folder], out=tmp_path / "again", dtype="float32"))
    assert_same_images(sample_float32, tmp_path / "again", columns=("boxes", "features"))


def test_scan_round_trip_without_boxes(tmp_path):
    write_precomp(tmp_path / "precomp", "dev", 3, dim=16, boxes=False)
    import_features(ImportOptions(sources=[tmp_path / "precomp"], out=tmp_path / "data", dtype="float32"))
    export_features(ExportOptions(data=tmp_path / "data", out=tmp_path / "export", format="scan"))
    assert sorted(path.name for path in (tmp_path / "export").iterdir()) == ["all_ids.txt", "all_ims.npy"]
    source_order = np.argsort([f"{100 + 7 * row}.jpg" for row in range(3)])
    np.testing.assert_array_equal(np.load(tmp_path / "export" / "all_ims.npy"),
                                  np.load(tmp_path / "precomp" / "dev_ims.npy")[source_order])

    with pytest.raises(ValueError, match="without boxes"):
        export_features(ExportOptions(data=tmp_path / "data", out=tmp_path / "tsv", format="lxmert-tsv"))


@pytest.fixture()
def uneven(tmp_path) -> Path:
    """A dataset whose two images have 10 and 12 regions of 16 features."""
    path = tmp_path / "uneven.tsv"
    path.write_bytes(lxmert_line("ten", 300, 400, *random_regions(1, 10, 16))
                     + lxmert_line("twelve", 300, 400, *random_regions(2, 12, 16)))
    import_features(ImportOptions(sources=[path], out=tmp_path / "data", dtype="float32"))
    return tmp_path / "data"


def test_scan_needs_fixed_count(uneven, tmp_path):
    with pytest.raises(ValueError, match="pass --num-regions 12"):
        export_features(ExportOptions(data=uneven, out=tmp_path / "a", format="scan"))
    with pytest.raises(ValueError, match="more than --num-regions 11"):
        export_features(ExportOptions(data=uneven, out=tmp_path / "b", format="scan", num_regions=11))


def test_scan_zero_pads(uneven, tmp_path):
    summary = export_features(ExportOptions(data=uneven, out=tmp_path / "padded", format="scan", num_regions=12))
    assert summary.details == {"regions_per_image": 12, "padded_images": 1}
    features = np.load(tmp_path / "padded" / "all_ims.npy")
    boxes = np.load(tmp_path / "padded" / "all_ims_bbx.npy")
    ten = DatasetFolder(uneven).regions("ten.jpg")
    np.testing.assert_array_equal(features[0, :10], ten.features)
    assert not features[0, 10:].any()
    assert not boxes[0, 10:].any()
    assert features[1].any(axis=1).all()


def test_images_file_selects_and_orders(uneven, tmp_path):
    images_file = tmp_path / "test_images.txt"
    images_file.write_text("# test split\ntwelve.jpg\n\nten.jpg\n", encoding="utf-8")
    export_features(ExportOptions(data=uneven, out=tmp_path / "out", format="lxmert-tsv", split="test",
                                  images_file=images_file))
    ids = [line.split(b"\t")[0] for line in (tmp_path / "out" / "test.tsv").read_bytes().splitlines()]
    assert ids == [b"twelve", b"ten"]

    images_file.write_text("ten.jpg\nmissing.jpg\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'missing.jpg'"):
        export_features(ExportOptions(data=uneven, out=tmp_path / "x", format="scan", images_file=images_file))


def test_export_rejects_bad_requests(uneven, tmp_path):
    with pytest.raises(ValueError, match="captions stage"):
        export_features(ExportOptions(data=uneven, out=tmp_path / "a", format="scan", split="test", num_regions=12))
    export_features(ExportOptions(data=uneven, out=tmp_path / "b", format="butd-tsv"))
    with pytest.raises(ValueError, match="already exists"):
        export_features(ExportOptions(data=uneven, out=tmp_path / "b", format="butd-tsv"))
    export_features(ExportOptions(data=uneven, out=tmp_path / "b", format="butd-tsv", overwrite=True))
    assert [path.name for path in (tmp_path / "b").iterdir()] == ["all.tsv"]


def test_cli_export(sample_float32, tmp_path):
    out = tmp_path / "cli"
    assert cli_main(["export", "--data", str(sample_float32), "--format", "scan", "--out", str(out), "--split", "all"]) == 0
    assert load_npy_file(out / "all_ims_size.npy").shape == (6,)
    assert cli_main(["export", "--data", str(tmp_path / "missing"), "--format", "scan", "--out", str(out)]) == 2
    assert cli_main(["export", "--data", str(sample_float32), "--format", "scan", "--out", str(out)]) == 2
