"""Tests of the scene-graph vocabularies, the relation predictor and its training loop.

Training runs on synthetic scenes made here: random features, random boxes and classes,
and relations that follow a fixed rule. Two regions are related when their classes have
the same parity and their centres are closer than 150 px. The predicate is then the
main direction of the object from the subject (right, left, below, above).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from graphs.predicates import BACKGROUND, load_vg150_vocab, with_background
from graphs.predictor import GEOMETRY_DIM, RelationPredictor, all_ordered_pairs, pair_geometry
from graphs.train_relations import (
    evaluate_recall,
    frequency_log_probs,
    load_checkpoint,
    save_checkpoint,
    train_relation_predictor,
)

PREDICATES = (BACKGROUND, "right of", "left of", "below", "above")
NUM_CLASSES = 5
FEATURE_DIM = 16
IMAGE_SIZE = (300, 400)


def rule_relations(boxes: np.ndarray, object_ids: np.ndarray) -> np.ndarray:
    """Return the (T, 3) relations that the synthetic rule gives."""
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    relations = []
    for subject in range(len(boxes)):
        for object_ in range(len(boxes)):
            if subject == object_ or (object_ids[subject] + object_ids[object_]) % 2:
                continue
            dx, dy = centers[object_] - centers[subject]
            if math.hypot(dx, dy) >= 150:
                continue
            if abs(dx) >= abs(dy):
                predicate = 1 if dx > 0 else 2
            else:
                predicate = 3 if dy > 0 else 4
            relations.append((subject, object_, predicate))
    return np.array(relations, dtype=np.int64).reshape(-1, 3)


def make_scenes(count: int, seed: int, regions: int = 8) -> list[dict]:
    rng = np.random.default_rng(seed)
    height, width = IMAGE_SIZE
    scenes = []
    for _ in range(count):
        centers = rng.uniform([20, 20], [width - 20, height - 20], (regions, 2))
        halves = rng.uniform(10, 40, (regions, 2))
        boxes = np.concatenate([centers - halves, centers + halves], axis=1).astype(np.float32)
        object_ids = rng.integers(0, NUM_CLASSES, regions)
        scenes.append(
            {
                "features": rng.normal(size=(regions, FEATURE_DIM)).astype(np.float32),
                "object_ids": object_ids,
                "boxes": boxes,
                "image_size": IMAGE_SIZE,
                "relations": rule_relations(boxes, object_ids),
            }
        )
    return scenes


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run on one thread: with tensors this small, thread hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_torch_thread):
    """A predictor trained on 200 synthetic scenes, with its metrics."""
    return train_relation_predictor(
        make_scenes(200, seed=1),
        PREDICATES,
        NUM_CLASSES,
        FEATURE_DIM,
        epochs=10,
        lr=3e-3,
        seed=0,
        device="cpu",
        hidden_dim=64,
        embed_dim=16,
    )


# Vocabularies.


def test_vg150_vocab_from_real_file(sample_data):
    vocab = load_vg150_vocab(sample_data / "labels" / "VG-SGG-dicts-with-attri.json")
    assert vocab.num_predicates == 51
    assert vocab.num_object_classes == 151
    assert vocab.predicate_names[0] == BACKGROUND
    assert vocab.object_names[0] == BACKGROUND
    assert vocab.predicate_names[1] == "above"
    assert vocab.predicate_names[vocab.predicate_index("wearing")] == "wearing"
    assert vocab.object_names[vocab.object_index("man")] == "man"


def test_vocab_rejects_unknown_name(sample_data):
    vocab = load_vg150_vocab(sample_data / "labels" / "VG-SGG-dicts-with-attri.json")
    with pytest.raises(KeyError, match="unknown predicate 'flying over'"):
        vocab.predicate_index("flying over")


def test_with_background_adds_it_once():
    assert with_background(["on", " has "]) == (BACKGROUND, "on", "has")
    assert with_background([BACKGROUND, "on"]) == (BACKGROUND, "on")


@pytest.mark.parametrize(
    ("names", "message"),
    [(["on", "on"], "more than once"), (["on", ""], "non-empty"), (["on", BACKGROUND], "first name")],
)
def test_with_background_rejects_bad_names(names, message):
    with pytest.raises(ValueError, match=message):
        with_background(names)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        (json.dumps({"idx_to_label": {"1": "man"}}), "idx_to_predicate"),
        (json.dumps({"idx_to_label": {"1": "man"}, "idx_to_predicate": {"1": "on", "3": "has"}}), "without gaps"),
    ],
)
def test_vocab_file_errors(tmp_path, content, message):
    path = tmp_path / "dicts.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_vg150_vocab(path)


# Geometry and model shapes.


def test_pair_geometry_values():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [30.0, 0.0, 50.0, 10.0]])
    geometry = pair_geometry(boxes, torch.tensor([[0, 1]]), torch.tensor([100.0, 200.0]))
    assert geometry.shape == (1, GEOMETRY_DIM)
    assert geometry.dtype == torch.float32
    # Object centre (40, 5) from subject centre (5, 10): offset (3.5, -0.25) subject sizes.
    expected_offset = [math.log1p(3.5), -math.log1p(0.25)]
    torch.testing.assert_close(geometry[0, :2], torch.tensor(expected_offset))
    torch.testing.assert_close(geometry[0, 2:4], torch.tensor([math.log(2.0), math.log(0.5)]))
    torch.testing.assert_close(geometry[0, 4:8], torch.tensor([0.0, 0.0, 0.05, 0.2]))
    torch.testing.assert_close(geometry[0, 12:16], torch.tensor([0.0, 0.0, 0.25, 0.2]))


def test_pair_geometry_clamps_degenerate_boxes():
    boxes = torch.tensor([[5.0, 5.0, 5.0, 5.0], [9.0, 9.0, 3.0, 3.0]])
    geometry = pair_geometry(boxes, all_ordered_pairs(2), torch.tensor([50.0, 50.0]))
    assert torch.isfinite(geometry).all()


def test_all_ordered_pairs_skip_diagonal():
    pairs = all_ordered_pairs(3)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1]]


def test_forward_shape():
    torch.manual_seed(0)
    model = RelationPredictor(FEATURE_DIM, NUM_CLASSES, PREDICATES, hidden_dim=32, embed_dim=8)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 20.0], [50.0, 40.0, 90.0, 99.0]])
    pairs = all_ordered_pairs(3)
    logits = model(torch.randn(3, FEATURE_DIM), torch.tensor([0, 3, 4]), pairs, pair_geometry(boxes, pairs, torch.tensor([100.0, 100.0])))
    assert logits.shape == (6, len(PREDICATES))


def test_model_rejects_missing_background():
    with pytest.raises(ValueError, match="__background__"):
        RelationPredictor(FEATURE_DIM, NUM_CLASSES, ["right of", "left of"])


def test_frequency_bias_starts_from_log_frequencies():
    scenes = make_scenes(20, seed=5)
    keys, table = frequency_log_probs(scenes, NUM_CLASSES, len(PREDICATES))
    assert table.shape == (keys.shape[0] + 1, len(PREDICATES))
    assert keys.dtype == np.int64
    assert (np.diff(keys) > 0).all()
    np.testing.assert_allclose(np.exp(table).sum(axis=1), 1.0, rtol=1e-5)

    # Only class pairs of the same parity ever relate, so they alone get their own rows.
    subjects, objects = keys // NUM_CLASSES, keys % NUM_CLASSES
    assert ((subjects + objects) % 2 == 0).all()
    # The shared last row counts the pairs of different parity, so background dominates it.
    assert table[-1].argmax() == 0
    assert table[-1, 0] > np.log(0.9)

    model = RelationPredictor(FEATURE_DIM, NUM_CLASSES, PREDICATES)
    model.set_frequency_bias(keys, table)
    torch.testing.assert_close(model.frequency_bias.weight.detach(), torch.from_numpy(table))
    torch.testing.assert_close(model.frequency_keys, torch.from_numpy(keys))


def test_frequency_rows_find_keys():
    model = RelationPredictor(FEATURE_DIM, NUM_CLASSES, PREDICATES)
    keys = np.array([0 * NUM_CLASSES + 2, 1 * NUM_CLASSES + 1, 4 * NUM_CLASSES + 4])
    model.set_frequency_bias(keys, np.zeros((4, len(PREDICATES)), np.float32))
    subjects = torch.tensor([0, 1, 4, 2, 0, 4])
    objects = torch.tensor([2, 1, 4, 0, 0, 3])
    assert model.frequency_rows(subjects, objects).tolist() == [0, 1, 2, 3, 3, 3]


def test_frequency_rows_without_keys():
    model = RelationPredictor(FEATURE_DIM, NUM_CLASSES, PREDICATES)
    rows = model.frequency_rows(torch.tensor([0, 3]), torch.tensor([1, 4]))
    assert rows.tolist() == [0, 0]


def test_frequency_bias_is_small_for_detector_classes():
    # 1600 classes would need a dense table of 1600 * 1600 rows; the sparse one grows with M.
    model = RelationPredictor(256, 1600, PREDICATES, num_frequency_pairs=0)
    keys = np.array([5 * 1600 + 7, 1599 * 1600 + 1599])
    model.set_frequency_bias(keys, np.zeros((3, len(PREDICATES)), np.float32))
    assert model.frequency_bias.weight.shape == (3, len(PREDICATES))
    assert model.frequency_rows(torch.tensor([1599, 5, 7]), torch.tensor([1599, 7, 5])).tolist() == [1, 0, 2]


@pytest.mark.parametrize(
    ("keys", "table_rows", "message"),
    [
        (np.array([3, 1]), 3, "strictly increasing"),
        (np.array([1, 1]), 3, "strictly increasing"),
        (np.array([NUM_CLASSES * NUM_CLASSES]), 2, "must lie in"),
        (np.array([-1]), 2, "must lie in"),
        (np.array([0.5]), 2, "integer"),
        (np.array([1, 2]), 2, r"shape \(3, 5\)"),
    ],
)
def test_set_frequency_bias_rejects_bad_tables(keys, table_rows, message):
    model = RelationPredictor(FEATURE_DIM, NUM_CLASSES, PREDICATES)
    with pytest.raises(ValueError, match=message):
        model.set_frequency_bias(keys, np.zeros((table_rows, len(PREDICATES)), np.float32))


def test_set_frequency_bias_rejects_infinity():
    model = RelationPredictor(FEATURE_DIM, NUM_CLASSES, PREDICATES)
    table = np.zeros((2, len(PREDICATES)), np.float32)
    table[1, 2] = -np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        model.set_frequency_bias(np.array([3]), table)


# predict_image.


def test_predict_image_outputs(trained):
    model, _ = trained
    scene = make_scenes(1, seed=99)[0]
    pairs, predicates, scores = model.predict_image(
        scene["features"], scene["object_ids"], scene["boxes"], IMAGE_SIZE, top_k=25
    )
    assert pairs.shape == (25, 2)
    assert pairs.dtype == np.int32
    assert predicates.dtype == np.int32
    assert scores.dtype == np.float32
    assert (pairs[:, 0] != pairs[:, 1]).all()
    assert predicates.min() >= 1
    assert predicates.max() < len(PREDICATES)
    assert (np.diff(scores) <= 0).all()


def test_predict_image_top_k_larger_than_candidates(trained):
    model, _ = trained
    scene = make_scenes(1, seed=98, regions=3)[0]
    pairs, predicates, scores = model.predict_image(
        scene["features"], scene["object_ids"], scene["boxes"], IMAGE_SIZE, top_k=1000
    )
    candidates = 3 * 2 * (len(PREDICATES) - 1)
    assert pairs.shape == (candidates, 2)
    assert len({(s, o, p) for (s, o), p in zip(pairs.tolist(), predicates.tolist())}) == candidates


def test_predict_image_fewer_than_two_regions(trained):
    model, _ = trained
    pairs, predicates, scores = model.predict_image(
        np.zeros((1, FEATURE_DIM), np.float32), np.array([2]), np.array([[0, 0, 5, 5]]), IMAGE_SIZE
    )
    assert pairs.shape == (0, 2)
    assert predicates.shape == (0,)
    assert scores.shape == (0,)


def test_predict_image_object_scores_scale_scores(trained):
    model, _ = trained
    scene = make_scenes(1, seed=97, regions=4)[0]
    args = (scene["features"], scene["object_ids"], scene["boxes"], IMAGE_SIZE)
    _, _, plain = model.predict_image(*args, top_k=1000)
    _, _, halved = model.predict_image(*args, top_k=1000, object_scores=np.full(4, math.sqrt(0.5)))
    np.testing.assert_allclose(halved, plain * 0.5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"object_ids": np.array([0, 1, 2, 9])}, "object ids"),
        ({"features": np.zeros((4, 3), np.float32)}, "features"),
        ({"boxes": np.zeros((3, 4), np.float32)}, "boxes"),
    ],
)
def test_predict_image_rejects_bad_input(trained, change, message):
    model, _ = trained
    scene = {**make_scenes(1, seed=96, regions=4)[0], **change}
    with pytest.raises(ValueError, match=message):
        model.predict_image(scene["features"], scene["object_ids"], scene["boxes"], IMAGE_SIZE)


# Training and evaluation.


def test_training_learns_the_rule(trained):
    model, metrics = trained
    held_out = make_scenes(60, seed=2)
    recall = evaluate_recall(model, held_out, ks=(20, 50))
    assert recall["recall@20"] > 0.8
    assert recall["recall@50"] >= recall["recall@20"]
    assert metrics["epoch_losses"][-1] < metrics["epoch_losses"][0]
    assert metrics["images"] == 200


def test_untrained_model_stays_near_chance():
    torch.manual_seed(0)
    model = RelationPredictor(FEATURE_DIM, NUM_CLASSES, PREDICATES, hidden_dim=64, embed_dim=16).eval()
    recall = evaluate_recall(model, make_scenes(60, seed=2), ks=(20,))
    assert recall["recall@20"] < 0.4


def test_training_is_deterministic_on_cpu():
    scenes = make_scenes(40, seed=3)
    settings = dict(epochs=2, lr=1e-3, seed=11, device="cpu", hidden_dim=32, embed_dim=8)
    first_model, first = train_relation_predictor(scenes, PREDICATES, NUM_CLASSES, FEATURE_DIM, **settings)
    second_model, second = train_relation_predictor(scenes, PREDICATES, NUM_CLASSES, FEATURE_DIM, **settings)
    assert first["epoch_losses"] == second["epoch_losses"]
    for name, tensor in first_model.state_dict().items():
        torch.testing.assert_close(tensor, second_model.state_dict()[name], rtol=0, atol=0)


def test_evaluate_recall_counts_hits_exactly():
    # A frequency bias that always ranks "right of" first makes the ranking predictable.
    model = RelationPredictor(FEATURE_DIM, NUM_CLASSES, PREDICATES, hidden_dim=8, embed_dim=4, dropout=0.0)
    with torch.no_grad():
        model.classifier[-1].weight.zero_()
        model.classifier[-1].bias.zero_()
        keys = np.array([0 * NUM_CLASSES + 1, 1 * NUM_CLASSES + 2])
        table = np.full((3, len(PREDICATES)), -10.0, dtype=np.float32)
        table[:, 1] = 0.0
        table[0, 1] = 5.0  # (0, 1, "right of") ranks first
        table[1, 3] = -5.0  # (1, 2, "right of") ranks 6th, (1, 2, "below") 7th
        model.set_frequency_bias(keys, table)
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], dtype=np.float32)
    scene = {
        "features": np.zeros((3, FEATURE_DIM), np.float32),
        "object_ids": np.array([0, 1, 2]),
        "boxes": boxes,
        "image_size": (100, 100),
        "relations": np.array([[0, 1, 1], [1, 2, 3], [1, 2, 3]]),  # the repeat counts once
    }
    recall = evaluate_recall(model, [scene], ks=(1, 6, 7))
    assert recall["triplets"] == 2
    assert recall["recall@1"] == 0.5
    assert recall["recall@6"] == 0.5
    assert recall["recall@7"] == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"relations": np.array([[0, 0, 1]])}, "same region"),
        ({"relations": np.array([[0, 8, 1]])}, "relation rows"),
        ({"relations": np.array([[0, 1, 0]])}, "background"),
        ({"relations": np.array([[0, 1, 5]])}, "predicates must lie"),
        ({"object_ids": np.arange(8) + 1}, "object ids"),
        ({"image_size": (0, 10)}, "image_size"),
        ({"boxes": np.zeros((8, 3))}, "boxes"),
        ({"relations": np.array([[0, 1], [1, 2], [2, 0]])}, r"\(T, 3\)"),
        ({"object_ids": np.zeros(8)}, "integers"),
    ],
)
def test_training_rejects_bad_samples(change, message):
    scenes = make_scenes(3, seed=4)
    scenes[2] = {**scenes[2], **change}
    with pytest.raises(ValueError, match=f"sample 2: .*{message}"):
        train_relation_predictor(scenes, PREDICATES, NUM_CLASSES, FEATURE_DIM, epochs=1, lr=1e-3, seed=0, device="cpu")


def test_training_without_relations_fails():
    scenes = [{**scene, "relations": np.zeros((0, 3))} for scene in make_scenes(3, seed=4)]
    with pytest.raises(ValueError, match="has a relation"):
        train_relation_predictor(scenes, PREDICATES, NUM_CLASSES, FEATURE_DIM, epochs=1, lr=1e-3, seed=0, device="cpu")


# Checkpoints.


def test_checkpoint_round_trip(trained, tmp_path):
    model, metrics = trained
    path = tmp_path / "relations.pt"
    save_checkpoint(path, model, {"recall@20": 0.9, "epochs": 12})

    assert [entry.name for entry in tmp_path.iterdir()] == ["relations.pt"]
    loaded, meta = load_checkpoint(path, device="cpu")
    assert meta == {"recall@20": 0.9, "epochs": 12}
    assert loaded.predicate_names == PREDICATES
    assert not loaded.training

    scene = make_scenes(1, seed=95)[0]
    args = (scene["features"], scene["object_ids"], scene["boxes"], IMAGE_SIZE)
    for expected, actual in zip(model.predict_image(*args), loaded.predict_image(*args)):
        np.testing.assert_array_equal(expected, actual)


def test_checkpoint_is_a_plain_dict(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "relations.pt"
    save_checkpoint(path, model)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == "cmsei.relation_predictor"
    assert checkpoint["predicate_names"] == list(PREDICATES)
    assert checkpoint["num_object_classes"] == NUM_CLASSES
    assert "frequency_bias.weight" in checkpoint["state_dict"]
    keys = checkpoint["state_dict"]["frequency_keys"]
    assert checkpoint["config"]["num_frequency_pairs"] == keys.shape[0]
    assert checkpoint["state_dict"]["frequency_bias.weight"].shape == (keys.shape[0] + 1, len(PREDICATES))


def test_load_checkpoint_rejects_version_1(trained, tmp_path):
    model, _ = trained
    path = tmp_path / "relations.pt"
    save_checkpoint(path, model)
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "version": 1}, path)
    with pytest.raises(ValueError, match="version 1.*retrain"):
        load_checkpoint(path, device="cpu")


def test_save_checkpoint_rejects_non_json_meta(trained, tmp_path):
    model, _ = trained
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "relations.pt", model, {"array": np.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_load_checkpoint_rejects_other_files(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a relation predictor checkpoint"):
        load_checkpoint(other, device="cpu")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        load_checkpoint(garbage, device="cpu")

    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", device="cpu")
