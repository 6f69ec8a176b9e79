"""Tests of the word vocabulary: building, encoding, and loading/saving ours and SCAN's JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from extractors.captions import Vocabulary, VocabularyError

SAMPLE_DATA = Path(os.environ.get("CMSEI_SAMPLE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def scan_vocab_path(name: str) -> Path:
    path = SAMPLE_DATA / "labels" / name
    if not path.is_file():
        pytest.skip(f"sample data file {path} not found; set CMSEI_SAMPLE_DATA")
    return path


def test_build_threshold_and_order():
    captions = [["A", "dog"], ["a", "cat"], ["a", "dog"], ["the", "Dog"], ["cat", "zebra"]]

    vocab = Vocabulary.build(captions, threshold=2)

    assert vocab.items() == [("<pad>", 0), ("<start>", 1), ("<end>", 2), ("<unk>", 3),
                             ("a", 4), ("dog", 5), ("cat", 6)]
    assert len(vocab) == 7
    assert "zebra" not in vocab
    assert "DOG" in vocab


def test_build_ties_sorted_by_word():
    vocab = Vocabulary.build([["pear", "apple", "fig"]], threshold=1)

    assert [word for word, _ in vocab.items()][4:] == ["apple", "fig", "pear"]


def test_build_is_deterministic():
    captions = [["b", "a", "c", "a"], ["c", "b"], ["d"]]

    first = Vocabulary.build(captions, threshold=1)
    second = Vocabulary.build(list(reversed(captions)), threshold=1)

    assert first == second


def test_build_skips_special_token_words():
    vocab = Vocabulary.build([["<unk>", "<pad>", "word"]], threshold=1)

    assert vocab.items()[4:] == [("word", 4)]


def test_build_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        Vocabulary.build([["a"]], threshold=0)


def test_build_rejects_non_string_token():
    with pytest.raises(TypeError, match="str"):
        Vocabulary.build([["a", 3]], threshold=1)


def test_encode_decode():
    vocab = Vocabulary.build([["a", "dog", "a", "dog"]], threshold=2)

    assert vocab.encode(["A", "Dog", "unicorn"]) == [4, 5, 3]
    assert vocab.encode(["a"], add_boundaries=True) == [1, 4, 2]
    assert vocab.decode([1, 4, 5, 2]) == ["<start>", "a", "dog", "<end>"]
    assert vocab.word_to_id("unicorn") == 3
    assert vocab.id_to_word(5) == "dog"


def test_id_to_word_unknown_id():
    vocab = Vocabulary.build([], threshold=1)

    with pytest.raises(KeyError, match="id 99"):
        vocab.id_to_word(99)


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build([["a", "red", "bus", "a"]], threshold=1)
    path = tmp_path / "vocab.json"

    vocab.save(path)

    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "cmsei-vocabulary"
    assert all(isinstance(index, int) for index in data["word_to_id"].values())
    assert Vocabulary.load(path) == vocab
    assert [entry.name for entry in tmp_path.iterdir()] == ["vocab.json"]


def test_scan_vocab_keeps_ids_exactly(tmp_path):
    source = scan_vocab_path("coco_precomp_vocab.json")
    original = json.loads(source.read_text(encoding="utf-8"))

    vocab = Vocabulary.load(source)

    assert len(vocab) == original["idx"] == 11352
    for word, index in original["word2idx"].items():
        assert vocab.word_to_id(word) == index
    assert vocab.encode(["restaurant"]) == [original["word2idx"]["restaurant"]]

    ours = tmp_path / "coco_vocab.json"
    vocab.save(ours)
    assert Vocabulary.load(ours) == vocab

    scan_copy = tmp_path / "coco_precomp_vocab.json"
    vocab.save(scan_copy, layout="scan")
    assert json.loads(scan_copy.read_text(encoding="utf-8")) == original


def test_scan_f30k_vocab_loads():
    vocab = Vocabulary.load(scan_vocab_path("f30k_precomp_vocab.json"))

    assert vocab.id_to_word(3) == "<unk>"
    assert len(vocab) > 4


def test_scan_vocab_disagreeing_maps(tmp_path):
    data = {"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 4},
            "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "b"}, "idx": 5}
    path = tmp_path / "bad_vocab.json"
    path.write_text(json.dumps(data), encoding="utf-8")

    with pytest.raises(VocabularyError, match="must agree"):
        Vocabulary.load(path)


def test_special_token_ids_enforced(tmp_path):
    path = tmp_path / "bad_vocab.json"
    path.write_text(json.dumps({"word2idx": {"<unk>": 0, "<start>": 1, "<end>": 2, "<pad>": 3}}), encoding="utf-8")

    with pytest.raises(VocabularyError, match="<pad> must have id 0"):
        Vocabulary.load(path)


def test_duplicate_ids_rejected():
    with pytest.raises(VocabularyError, match="share id 4"):
        Vocabulary({"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 4, "b": 4})


def test_unknown_file_layout(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"words": ["a"]}), encoding="utf-8")

    with pytest.raises(VocabularyError, match="word2idx"):
        Vocabulary.load(path)


def test_invalid_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"word2idx": ', encoding="utf-8")

    with pytest.raises(VocabularyError, match="invalid JSON"):
        Vocabulary.load(path)


def test_save_unknown_layout(tmp_path):
    vocab = Vocabulary.build([], threshold=1)

    with pytest.raises(ValueError, match="layout"):
        vocab.save(tmp_path / "v.json", layout="yaml")
