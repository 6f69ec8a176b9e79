"""Tests for the synthetic scene generator and the `synth` subcommand."""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from extractors.images import decode_image
from pipeline import synth
from pipeline.commands import synth as synth_command
from pipeline.inputs import discover_images

logger = logging.getLogger(__name__)

SIZE = 128
N_IMAGES = 24

COLOUR_WORDS = "|".join(synth.COLOURS)
SIZE_WORDS = "|".join(synth.SIZE_CLASSES)
LABEL_WORDS = "|".join(synth.LABELS)
NOUN_PHRASE = rf"an? (?:(?:{SIZE_WORDS}) )?(?:{COLOUR_WORDS}) (?:{LABEL_WORDS})"

# Caption wordings of the generator, mapped to the predicate they state.
PHRASE_PREDICATES = [
    ("to the left of", "left of"),
    ("on the left of", "left of"),
    ("left of", "left of"),
    ("to the right of", "right of"),
    ("on the right of", "right of"),
    ("right of", "right of"),
    ("above", "above"),
    ("below", "below"),
    ("under", "below"),
    ("beneath", "below"),
    ("inside", "inside"),
    ("within", "inside"),
    ("in", "inside"),
    ("containing", "contains"),
    ("that contains", "contains"),
    ("overlapping", "overlapping"),
    ("is overlapping", "overlapping"),
    ("that overlaps", "overlapping"),
]


def load_outputs(out_dir: Path) -> tuple[dict, list[dict]]:
    annotations = json.loads((out_dir / "annotations.json").read_text(encoding="utf-8"))
    lines = (out_dir / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    return annotations, [json.loads(line) for line in lines]


def expected_relations(objects: list[dict], size: int) -> set[tuple[int, str, int]]:
    """Apply the relation rules of the module docstring, written out independently."""
    margin = 0.04 * size
    relations = set()
    for i, first in enumerate(objects):
        for j, second in enumerate(objects):
            if i == j:
                continue
            a, b = first["box"], second["box"]
            a_in_b = a[0] >= b[0] and a[1] >= b[1] and a[2] <= b[2] and a[3] <= b[3]
            b_in_a = b[0] >= a[0] and b[1] >= a[1] and b[2] <= a[2] and b[3] <= a[3]
            if a_in_b and not b_in_a:
                relations.add((i, "inside", j))
            if b_in_a and not a_in_b:
                relations.add((i, "contains", j))
            if a_in_b or b_in_a:
                continue

            rows = a[1] < b[3] and b[1] < a[3]
            columns = a[0] < b[2] and b[0] < a[2]
            centre_a = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2)
            centre_b = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
            if rows and centre_a[0] <= centre_b[0] - margin:
                relations.add((i, "left of", j))
            if rows and centre_b[0] <= centre_a[0] - margin:
                relations.add((i, "right of", j))
            if columns and centre_a[1] <= centre_b[1] - margin:
                relations.add((i, "above", j))
            if columns and centre_b[1] <= centre_a[1] - margin:
                relations.add((i, "below", j))
            if rows and columns:
                relations.add((i, "overlapping", j))
    return relations


def find_object(objects: list[dict], noun_phrase: str) -> int:
    """Return the index of the object a noun phrase names; colours are unique per image."""
    words = noun_phrase.split()[1:]
    matches = [
        index
        for index, shape in enumerate(objects)
        if shape["label"] == words[-1]
        and shape["attributes"][0] == words[-2]
        and (len(words) == 2 or shape["attributes"][1] == words[0])
    ]
    assert len(matches) == 1, f"{noun_phrase!r} names {len(matches)} objects"
    return matches[0]


def parse_caption(caption: str, objects: list[dict]) -> tuple[int, str, int] | None:
    """Return (subject, predicate, object) stated by a relation caption, or None for an inventory caption."""
    if re.fullmatch(rf"(two|three|four) shapes: .*", caption):
        return None

    special = re.fullmatch(rf"({NOUN_PHRASE}) with ({NOUN_PHRASE}) inside it", caption)
    if special:
        return find_object(objects, special[1]), "contains", find_object(objects, special[2])

    for phrase, predicate in PHRASE_PREDICATES:
        pattern = rf"(?:there is )?({NOUN_PHRASE}) (?:is |placed )?{phrase} ({NOUN_PHRASE})"
        match = re.fullmatch(pattern, caption)
        if match:
            return find_object(objects, match[1]), predicate, find_object(objects, match[2])
    raise AssertionError(f"caption does not follow a known template: {caption!r}")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthSummary]:
    out_dir = tmp_path_factory.mktemp("scenes")
    return out_dir, synth.generate_scenes(out_dir, N_IMAGES, seed=11, size=SIZE)


@pytest.fixture(scope="module")
def paired_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("paired")
    synth.generate_scenes(out_dir, N_IMAGES, seed=5, paired=True, size=SIZE)
    return out_dir


def test_output_files_and_schema(scenes):
    out_dir, summary = scenes
    annotations, captions = load_outputs(out_dir)

    assert summary.n_images == N_IMAGES
    assert annotations["labels"] == list(synth.LABELS)
    assert annotations["attributes"] == list(synth.ATTRIBUTES)
    assert annotations["predicates"] == list(synth.PREDICATES)
    assert [record["image"] for record in annotations["images"]] == [
        f"scene_{index:05d}.png" for index in range(N_IMAGES)
    ]
    assert [line["image"] for line in captions] == [record["image"] for record in annotations["images"]]
    for record in annotations["images"]:
        assert (out_dir / "images" / record["image"]).is_file()
        assert (record["width"], record["height"]) == (SIZE, SIZE)


def test_objects_valid(scenes):
    out_dir, summary = scenes
    annotations, _ = load_outputs(out_dir)
    total_objects = 0

    for record in annotations["images"]:
        objects = record["objects"]
        total_objects += len(objects)
        assert 2 <= len(objects) <= 4, record["image"]
        colours = [shape["attributes"][0] for shape in objects]
        assert len(set(colours)) == len(colours), record["image"]
        for shape in objects:
            x1, y1, x2, y2 = shape["box"]
            assert 0 <= x1 < x2 <= SIZE, record["image"]
            assert 0 <= y1 < y2 <= SIZE, record["image"]
            assert shape["label"] in synth.LABELS
            colour, size_class = shape["attributes"]
            assert colour in synth.COLOURS
            assert size_class in synth.SIZE_CLASSES
            low, high = synth.SIZE_RANGES[size_class]
            longest = max(x2 - x1, y2 - y1) / SIZE
            assert low - 0.01 <= longest <= high + 0.01, (record["image"], shape)

    assert summary.n_objects == total_objects


def test_relations_follow_box_rules(scenes):
    out_dir, summary = scenes
    annotations, _ = load_outputs(out_dir)
    total = Counter()

    for record in annotations["images"]:
        stored = {
            (relation["subject"], relation["predicate"], relation["object"])
            for relation in record["relations"]
        }
        assert len(stored) == len(record["relations"]), record["image"]
        assert stored == expected_relations(record["objects"], SIZE), record["image"]
        total.update(predicate for _, predicate, _ in stored)

    assert summary.predicate_counts == {name: total[name] for name in synth.PREDICATES}


def test_relations_have_inverses(scenes):
    out_dir, _ = scenes
    annotations, _ = load_outputs(out_dir)
    inverse = {
        "left of": "right of",
        "right of": "left of",
        "above": "below",
        "below": "above",
        "inside": "contains",
        "contains": "inside",
        "overlapping": "overlapping",
    }

    for record in annotations["images"]:
        stored = {(r["subject"], r["predicate"], r["object"]) for r in record["relations"]}
        for subject, predicate, target in stored:
            assert (target, inverse[predicate], subject) in stored, (record["image"], predicate)


def test_every_object_is_related(scenes):
    out_dir, _ = scenes
    annotations, _ = load_outputs(out_dir)

    for record in annotations["images"]:
        subjects = {relation["subject"] for relation in record["relations"]}
        assert subjects == set(range(len(record["objects"]))), record["image"]


def test_scene_variety(tmp_path):
    synth.generate_scenes(tmp_path, 60, seed=2, size=SIZE)
    annotations, _ = load_outputs(tmp_path)

    predicates = Counter(r["predicate"] for record in annotations["images"] for r in record["relations"])
    labels = Counter(shape["label"] for record in annotations["images"] for shape in record["objects"])
    sizes = Counter(shape["attributes"][1] for record in annotations["images"] for shape in record["objects"])
    counts = Counter(len(record["objects"]) for record in annotations["images"])

    assert set(predicates) == set(synth.PREDICATES)
    assert set(labels) == set(synth.LABELS)
    assert set(sizes) == set(synth.SIZE_CLASSES)
    assert set(counts) == {2, 3, 4}


def test_captions_are_true(scenes):
    out_dir, _ = scenes
    annotations, captions = load_outputs(out_dir)

    for record, line in zip(annotations["images"], captions):
        objects = record["objects"]
        stored = {(r["subject"], r["predicate"], r["object"]) for r in record["relations"]}
        assert len(line["captions"]) == 5, record["image"]
        assert len(set(line["captions"])) == 5, record["image"]
        for caption in line["captions"]:
            stated = parse_caption(caption, objects)
            if stated is not None:
                assert stated in stored, (record["image"], caption)


def test_captions_match_examples(scenes):
    out_dir, _ = scenes
    _, captions = load_outputs(out_dir)
    all_captions = [caption for line in captions for caption in line["captions"]]

    pattern = re.compile(rf"{NOUN_PHRASE} (to the left of|above|inside) {NOUN_PHRASE}")
    assert any(pattern.fullmatch(caption) for caption in all_captions)


def test_pixels_match_annotations(scenes):
    out_dir, _ = scenes
    annotations, _ = load_outputs(out_dir)

    for record in annotations["images"]:
        pixels = decode_image(out_dir / "images" / record["image"]).pixels
        boxes = [shape["box"] for shape in record["objects"]]
        for index, shape in enumerate(record["objects"]):
            x1, y1, x2, y2 = shape["box"]
            centre = ((y1 + y2) // 2, (x1 + x2) // 2)
            if shape["label"] == "triangle":
                centre = ((y1 + 3 * y2) // 4, (x1 + x2) // 2)
            covered = any(
                other != index and box[0] <= centre[1] < box[2] and box[1] <= centre[0] < box[3]
                and (box[2] - box[0]) * (box[3] - box[1]) <= (x2 - x1) * (y2 - y1)
                for other, box in enumerate(boxes)
            )
            if covered:
                continue
            colour = synth.COLOURS[shape["attributes"][0]]
            assert pixels[centre].tolist() == list(colour), (record["image"], shape)


def test_output_is_deterministic(tmp_path):
    first = synth.generate_scenes(tmp_path / "one", 8, seed=3, size=SIZE)
    second = synth.generate_scenes(tmp_path / "two", 8, seed=3, size=SIZE)
    other = synth.generate_scenes(tmp_path / "three", 8, seed=4, size=SIZE)

    for name in ("annotations.json", "captions.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
        assert (tmp_path / "one" / name).read_bytes() != (tmp_path / "three" / name).read_bytes()

    for index in range(8):
        name = f"scene_{index:05d}.png"
        first_pixels = decode_image(first.images_dir / name).pixels
        second_pixels = decode_image(second.images_dir / name).pixels
        assert np.array_equal(first_pixels, second_pixels), name
    assert first.predicate_counts == second.predicate_counts
    assert first.predicate_counts != other.predicate_counts or first.n_objects != other.n_objects


def test_paired_images_share_objects(paired_scenes):
    annotations, _ = load_outputs(paired_scenes)
    records = annotations["images"]

    for first, second in zip(records[::2], records[1::2]):
        assert first["pair"] == second["pair"]

        def shapes(record: dict) -> list[tuple]:
            return sorted(
                (shape["label"], tuple(shape["attributes"]), shape["box"][2] - shape["box"][0],
                 shape["box"][3] - shape["box"][1])
                for shape in record["objects"]
            )

        assert shapes(first) == shapes(second), first["image"]


def test_paired_relations_swapped(paired_scenes):
    annotations, _ = load_outputs(paired_scenes)
    records = annotations["images"]
    swaps = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

    for first, second in zip(records[::2], records[1::2]):
        first_relations = {(r["subject"], r["predicate"], r["object"]) for r in first["relations"]}
        second_relations = {(r["subject"], r["predicate"], r["object"]) for r in second["relations"]}
        assert first_relations != second_relations, first["image"]
        reversed_relations = {
            (subject, swaps[predicate], target)
            for subject, predicate, target in first_relations - second_relations
            if predicate in swaps
        }
        assert reversed_relations, first["image"]
        assert reversed_relations <= second_relations, first["image"]


def test_paired_captions_tell_pair_apart(paired_scenes):
    annotations, captions = load_outputs(paired_scenes)
    records = annotations["images"]

    for index, (record, line) in enumerate(zip(records, captions)):
        partner = records[index + 1 if index % 2 == 0 else index - 1]
        own = {(r["subject"], r["predicate"], r["object"]) for r in record["relations"]}
        other = {(r["subject"], r["predicate"], r["object"]) for r in partner["relations"]}
        assert len(set(line["captions"])) == 5, record["image"]
        for caption in line["captions"]:
            stated = parse_caption(caption, record["objects"])
            assert stated is not None, caption
            assert stated in own, (record["image"], caption)
            assert stated not in other, (record["image"], caption)


def test_scenes_are_discoverable_and_decodable(scenes):
    out_dir, _ = scenes

    listing = discover_images(out_dir / "images")

    assert [entry.image_id for entry in listing.entries] == [
        f"scene_{index:05d}.png" for index in range(N_IMAGES)
    ]
    assert listing.skipped == []
    assert not list((out_dir / "images").glob(".*"))
    decoded = decode_image(listing.entries[0].path)
    assert decoded.pixels.shape == (SIZE, SIZE, 3)


def test_existing_output_needs_overwrite(tmp_path):
    synth.generate_scenes(tmp_path, 6, seed=1, size=SIZE)

    with pytest.raises(FileExistsError, match="--overwrite"):
        synth.generate_scenes(tmp_path, 6, seed=1, size=SIZE)

    synth.generate_scenes(tmp_path, 4, seed=1, size=SIZE, overwrite=True)
    assert sorted(path.name for path in (tmp_path / "images").iterdir()) == [
        f"scene_{index:05d}.png" for index in range(4)
    ]
    annotations, captions = load_outputs(tmp_path)
    assert len(annotations["images"]) == 4
    assert len(captions) == 4


def test_leftover_annotations_need_overwrite(tmp_path):
    (tmp_path / "annotations.json").write_text("{}", encoding="utf-8")

    with pytest.raises(FileExistsError, match="annotations.json"):
        synth.generate_scenes(tmp_path, 2, seed=1, size=SIZE)

    synth.generate_scenes(tmp_path, 2, seed=1, size=SIZE, overwrite=True)
    annotations, _ = load_outputs(tmp_path)
    assert len(annotations["images"]) == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_images": 0}, "n_images must be"),
        ({"n_images": 3, "paired": True}, "must be even"),
        ({"size": 32}, "size must be"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_invalid_arguments_raise(tmp_path, arguments, message):
    options = {"n_images": 2, "seed": 0, "size": SIZE} | arguments

    with pytest.raises(ValueError, match=message):
        synth.generate_scenes(tmp_path, **options)

    assert not (tmp_path / "annotations.json").exists()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    synth_command.add_parser(subparsers)
    return parser


def test_command_writes_scenes(tmp_path):
    out_dir = tmp_path / "out"
    args = build_parser().parse_args(
        ["synth", "--out", str(out_dir), "--images", "4", "--seed", "9", "--paired", "--size", "96"]
    )

    assert synth_command.run(args) == 0

    annotations, captions = load_outputs(out_dir)
    assert len(annotations["images"]) == 4
    assert len(captions) == 4
    assert annotations["paired"] is True
    assert annotations["images"][0]["width"] == 96


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--images", "0"], "n_images must be"),
        (["--images", "3", "--paired"], "must be even"),
        (["--images", "2", "--size", "20"], "size must be"),
    ],
)
def test_command_bad_input_exits_2(tmp_path, caplog, options, message):
    args = build_parser().parse_args(["synth", "--out", str(tmp_path / "out"), *options])

    with caplog.at_level(logging.ERROR, logger="pipeline.commands.synth"):
        code = synth_command.run(args)

    assert code == 2
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert message in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage()


def test_command_existing_output_exits_2(tmp_path, caplog):
    parser = build_parser()
    arguments = ["synth", "--out", str(tmp_path), "--images", "2", "--size", "64"]
    assert synth_command.run(parser.parse_args(arguments)) == 0

    with caplog.at_level(logging.ERROR, logger="pipeline.commands.synth"):
        assert synth_command.run(parser.parse_args(arguments)) == 2
    assert "--overwrite" in caplog.text

    assert synth_command.run(parser.parse_args(arguments + ["--overwrite"])) == 0


def test_command_help_states_units():
    parser = build_parser()
    subparser = parser._subparsers._group_actions[0].choices["synth"]
    help_text = subparser.format_help()

    assert "pixels" in help_text
    assert "default: 256" in help_text
    assert "default: 0" in help_text
