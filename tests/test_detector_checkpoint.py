"""Tests of weights loading: detectron2 name mapping, file formats and pickle rejection."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d

from extractors.checkpoint import (
    WeightsError,
    detectron2_to_native,
    map_state_dict,
    native_to_detectron2,
    read_state_dict,
)
from extractors.config import load_config
from extractors.detector import build_model
from extractors.extractor import build_extractor

# Small input and few proposals keep the ResNet-101 runs short.
SMALL_BUTD = {"min_size_test": 128, "max_size_test": 192, "rpn_post_nms_topk": 6,
              "rpn_pre_nms_topk": 200, "pooler_resolution": 7}


def sample_data_dir() -> Path:
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    path = Path(os.environ.get("CMSEI_SAMPLE_DATA", default))
    if not path.is_dir():
        pytest.skip(f"sample data not found at {path}; set CMSEI_SAMPLE_DATA")
    return path


def _synthetic_image(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:] = rng.integers(0, 255, size=3, dtype=np.uint8)
    image[height // 4: height // 2, width // 3: width // 2] = (250, 30, 30)
    image += rng.integers(0, 20, size=image.shape, dtype=np.uint8)
    return image


def _randomised_model(preset: str, overrides: dict | None = None) -> torch.nn.Module:
    """Build a model whose every parameter and batch-norm statistic is random and distinct."""
    config = load_config(preset, overrides)
    generator = torch.Generator().manual_seed(11)
    model = build_model(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                size = module.weight.shape
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return model


def _detectron2_state(model: torch.nn.Module, config: dict) -> dict[str, torch.Tensor]:
    state = {}
    for name, value in model.state_dict().items():
        d2_name = native_to_detectron2(name)
        assert d2_name is not None, f"no detectron2 name for {name}"
        state[d2_name] = value.clone()
    # Old detectron2 checkpoints also carry these buffers.
    state["pixel_mean"] = torch.tensor(config["pixel_mean"]).view(3, 1, 1)
    state["pixel_std"] = torch.tensor(config["pixel_std"]).view(3, 1, 1)
    state["proposal_generator.anchor_generator.cell_anchors.0"] = model.rpn.cell_anchors.clone()
    return state


@pytest.fixture(scope="module")
def butd_files(tmp_path_factory):
    """A random butd-r101-c4 model saved natively, as detectron2 .pth and as detectron2 .pkl."""
    folder = tmp_path_factory.mktemp("butd_weights")
    config = load_config("butd-r101-c4")
    model = _randomised_model("butd-r101-c4")
    d2_state = _detectron2_state(model, config)

    native_path = folder / "native.pth"
    torch.save(model.state_dict(), native_path)
    pth_path = folder / "d2.pth"
    torch.save({"model": d2_state, "iteration": 0}, pth_path)
    pkl_path = folder / "d2.pkl"
    with open(pkl_path, "wb") as handle:
        arrays = {name: value.numpy() for name, value in d2_state.items()}
        pickle.dump({"model": arrays, "__author__": "test"}, handle, protocol=2)
    return {"native": native_path, "pth": pth_path, "pkl": pkl_path,
            "names": list(model.state_dict())}


def test_detectron2_names():
    assert detectron2_to_native("backbone.res2.0.conv1.norm.running_var") == \
        "backbone.res2.0.bn1.running_var"
    assert detectron2_to_native("roi_heads.res5.2.shortcut.norm.bias") == \
        "roi_heads.res5.2.downsample.1.bias"
    assert detectron2_to_native("proposal_generator.rpn_head.objectness_logits.weight") == \
        "rpn.head.cls_logits.weight"
    assert detectron2_to_native("roi_heads.box_predictor.fc_attr.weight") == \
        "roi_heads.attribute_head.fc.weight"
    assert detectron2_to_native("backbone.res6.0.conv1.weight") is None


def test_butd_mapping_covers_every_key(butd_files, butd_outputs):
    config = load_config("butd-r101-c4")
    state = read_state_dict(butd_files["pkl"])

    mapped, unmapped = map_state_dict(state, butd_outputs["pkl"]["extractor"].model, config)

    assert unmapped == []
    assert sorted(mapped) == sorted(butd_files["names"])


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def butd_outputs(butd_files):
    """Extract a synthetic image, given boxes and a real photo through each of the three files."""
    image = _synthetic_image(1, 150, 200)
    boxes = [np.array([[10, 10, 120, 100], [0, 0, 200, 150]], dtype=np.float32)]
    records = _Records()
    checkpoint_logger = logging.getLogger("extractors.checkpoint")
    checkpoint_logger.addHandler(records)
    results = {}
    try:
        for kind in ("native", "pth", "pkl"):
            extractor = build_extractor("butd-r101-c4", overrides=SMALL_BUTD,
                                        weights=butd_files[kind], device="cpu")
            results[kind] = {
                "detected": extractor.extract([image])[0],
                "given": extractor.extract([image], boxes=boxes)[0],
                "sha256": extractor.weights_sha256,
                "extractor": extractor,
            }
    finally:
        checkpoint_logger.removeHandler(records)
    results["warnings"] = records.messages
    return results


@pytest.mark.parametrize("kind", ["pth", "pkl"])
@pytest.mark.parametrize("mode", ["detected", "given"])
def test_butd_detectron2_file_matches_native(butd_outputs, kind, mode):
    expected = butd_outputs["native"][mode]
    actual = butd_outputs[kind][mode]

    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{kind} {mode} {name}")


def test_butd_loading_warns_nothing(butd_outputs):
    assert butd_outputs["warnings"] == []


def test_butd_sha256_of_file(butd_files, butd_outputs):
    for kind in ("native", "pth", "pkl"):
        expected = hashlib.sha256(butd_files[kind].read_bytes()).hexdigest()
        assert butd_outputs[kind]["sha256"] == expected


def test_butd_loaded_weights_are_used(butd_files, butd_outputs):
    state = torch.load(butd_files["native"], weights_only=True)
    model = butd_outputs["pkl"]["extractor"].model

    # Layers without batch norm keep their weights through folding.
    for name in ("rpn.head.conv.weight", "roi_heads.predictor.cls_score.weight",
                 "roi_heads.attribute_head.class_embedding.weight",
                 "roi_heads.attribute_head.attr_score.bias"):
        assert torch.equal(model.state_dict()[name], state[name]), name


def _save_tiny(tmp_path: Path, edit=None) -> Path:
    state = _randomised_model("tiny").state_dict()
    if edit is not None:
        edit(state)
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    return path


def test_missing_and_unexpected_keys_named(tmp_path):
    def edit(state):
        del state["rpn.head.conv.weight"]
        state["extra.layer.weight"] = torch.zeros(2)

    path = _save_tiny(tmp_path, edit)

    with pytest.raises(WeightsError, match=r"rpn\.head\.conv\.weight.*extra\.layer\.weight"):
        build_extractor("tiny", weights=path, device="cpu")


def test_non_strict_loads_with_warning(tmp_path, caplog):
    def edit(state):
        state["extra.layer.weight"] = torch.zeros(2)

    path = _save_tiny(tmp_path, edit)

    with caplog.at_level(logging.WARNING):
        extractor = build_extractor("tiny", weights=path, device="cpu", strict=False)

    assert any("extra.layer.weight" in record.message for record in caplog.records)
    assert extractor.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_shape_mismatch_named(tmp_path):
    path = _save_tiny(tmp_path)

    with pytest.raises(WeightsError, match="wrong shape.*cls_score"):
        build_extractor("tiny", overrides={"num_classes": 20}, weights=path, device="cpu")


def test_missing_running_stats_filled(tmp_path):
    model = _randomised_model("tiny")
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
    native_path = tmp_path / "native.pth"
    torch.save(model.state_dict(), native_path)
    arrays = {
        name: value.numpy()
        for name, value in _detectron2_state(model, load_config("tiny")).items()
        if not name.endswith(("running_mean", "running_var"))
    }
    pkl_path = tmp_path / "no_stats.pkl"
    pkl_path.write_bytes(pickle.dumps({"model": arrays, "__author__": "test"}))
    image = _synthetic_image(4, 120, 160)

    expected = build_extractor("tiny", weights=native_path, device="cpu").extract([image])[0]
    actual = build_extractor("tiny", weights=pkl_path, device="cpu").extract([image])[0]

    np.testing.assert_allclose(actual["features"], expected["features"], rtol=1e-5, atol=1e-6)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_callable_rejected(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"model": {"w": np.zeros(2)}, "payload": _Exploit(marker)}, handle)

    with pytest.raises(WeightsError, match=r"rejected pickle.*system"):
        build_extractor("tiny", weights=path, device="cpu")

    assert not marker.exists()


def test_pth_with_callable_rejected(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"payload": _Exploit(marker)}, path)

    with pytest.raises(WeightsError, match="weights_only"):
        build_extractor("tiny", weights=path, device="cpu")

    assert not marker.exists()


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_extractor("tiny", weights=tmp_path / "absent.pth", device="cpu")


def test_weights_required():
    with pytest.raises(WeightsError, match="pass weights='untrained' explicitly"):
        build_extractor("tiny", device="cpu")


def test_weights_error_is_value_error():
    assert issubclass(WeightsError, ValueError)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")

    with pytest.raises(WeightsError, match="suffix"):
        build_extractor("tiny", weights=path, device="cpu")


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "truncated.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(4)}})[:20])

    with pytest.raises(WeightsError, match="cannot read"):
        build_extractor("tiny", weights=path, device="cpu")


def test_non_array_entry(tmp_path):
    path = tmp_path / "strings.pkl"
    path.write_bytes(pickle.dumps({"model": {"backbone.stem.conv1.weight": "oops"}}))

    with pytest.raises(WeightsError, match="not a numeric array"):
        build_extractor("tiny", weights=path, device="cpu")


def test_real_photo_through_loaded_pkl(butd_outputs):
    image_path = sample_data_dir() / "images" / "000000000139.jpg"
    image = np.asarray(Image.open(image_path).convert("RGB"))
    extractor = butd_outputs["pkl"]["extractor"]

    regions = extractor.extract([image])[0]

    assert regions["features"].shape[1] == 2048
    assert 1 <= regions["boxes"].shape[0] <= SMALL_BUTD["rpn_post_nms_topk"]
