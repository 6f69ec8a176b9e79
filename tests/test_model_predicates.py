"""Tests of `init_predicate_embeddings`: predicate embeddings start at their words' embeddings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cmsei_model.config import CMSEIConfig
from cmsei_model.model import CMSEI
from cmsei_model.semantic_graph import _word_to_predicate_projection, init_predicate_embeddings

VOCAB = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "man": 4, "wear": 5, "hat": 6,
         "parked": 7, "on": 8, "car": 9, "in": 10, "front": 11, "of": 12, "dog": 13}
PREDICATES = ["__background__", "wear", "parked on", "in_front_of", "hovering"]



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sample_data_dir() -> Path:
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    return Path(os.environ.get("CMSEI_SAMPLE_DATA", default))


def build_model(word_dim: int, predicate_dim: int, num_predicates: int = len(PREDICATES), vocab_size: int = len(VOCAB)) -> CMSEI:
    torch.manual_seed(0)
    config = CMSEIConfig(
        feature_dim=16,
        embed_dim=16,
        word_dim=word_dim,
        predicate_dim=predicate_dim,
        num_predicates=num_predicates,
    )
    return CMSEI(config, vocab_size)


def word_vector(model: CMSEI, word: str) -> torch.Tensor:
    return model.text_encoder.embedding.weight[VOCAB[word]].detach()


def predicate_vector(model: CMSEI, name: str) -> torch.Tensor:
    return model.semantic_graph.predicate_embedding.weight[PREDICATES.index(name)].detach()


def test_single_word_predicate_equals_word_embedding():
    model = build_model(word_dim=12, predicate_dim=12)
    background_before = predicate_vector(model, "__background__").clone()

    missing = init_predicate_embeddings(model, PREDICATES, VOCAB)

    assert missing == ["hovering"]
    assert torch.equal(predicate_vector(model, "wear"), word_vector(model, "wear"))
    assert torch.equal(predicate_vector(model, "__background__"), background_before)


def test_multi_word_predicate_is_mean_of_words():
    model = build_model(word_dim=12, predicate_dim=12)

    init_predicate_embeddings(model, PREDICATES, VOCAB)

    parked_on = (word_vector(model, "parked") + word_vector(model, "on")) / 2
    in_front_of = (word_vector(model, "in") + word_vector(model, "front") + word_vector(model, "of")) / 3
    assert torch.allclose(predicate_vector(model, "parked on"), parked_on)
    assert torch.allclose(predicate_vector(model, "in_front_of"), in_front_of)


@pytest.mark.parametrize("predicate_dim", [6, 12, 20])
def test_wear_edge_starts_closest_to_word_wear(predicate_dim):
    model = build_model(word_dim=12, predicate_dim=predicate_dim)

    init_predicate_embeddings(model, PREDICATES, VOCAB)

    # Compare in predicate space, with every word mapped as the initialisation maps words.
    words = model.text_encoder.embedding.weight.detach()
    projected = words @ _word_to_predicate_projection(words, predicate_dim)
    wear_edge = predicate_vector(model, "wear")
    similarity = F.cosine_similarity(wear_edge[None], projected[1:], dim=-1)

    assert int(similarity.argmax()) + 1 == VOCAB["wear"]
    assert similarity.max().item() == pytest.approx(1.0, abs=1e-6)
    assert similarity.sort(descending=True).values[1].item() < 0.99


def test_wider_predicate_space_pads_with_zeros():
    model = build_model(word_dim=12, predicate_dim=20)

    init_predicate_embeddings(model, PREDICATES, VOCAB)

    wear = predicate_vector(model, "wear")
    assert torch.equal(wear[:12], word_vector(model, "wear"))
    assert torch.all(wear[12:] == 0)


def test_rejects_mismatched_names_and_disabled_graph():
    model = build_model(word_dim=12, predicate_dim=12)
    with pytest.raises(ValueError, match="predicate names"):
        init_predicate_embeddings(model, PREDICATES[:-1], VOCAB)
    with pytest.raises(ValueError, match="outside the word embedding table"):
        init_predicate_embeddings(model, PREDICATES, {**VOCAB, "wear": len(VOCAB) + 3})

    torch.manual_seed(0)
    without_graph = CMSEI(CMSEIConfig(feature_dim=16, embed_dim=16, semantic_graph=False), len(VOCAB))
    with pytest.raises(ValueError, match="semantic_graph=False"):
        init_predicate_embeddings(without_graph, PREDICATES, VOCAB)


def test_real_vg150_predicates_with_scan_vocabulary():
    labels = sample_data_dir() / "labels"
    dictionaries_path = labels / "VG-SGG-dicts-with-attri.json"
    vocabulary_path = labels / "coco_precomp_vocab.json"
    if not dictionaries_path.exists() or not vocabulary_path.exists():
        pytest.skip(f"sample data not found under {labels}; set CMSEI_SAMPLE_DATA")

    dictionaries = json.loads(dictionaries_path.read_text())
    predicate_map = dictionaries["idx_to_predicate"]
    names = ["__background__"] + [predicate_map[str(i)] for i in range(1, len(predicate_map) + 1)]
    word_to_id = json.loads(vocabulary_path.read_text())["word2idx"]
    torch.manual_seed(0)
    config = CMSEIConfig(feature_dim=16, embed_dim=16, num_predicates=len(names))
    model = CMSEI(config, vocab_size=len(word_to_id))

    missing = init_predicate_embeddings(model, names, word_to_id)

    assert len(names) == 51
    assert missing == []
    table = model.semantic_graph.predicate_embedding.weight
    words = model.text_encoder.embedding.weight
    assert torch.equal(table[names.index("wearing")], words[word_to_id["wearing"]])
    sitting_on = (words[word_to_id["sitting"]] + words[word_to_id["on"]]) / 2
    assert torch.allclose(table[names.index("sitting on")], sitting_on)
