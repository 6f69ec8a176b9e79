"""Tests of `cmsei-eval` and of the recall metrics for unequal caption counts.

The dataset folder is built like the one of test_trainer.py, but its captions come from a
Karpathy split file with train, val and test images. One test image has 3 captions and
one has 6, so the caption limit and the generalised recall are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmsei_model import cli_eval
from cmsei_model.checkpoint import build_model, load_checkpoint
from cmsei_model.data import (
    ReaderOptions,
    ShardReader,
    build_pair_index,
    limit_captions,
    select_eval_split,
)
from cmsei_model.evaluate import recall_metrics, recall_metrics_by_image, similarity_matrix
from cmsei_model.retrieval import ScoringOptions, encode_split, evaluate_encoded
from cmsei_model.train import TrainOptions, train
from tests.test_trainer import build_tiny_dataset

METRIC_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "i2t_meanr",
               "t2i_medr", "t2i_meanr"}
N_IMAGES = 24
TEST_IMAGES = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_karpathy_file(scenes: Path) -> Path:
    """Turn the scenes' captions.jsonl into a Karpathy split file: 14 train, 4 val, 6 test images."""
    records = [json.loads(line) for line in (scenes / "captions.jsonl").read_text().splitlines()]
    images = []
    for index, record in enumerate(records):
        split = "test"
        if index < 18:
            split = "val"
        if index < 14:
            split = "train"
        sentences = [{"raw": caption} for caption in record["captions"]]
        if index == 18:
            sentences = sentences[:3]
        if index == 19:
            sentences = sentences + [{"raw": record["captions"][0] + " here"}]
        images.append({"filename": record["image"], "split": split, "sentences": sentences})
    path = scenes / "dataset_synth.json"
    path.write_text(json.dumps({"images": images}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("eval")
    _, data = build_tiny_dataset(root, N_IMAGES, write_captions=write_karpathy_file)
    run = root / "run"
    train(TrainOptions(data=data, out=run, embed_size=32, word_dim=16, batch_size=6, loader_workers=0,
                       progress=False, epochs=1, max_steps_per_epoch=3))
    return data, run


def _run_cli(run: Path, *flags: str, capsys=None) -> tuple[int, str]:
    code = cli_eval.main(["--run", str(run), "--loader-workers", "0", *flags])
    output = capsys.readouterr().out if capsys is not None else ""
    return code, output


def test_eval_prints_table_and_writes_json(evaluated_run, capsys):
    _, run = evaluated_run
    code, output = _run_cli(run, "--split", "test", capsys=capsys)
    assert code == 0
    assert "image-to-text" in output
    assert "text-to-image" in output
    assert "rSum" in output

    result = json.loads((run / "eval-test.json").read_text())
    assert set(result["metrics"]) == METRIC_KEYS
    assert result["num_images"] == TEST_IMAGES
    assert result["num_captions"] == 5 * TEST_IMAGES - 2
    assert result["protocol"] == "5k"
    assert result["checkpoint"] == "best"


def test_eval_json_to_stdout(evaluated_run, capsys):
    _, run = evaluated_run
    code, output = _run_cli(run, "--split", "test", "--json", "--checkpoint", "last", capsys=capsys)
    assert code == 0
    result = json.loads(output)
    assert set(result["metrics"]) == METRIC_KEYS
    assert result["checkpoint"] == "last"
    metrics = result["metrics"]
    six = [metrics[name] for name in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")]
    assert metrics["rsum"] == pytest.approx(sum(six))
    assert all(0.0 <= value <= 100.0 for value in six)


def test_captions_per_image_limit(evaluated_run, capsys):
    _, run = evaluated_run
    _, output = _run_cli(run, "--split", "test", "--json", "--captions-per-image", "0", capsys=capsys)
    assert json.loads(output)["num_captions"] == 5 * TEST_IMAGES - 2 + 1
    _, output = _run_cli(run, "--split", "test", "--json", "--captions-per-image", "2", capsys=capsys)
    assert json.loads(output)["num_captions"] == 2 * TEST_IMAGES


def _encoded_test_split(data: Path, run: Path, split: str = "test", per_image: int | None = 5):
    checkpoint = load_checkpoint(run / "best.pt")
    model, vocabulary = build_model(checkpoint)
    pairs = limit_captions(select_eval_split(build_pair_index(data), split, None), per_image)
    reader = ShardReader(data, vocabulary, ReaderOptions(model.config.spatial_graph, model.config.semantic_graph))
    encoded = encode_split(model, reader, pairs, torch.device("cpu"), batch_size=4)
    return model, encoded


def test_5k_protocol_matches_full_matrix(evaluated_run, capsys):
    data, run = evaluated_run
    model, encoded = _encoded_test_split(data, run, per_image=2)
    scores = similarity_matrix(model, encoded.images, encoded.captions)
    expected = recall_metrics(scores, captions_per_image=2)

    _, output = _run_cli(run, "--split", "test", "--json", "--captions-per-image", "2", capsys=capsys)
    metrics = json.loads(output)["metrics"]
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name


def test_coco_folds_average_diagonal_blocks(evaluated_run):
    data, run = evaluated_run
    model, encoded = _encoded_test_split(data, run, split="train", per_image=5)
    fold_size = 2
    result = evaluate_encoded(model, encoded, "coco-5fold", fold_size=fold_size)
    scores = similarity_matrix(model, encoded.images, encoded.captions)

    folds = []
    for fold in range(5):
        images = slice(fold * fold_size, (fold + 1) * fold_size)
        columns = np.flatnonzero((encoded.caption_images >= images.start) & (encoded.caption_images < images.stop))
        folds.append(recall_metrics_by_image(scores[images][:, columns], encoded.caption_images[columns] - images.start))
    assert result["num_folds"] == 5
    assert result["num_images"] == 5 * fold_size
    for name in METRIC_KEYS:
        assert result["metrics"][name] == pytest.approx(np.mean([fold[name] for fold in folds])), name
    assert result["pairs_scored"] == sum(fold_size * 5 * fold_size for _ in range(5))


def test_1k_protocol_uses_first_fold(evaluated_run):
    data, run = evaluated_run
    model, encoded = _encoded_test_split(data, run, split="train")
    result = evaluate_encoded(model, encoded, "1k", fold_size=4)
    assert result["num_images"] == 4
    with pytest.raises(ValueError, match="needs 5000 images"):
        evaluate_encoded(model, encoded, "coco-5fold")


def test_block_size_keeps_metrics(evaluated_run):
    data, run = evaluated_run
    model, encoded = _encoded_test_split(data, run)
    default = evaluate_encoded(model, encoded, "5k")
    small = evaluate_encoded(model, encoded, "5k", scoring=ScoringOptions(image_block_size=2, caption_block_size=3,
                                                                          max_pairs_per_chunk=5))
    for name in METRIC_KEYS:
        assert small["metrics"][name] == pytest.approx(default["metrics"][name]), name


def test_captions_grouped_by_image(evaluated_run):
    data, run = evaluated_run
    _, encoded = _encoded_test_split(data, run, per_image=None)
    assert np.all(np.diff(encoded.caption_images) >= 0)
    assert np.bincount(encoded.caption_images).tolist() == [3, 6, 5, 5, 5, 5]
    assert len(encoded.image_ids) == TEST_IMAGES


def test_missing_split_fails(evaluated_run, caplog):
    _, run = evaluated_run
    code, _ = _run_cli(run, "--split", "nosuch")
    assert code == 2
    assert "split 'nosuch' not found" in caplog.text


def test_missing_run_fails(tmp_path, caplog):
    code, _ = _run_cli(tmp_path / "norun", "--split", "test")
    assert code == 2
    assert "not found" in caplog.text


def test_protocol_needs_enough_images(evaluated_run, caplog):
    _, run = evaluated_run
    code, _ = _run_cli(run, "--split", "test", "--protocol", "coco-5fold")
    assert code == 2
    assert "--protocol 5k" in caplog.text


def test_recall_by_image_matches_standard_recall():
    rng = np.random.default_rng(0)
    for captions_per_image in (1, 2, 5):
        scores = rng.integers(0, 4, size=(7, 7 * captions_per_image)).astype(np.float32)
        owners = np.arange(7 * captions_per_image) // captions_per_image
        expected = recall_metrics(scores, captions_per_image)
        actual = recall_metrics_by_image(scores, owners)
        for name, value in expected.items():
            assert actual[name] == pytest.approx(value), (captions_per_image, name)


def test_recall_by_image_hand_computed():
    # Image 0 owns captions 0 and 2, image 1 owns caption 1.
    scores = np.array([[0.1, 0.9, 0.5],
                       [0.8, 0.7, 0.2]])
    owners = np.array([0, 1, 0])
    metrics = recall_metrics_by_image(scores, owners)
    # i2t: image 0's best caption (column 2, 0.5) ranks second; image 1's caption ranks second.
    assert metrics["i2t_r1"] == 0.0
    assert metrics["i2t_r5"] == 100.0
    # t2i: caption 0 -> image 1 scores higher (rank 1); caption 1 -> rank 1; caption 2 -> rank 0.
    assert metrics["t2i_r1"] == pytest.approx(100.0 / 3)
    assert metrics["t2i_meanr"] == pytest.approx(1 + 2 / 3)
    assert metrics["rsum"] == pytest.approx(0 + 100 + 100 + 100 / 3 + 100 + 100)


def test_recall_by_image_rejects_image_without_caption():
    with pytest.raises(ValueError, match="have no caption"):
        recall_metrics_by_image(np.zeros((3, 2)), np.array([0, 0]))
    with pytest.raises(ValueError, match="outside"):
        recall_metrics_by_image(np.zeros((2, 2)), np.array([0, 2]))
