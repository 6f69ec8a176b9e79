"""Tests of detector presets, overrides, validation errors and vocabulary files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from extractors.config import load_config, preset_names
from extractors.detector_labels import label_names, read_vocab


def sample_data_dir() -> Path:
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    path = Path(os.environ.get("CMSEI_SAMPLE_DATA", default))
    if not path.is_dir():
        pytest.skip(f"sample data not found at {path}; set CMSEI_SAMPLE_DATA")
    return path


def test_presets_listed():
    assert {"butd-r101-c4", "frcnn-r50-fpn", "tiny"} <= set(preset_names())


@pytest.mark.parametrize("name", ["butd-r101-c4", "frcnn-r50-fpn", "tiny"])
def test_preset_is_json_serialisable(name):
    config = load_config(name)

    assert config["name"] == name
    assert json.loads(json.dumps(config)) == config


def test_butd_preset_values():
    config = load_config("butd-r101-c4")

    assert config["stage_blocks"] == [3, 4, 23, 3]
    assert config["anchor_sizes"] == [64, 128, 256, 512]
    assert config["rpn_post_nms_topk"] == 300
    assert config["pooler_type"] == "ROIPool"
    assert config["res5_halve"] is False
    assert config["num_classes"] == 1600
    assert config["num_attributes"] == 400
    assert config["input_format"] == "BGR"


def test_tiny_inherits_from_base():
    tiny = load_config("tiny")
    butd = load_config("butd-r101-c4")

    assert tiny["pixel_mean"] == butd["pixel_mean"]
    assert tiny["stage_blocks"] == [1, 1, 1, 1]


def test_dict_override():
    config = load_config("butd-r101-c4", {"num_boxes": 36, "min_size_test": 300})

    assert config["num_boxes"] == 36
    assert config["min_size_test"] == 300


def test_yaml_override_and_preset_file(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("max_boxes: 50\nstore_class_boxes: true\n")
    preset = tmp_path / "mine.yaml"
    preset.write_text("base: tiny\nname: mine\nconf_thresh: 0.5\n")

    config = load_config(preset, override)

    assert config["name"] == "mine"
    assert config["conf_thresh"] == 0.5
    assert config["max_boxes"] == 50
    assert config["store_class_boxes"] is True


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"min_boxes": -1}, "min_boxes"),
        ({"conf_thresh": 1.5}, "conf_thresh"),
        ({"stage_blocks": [3, 4]}, "stage_blocks"),
        ({"pooler_type": "ROIAlign"}, "pooler_type"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"num_boxes": 0}, "num_boxes"),
        ({"fold_batchnorm": "yes"}, "fold_batchnorm"),
        ({"min_boxes": 20, "max_boxes": 10}, "min_boxes"),
    ],
)
def test_invalid_field_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        load_config("tiny", overrides)


def test_field_of_other_architecture():
    with pytest.raises(ValueError, match="anchor_sizes.*does not apply"):
        load_config("frcnn-r50-fpn", {"anchor_sizes": [32]})


def test_missing_field_named(tmp_path):
    preset = tmp_path / "partial.yaml"
    preset.write_text("name: partial\narchitecture: c4\n")

    with pytest.raises(ValueError, match="missing field"):
        load_config(preset)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown detector preset 'nope'"):
        load_config("nope")


def test_invalid_yaml(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")

    with pytest.raises(ValueError, match="invalid YAML"):
        load_config(broken)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_base_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")

    with pytest.raises(ValueError, match="deeper than"):
        load_config(tmp_path / "a.yaml")


def test_vocab_first_synonym(tmp_path):
    vocab = tmp_path / "objects.txt"
    vocab.write_text("gray,grey\nmulti colored,multi-colored\nred")

    assert read_vocab(vocab, 3, "object_vocab_path") == ["gray", "multi colored", "red"]


def test_vocab_count_mismatch(tmp_path):
    vocab = tmp_path / "objects.txt"
    vocab.write_text("a\nb\n")

    with pytest.raises(ValueError, match="object_vocab_path.*2 labels.*predicts 3"):
        read_vocab(vocab, 3, "object_vocab_path")


def test_vocab_missing_file(tmp_path):
    with pytest.raises(ValueError, match="attribute_vocab_path"):
        read_vocab(tmp_path / "absent.txt", 3, "attribute_vocab_path")


def test_generic_names():
    names = label_names(None, 3, "object_vocab_path", "object")

    assert names == ["object_0", "object_1", "object_2"]


def test_real_visual_genome_vocab():
    labels = sample_data_dir() / "labels"

    objects = read_vocab(labels / "objects_vocab.txt", 1600, "object_vocab_path")
    attributes = read_vocab(labels / "attributes_vocab.txt", 400, "attribute_vocab_path")

    assert objects[:3] == ["yolk", "goal", "bathroom"]
    assert objects[-1] == "buoy"
    assert attributes[:2] == ["gray", "multi colored"]
    assert attributes[-1] == "leaning"
