"""Tests of the CMSEI model: shapes, padding, ablation flags, gradients and input checks.

All models use small sizes (d = 32) on the CPU. A CUDA test runs only where CUDA is present.
"""

from __future__ import annotations

import pytest
import torch

from cmsei_model.config import CMSEIConfig
from cmsei_model.loss import triplet_ranking_loss
from cmsei_model.model import CMSEI

FEATURE_DIM = 48
VOCAB_SIZE = 40
NUM_PREDICATES = 7

SMALL = {
    "feature_dim": FEATURE_DIM,
    "embed_dim": 32,
    "word_dim": 24,
    "predicate_dim": 24,
    "num_predicates": NUM_PREDICATES,
    "max_pairs_per_chunk": 64,
}

FLAGS = ("spatial_graph", "semantic_graph", "interaction", "cross_level", "box_geometry")



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_config(**overrides) -> CMSEIConfig:
    return CMSEIConfig(**{**SMALL, **overrides})


def build_model(config: CMSEIConfig, seed: int = 0) -> CMSEI:
    torch.manual_seed(seed)
    return CMSEI(config, VOCAB_SIZE).double()


def make_images(n_images: int, k: int, n_edges: int, seed: int) -> dict[str, torch.Tensor]:
    """Random image inputs in which image 0 has one padded region and every image has edges."""
    generator = torch.Generator().manual_seed(seed)
    region_mask = torch.ones(n_images, k, dtype=torch.bool)
    region_mask[0, k - 1] = False
    real_counts = region_mask.sum(1)

    corners = torch.rand(n_images, k, 2, generator=generator, dtype=torch.float64) * 0.5
    sizes = torch.rand(n_images, k, 2, generator=generator, dtype=torch.float64) * 0.5
    labels = torch.randint(0, 12, (n_images, k, k), generator=generator, dtype=torch.uint8)
    labels = labels * (~torch.eye(k, dtype=torch.bool)).to(torch.uint8)

    subjects = torch.stack(
        [torch.randint(0, int(real_counts[i]), (n_edges,), generator=generator) for i in range(n_images)]
    )
    objects = (subjects + 1) % real_counts[:, None]
    return {
        "features": torch.randn(n_images, k, FEATURE_DIM, generator=generator, dtype=torch.float64),
        "region_mask": region_mask,
        "boxes_norm": torch.cat([corners, corners + sizes], dim=-1),
        "spatial_labels": labels,
        "sg_edges": torch.stack([subjects, objects], dim=-1),
        "sg_predicates": torch.randint(1, NUM_PREDICATES, (n_images, n_edges), generator=generator),
        "sg_scores": torch.rand(n_images, n_edges, generator=generator, dtype=torch.float64),
        "sg_mask": torch.ones(n_images, n_edges, dtype=torch.bool),
    }


def make_captions(n_captions: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, (n_captions,), generator=generator)
    lengths[0] = n
    token_ids = torch.randint(1, VOCAB_SIZE, (n_captions, n), generator=generator)
    positions = torch.arange(n)[None, :]
    token_ids = token_ids.masked_fill(positions >= lengths[:, None], 0)
    return {"token_ids": token_ids, "lengths": lengths}


def score(model: CMSEI, images: dict, captions: dict, **kwargs) -> torch.Tensor:
    encoded_images = model.encode_images(**images)
    encoded_captions = model.encode_captions(**captions)
    return model.similarity(encoded_images, encoded_captions, **kwargs)


def pad_images(images: dict, extra_regions: int, extra_edges: int, seed: int) -> dict:
    """Append padded regions (random or NaN features) and edges whose values must not matter."""
    generator = torch.Generator().manual_seed(seed)
    n_images, k = images["region_mask"].shape
    n_edges = images["sg_edges"].shape[1]
    new_k = k + extra_regions
    new_e = n_edges + extra_edges

    features = torch.full((n_images, new_k, FEATURE_DIM), float("nan"), dtype=torch.float64)
    features[:, :k] = images["features"]
    features[:, k] = torch.randn(n_images, FEATURE_DIM, generator=generator, dtype=torch.float64)
    region_mask = torch.zeros(n_images, new_k, dtype=torch.bool)
    region_mask[:, :k] = images["region_mask"]
    boxes = torch.rand(n_images, new_k, 4, generator=generator, dtype=torch.float64) * 3.0
    boxes[:, :k] = images["boxes_norm"]
    labels = torch.randint(1, 12, (n_images, new_k, new_k), generator=generator, dtype=torch.uint8)
    labels[:, :k, :k] = images["spatial_labels"]

    edges = torch.randint(0, new_k, (n_images, new_e, 2), generator=generator)
    edges[:, :n_edges] = images["sg_edges"]
    predicates = torch.randint(0, NUM_PREDICATES, (n_images, new_e), generator=generator)
    predicates[:, :n_edges] = images["sg_predicates"]
    scores = torch.rand(n_images, new_e, generator=generator, dtype=torch.float64)
    scores[:, :n_edges] = images["sg_scores"]
    edge_mask = torch.zeros(n_images, new_e, dtype=torch.bool)
    edge_mask[:, :n_edges] = images["sg_mask"]

    return {
        "features": features,
        "region_mask": region_mask,
        "boxes_norm": boxes,
        "spatial_labels": labels,
        "sg_edges": edges,
        "sg_predicates": predicates,
        "sg_scores": scores,
        "sg_mask": edge_mask,
    }


def pad_captions(captions: dict, extra_words: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    n_captions, n = captions["token_ids"].shape
    token_ids = torch.randint(1, VOCAB_SIZE, (n_captions, n + extra_words), generator=generator)
    positions = torch.arange(n)[None, :]
    token_ids[:, :n] = torch.where(
        positions < captions["lengths"][:, None], captions["token_ids"], token_ids[:, :n]
    )
    return {"token_ids": token_ids, "lengths": captions["lengths"].clone()}


def test_encoders_shapes_and_norms():
    model = build_model(small_config())
    images = model.encode_images(**make_images(3, 5, 4, seed=1))
    captions = model.encode_captions(**make_captions(4, 6, seed=2))

    assert images.regions.shape == (3, 5, 32)
    assert images.region_mask.shape == (3, 5)
    assert images.image_vector.shape == (3, 32)
    assert captions.words.shape == (4, 6, 32)
    assert captions.sentence.shape == (4, 32)
    real_norms = images.regions[images.region_mask].norm(dim=-1)
    assert torch.allclose(real_norms, torch.ones_like(real_norms))
    assert torch.all(images.regions[~images.region_mask] == 0)
    word_norms = captions.words[captions.word_mask].norm(dim=-1)
    assert torch.allclose(word_norms, torch.ones_like(word_norms))
    assert torch.all(captions.words[~captions.word_mask] == 0)


def test_similarity_shape_and_finite():
    model = build_model(small_config())
    similarity = score(model, make_images(3, 5, 4, seed=1), make_captions(4, 6, seed=2))

    assert similarity.shape == (3, 4)
    assert torch.isfinite(similarity).all()


@pytest.mark.parametrize("flag", (None,) + FLAGS)
def test_padding_does_not_change_similarity(flag):
    config = small_config() if flag is None else small_config(**{flag: False})
    model = build_model(config)
    images = make_images(3, 5, 4, seed=3)
    captions = make_captions(4, 6, seed=4)

    plain = score(model, images, captions)
    padded = score(model, pad_images(images, 3, 5, seed=5), pad_captions(captions, 4, seed=6))

    assert torch.allclose(plain, padded, atol=1e-10)


def test_pairs_scored_independently():
    model = build_model(small_config())
    images = model.encode_images(**make_images(3, 5, 4, seed=7))
    captions = model.encode_captions(**make_captions(4, 6, seed=8))
    batch = model.similarity(images, captions)

    for i in range(3):
        for j in range(4):
            single = model.similarity(images.slice(i, i + 1), captions.slice(j, j + 1))
            assert torch.allclose(single[0, 0], batch[i, j], atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_chunk_size_does_not_change_similarity(chunk):
    model = build_model(small_config())
    images = model.encode_images(**make_images(3, 5, 4, seed=9))
    captions = model.encode_captions(**make_captions(7, 6, seed=10))

    reference = model.similarity(images, captions, max_pairs_per_chunk=10_000)
    chunked = model.similarity(images, captions, max_pairs_per_chunk=chunk)

    assert torch.allclose(reference, chunked, atol=1e-12)


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    results = []
    for enabled in (False, True):
        model = build_model(small_config(gradient_checkpointing=enabled, max_pairs_per_chunk=5))
        loss = triplet_ranking_loss(score(model, make_images(4, 5, 4, seed=29), make_captions(4, 6, seed=30)))
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))

    (plain_loss, plain_grads), (checkpointed_loss, checkpointed_grads) = results
    assert torch.allclose(plain_loss, checkpointed_loss, atol=1e-12)
    for name, gradient in plain_grads.items():
        assert torch.allclose(gradient, checkpointed_grads[name], atol=1e-10), name


@pytest.mark.parametrize("flag", FLAGS)
def test_ablation_flag_changes_similarity(flag):
    full = build_model(small_config())
    ablated = CMSEI(small_config(**{flag: False}), VOCAB_SIZE).double()
    missing, unexpected = ablated.load_state_dict(full.state_dict(), strict=False)
    images = make_images(3, 5, 4, seed=11)
    captions = make_captions(4, 6, seed=12)

    assert missing == []
    assert unexpected, f"disabling {flag} should drop parameters"
    assert not torch.allclose(score(full, images, captions), score(ablated, images, captions))


def test_alignment_and_pooling_options_change_similarity():
    images = make_images(3, 5, 4, seed=13)
    captions = make_captions(4, 6, seed=14)
    reference = score(build_model(small_config()), images, captions)

    for change in ({"alignment": "t2i"}, {"alignment": "i2t"}, {"pooling": "mean"}):
        changed = score(build_model(small_config(**change)), images, captions)
        assert not torch.allclose(reference, changed), change


def test_empty_sets_and_edgeless_graphs():
    model = build_model(small_config())
    images = model.encode_images(**make_images(2, 5, 0, seed=31))
    captions = model.encode_captions(**make_captions(3, 4, seed=32))

    assert model.similarity(images, captions).shape == (2, 3)
    assert model.similarity(images.slice(0, 0), captions).shape == (0, 3)
    assert model.similarity(images, captions.slice(0, 0)).shape == (2, 0)


def test_bfloat16_autocast_stays_close_to_float32():
    torch.manual_seed(0)
    model = CMSEI(small_config(), VOCAB_SIZE)
    images = {
        key: value.float() if value.is_floating_point() else value
        for key, value in make_images(3, 5, 4, seed=33).items()
    }
    captions = make_captions(4, 6, seed=34)
    reference = score(model, images, captions)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = score(model, images, captions)

    assert torch.isfinite(mixed).all()
    assert torch.allclose(mixed.float(), reference, atol=0.05)


def test_semantic_edges_below_threshold_are_ignored():
    model = build_model(small_config(relation_threshold=0.5))
    images = make_images(3, 5, 4, seed=15)
    low_scores = dict(images, sg_scores=torch.full_like(images["sg_scores"], 0.49))
    no_edges = dict(images, sg_mask=torch.zeros_like(images["sg_mask"]))
    high_scores = dict(images, sg_scores=torch.full_like(images["sg_scores"], 0.5))
    captions = make_captions(2, 6, seed=16)

    assert torch.allclose(score(model, low_scores, captions), score(model, no_edges, captions))
    assert not torch.allclose(score(model, high_scores, captions), score(model, no_edges, captions))


def test_semantic_edges_change_only_their_regions():
    model = build_model(small_config(spatial_graph=False))
    images = make_images(1, 5, 1, seed=17)
    images["sg_edges"] = torch.tensor([[[0, 1]]])
    without = model.encode_images(**dict(images, sg_mask=torch.zeros(1, 1, dtype=torch.bool)))
    with_edge = model.encode_images(**images)

    changed = ~torch.isclose(without.regions, with_edge.regions).all(dim=-1)[0]
    assert changed.tolist() == [True, True, False, False, False]


def test_baseline_config_runs_without_graph_inputs():
    config = CMSEIConfig.baseline(**SMALL)
    model = build_model(config)
    images = make_images(2, 4, 3, seed=18)
    similarity = score(
        model,
        {"features": images["features"], "region_mask": images["region_mask"]},
        make_captions(3, 5, seed=19),
    )

    assert config.alignment == "t2i"
    assert not any([config.spatial_graph, config.semantic_graph, config.interaction, config.cross_level])
    assert model.spatial_graph is None
    assert model.semantic_graph is None
    assert model.interaction is None
    assert model.cross_level is None
    assert similarity.shape == (2, 3)


def enabled_parameter_names(model: CMSEI) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


@pytest.mark.parametrize("flag", (None,) + FLAGS)
def test_gradients_reach_every_enabled_parameter(flag):
    config = small_config() if flag is None else small_config(**{flag: False})
    model = build_model(config)
    images = make_images(4, 5, 4, seed=20)
    captions = make_captions(4, 6, seed=21)

    loss = triplet_ranking_loss(score(model, images, captions), margin=0.5)
    loss.backward()

    assert loss.item() > 0
    without_gradient = [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is None or not torch.any(parameter.grad != 0)
    ]
    assert without_gradient == []
    assert len(enabled_parameter_names(model)) > 10


def test_config_rejects_invalid_options():
    with pytest.raises(ValueError, match="alignment"):
        CMSEIConfig(alignment="sideways")
    with pytest.raises(ValueError, match="pooling"):
        CMSEIConfig(pooling="max")
    with pytest.raises(ValueError, match="embed_dim"):
        CMSEIConfig(embed_dim=0)
    with pytest.raises(ValueError, match="lse_lambda"):
        CMSEIConfig(lse_lambda=0.0)
    with pytest.raises(ValueError, match="fine_weight"):
        CMSEIConfig(fine_weight=0.0, cross_level=False)


def test_config_dict_round_trip():
    config = small_config(spatial_graph=False, lse_lambda=4.0)

    assert CMSEIConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown CMSEIConfig fields"):
        CMSEIConfig.from_dict({**config.to_dict(), "dropout": 0.1})


INVALID_IMAGE_INPUTS = [
    ("wrong feature size", lambda x: dict(x, features=x["features"][..., :10]), "features has shape"),
    ("label out of range", lambda x: dict(x, spatial_labels=x["spatial_labels"] + 12), "spatial_labels"),
    ("labels missing", lambda x: dict(x, spatial_labels=None), "spatial_labels is None"),
    ("boxes missing", lambda x: dict(x, boxes_norm=None), "boxes_norm is None"),
    ("boxes in pixels", lambda x: dict(x, boxes_norm=x["boxes_norm"] * 640), "boxes_norm of real regions"),
    ("image without regions", lambda x: dict(x, region_mask=x["region_mask"] & False), "no real region"),
    ("scene graph missing", lambda x: dict(x, sg_edges=None), "sg_edges"),
    ("edge index too large", lambda x: dict(x, sg_edges=x["sg_edges"] + 5), "sg_edges"),
    ("predicate out of range", lambda x: dict(x, sg_predicates=x["sg_predicates"] + NUM_PREDICATES), "sg_predicates"),
    ("edge mask wrong shape", lambda x: dict(x, sg_mask=x["sg_mask"][:, :2]), "sg_mask has shape"),
]


@pytest.mark.parametrize("case, corrupt, message", INVALID_IMAGE_INPUTS, ids=[c[0] for c in INVALID_IMAGE_INPUTS])
def test_encode_images_rejects_invalid_input(case, corrupt, message):
    model = build_model(small_config())
    images = make_images(2, 5, 3, seed=22)

    with pytest.raises(ValueError, match=message):
        model.encode_images(**corrupt(images))


def test_encode_images_rejects_edge_to_padded_region():
    model = build_model(small_config())
    images = make_images(2, 5, 3, seed=23)
    images["sg_edges"][0, 0] = torch.tensor([0, 4])

    with pytest.raises(ValueError, match="point at padded regions"):
        model.encode_images(**images)


def test_encode_captions_rejects_invalid_input():
    model = build_model(small_config())
    captions = make_captions(3, 5, seed=24)

    with pytest.raises(ValueError, match="lengths"):
        model.encode_captions(captions["token_ids"], torch.tensor([5, 0, 2]))
    with pytest.raises(ValueError, match="lengths"):
        model.encode_captions(captions["token_ids"], torch.tensor([6, 1, 2]))
    with pytest.raises(ValueError, match="token_ids"):
        model.encode_captions(captions["token_ids"] + VOCAB_SIZE, captions["lengths"])
    with pytest.raises(ValueError, match="integer"):
        model.encode_captions(captions["token_ids"].double(), captions["lengths"])


def test_uint8_and_long_labels_agree():
    model = build_model(small_config())
    images = make_images(2, 5, 3, seed=25)
    captions = make_captions(2, 5, seed=26)
    as_long = dict(images, spatial_labels=images["spatial_labels"].long())

    assert torch.equal(score(model, images, captions), score(model, as_long, captions))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = build_model(small_config())
    images = make_images(3, 5, 4, seed=27)
    captions = make_captions(3, 6, seed=28)
    on_cpu = score(model, images, captions)

    model = model.cuda()
    images_cuda = {key: value.cuda() for key, value in images.items()}
    captions_cuda = {key: value.cuda() for key, value in captions.items()}
    on_cuda = score(model, images_cuda, captions_cuda)
    triplet_ranking_loss(on_cuda).backward()

    assert torch.allclose(on_cpu, on_cuda.cpu(), atol=1e-8)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
