"""Tests of the C4 model against detectron2's own GeneralizedRCNN (skipped without detectron2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

pytest.importorskip("detectron2")

from extractors.checkpoint import WeightsError, native_to_detectron2  # noqa: E402
from extractors.config import load_config  # noqa: E402
from extractors.detector import build_model  # noqa: E402
from extractors.extractor import build_extractor  # noqa: E402

# ResNet-50 depth keeps the runs short; detectron2 builds ResNet-50/101/152 the same way.
SMALL = {"min_size_test": 128, "max_size_test": 192, "rpn_post_nms_topk": 6,
         "rpn_pre_nms_topk": 200, "stage_blocks": [3, 4, 6, 3]}
VARIANTS = {
    "upstream_c4": {"res5_halve": True, "caffe_maxpool": False},
    "bottom_up_attention": {},
}


def synthetic_image(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = rng.integers(0, 255, size=3, dtype=np.uint8)
    image[height // 4: height // 2, width // 3: width // 2] = (250, 30, 30)
    return image + rng.integers(0, 20, size=image.shape, dtype=np.uint8)


def save_random_detectron2_weights(path, overrides: dict) -> None:
    """Save a random model with non-trivial batch-norm statistics under detectron2 names."""
    generator = torch.Generator().manual_seed(7)
    model = build_model(load_config("butd-r101-c4", overrides))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                size = module.weight.shape
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
    state = {native_to_detectron2(name): value for name, value in model.state_dict().items()}
    torch.save({"model": state}, path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_native_matches_detectron2(tmp_path, variant):
    overrides = {**SMALL, **VARIANTS[variant]}
    path = tmp_path / "weights.pth"
    save_random_detectron2_weights(path, overrides)
    image = synthetic_image(0, 150, 200)
    boxes = [np.array([[10, 10, 120, 100], [0, 0, 200, 150]], dtype=np.float32)]

    outputs = {}
    for backend in ("torchvision", "detectron2"):
        extractor = build_extractor("butd-r101-c4", overrides=overrides, weights=path,
                                    device="cpu", backend=backend)
        outputs[backend] = (extractor.extract([image])[0],
                            extractor.extract([image], boxes=boxes)[0])

    for mode in (0, 1):
        native, reference = outputs["torchvision"][mode], outputs["detectron2"][mode]
        assert sorted(native) == sorted(reference)
        for name in reference:
            # Boxes are in pixels; scores and features are compared more tightly.
            atol = 2e-3 if name == "boxes" else 1e-5
            np.testing.assert_allclose(native[name], reference[name], rtol=1e-4, atol=atol,
                                       err_msg=f"{variant} mode {mode} {name}")


def test_detectron2_backend_rejects_misfit(tmp_path):
    path = tmp_path / "weights.pth"
    save_random_detectron2_weights(path, SMALL)

    with pytest.raises(WeightsError, match="missing keys"):
        build_extractor("butd-r101-c4", overrides={**SMALL, "stage_blocks": [3, 4, 23, 3]},
                        weights=path, device="cpu", backend="detectron2")


def test_detectron2_backend_rejects_tiny():
    with pytest.raises(ValueError, match="stage_blocks"):
        build_extractor("tiny", weights="untrained", device="cpu", backend="detectron2")
