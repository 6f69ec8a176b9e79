"""In-process region-feature extraction API: ``build_extractor`` and ``RegionExtractor``.

Shapes: N images per call, R_i regions of image i, B_i given boxes of image i, D feature
size, K object classes, A attributes. Boxes are x1, y1, x2, y2 in original-image pixels.

Example::

    extractor = build_extractor("butd-r101-c4", weights="faster_rcnn_from_caffe_attr.pkl")
    regions = extractor.extract([rgb_uint8_image])[0]
    regions["features"].shape  # (R_0, 2048)
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import numpy as np
import torch

from extractors.checkpoint import WeightsError, load_weights
from extractors.config import load_config
from extractors.detector import build_model
from extractors.model_input import validate_images
from extractors.detector_labels import label_names

logger = logging.getLogger(__name__)

__all__ = ["RegionExtractor", "WeightsError", "build_extractor", "resolve_device"]

BACKENDS = ("torchvision", "detectron2")

# Seed of the random initialisation for weights="untrained", so that every process
# (every Ray worker, say) builds the same untrained model.
UNTRAINED_SEED = 0

OUTPUT_DTYPES = {
    "boxes": np.float32,
    "features": np.float32,
    "object_ids": np.int32,
    "object_scores": np.float32,
    "attribute_ids": np.int32,
    "attribute_scores": np.float32,
    "class_boxes": np.float32,
}


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into an available ``torch.device``.

    Raises:
        ValueError: for an unknown device string or a CUDA device that is not available.
    """
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")

    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"invalid device {text!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {text!r} requested but CUDA is not available; use 'cpu' or 'auto'"
        )
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device {text!r} requested but only {torch.cuda.device_count()} CUDA devices exist"
        )
    return torch.device("cuda", index)


def _validate_boxes(boxes: object, count: int, device: torch.device) -> list[torch.Tensor]:
    """Check given boxes (one (B_i, 4) array per image) and move them to ``device``.

    Raises:
        ValueError: naming the image and box index of the first invalid box.
    """
    if not isinstance(boxes, (list, tuple)) or len(boxes) != count:
        raise ValueError(f"boxes must be None or a list of {count} arrays of shape (B_i, 4)")

    tensors = []
    for index, image_boxes in enumerate(boxes):
        array = np.asarray(image_boxes, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != 4:
            raise ValueError(f"boxes[{index}] must have shape (B, 4), got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"boxes[{index}] contains NaN or infinite values")
        inverted = np.nonzero((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1]))[0]
        if inverted.size:
            row = int(inverted[0])
            raise ValueError(
                f"boxes[{index}][{row}] = {array[row].tolist()} has x2 < x1 or y2 < y1; "
                "boxes are x1, y1, x2, y2"
            )
        tensors.append(torch.from_numpy(array).to(device))
    return tensors


class RegionExtractor:
    """A loaded detector that turns RGB images into region features and labels.

    Attributes:
        config: the full resolved detector config, a JSON-serialisable dict.
        device: the torch device the model runs on.
        weights_sha256: SHA-256 of the weights file, or "untrained".
        object_names: K object class names (background excluded).
        attribute_names: A attribute names ("no attribute" excluded); [] without a head.
    """

    def __init__(self, model: torch.nn.Module, config: dict[str, Any], device: torch.device,
                 weights_sha256: str, object_names: list[str],
                 attribute_names: list[str]) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.weights_sha256 = weights_sha256
        self.object_names = object_names
        self.attribute_names = attribute_names

    @property
    def feature_dim(self) -> int:
        """Size D of each region feature."""
        return int(self.model.feature_dim)

    def extract(self, images: list[np.ndarray],
                boxes: list[np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
        """Extract the regions of N images, run as one padded batch.

        Args:
            images: N RGB uint8 arrays (H_i, W_i, 3), upright.
            boxes: None to detect regions, or N float arrays (B_i, 4) of x1 y1 x2 y2 in
                original pixels to pool at instead. These boxes are stored unchanged and
                still get object and attribute predictions.

        Returns:
            N dicts of numpy arrays with R_i rows: boxes float32 (R_i, 4), features
            float32 (R_i, D), object_ids int32, object_scores float32, attribute_ids int32
            (-1 without an attribute head), attribute_scores float32, and class_boxes
            float32 (R_i, 4) when the config sets store_class_boxes.

        Raises:
            ValueError: for an invalid image or box, naming its index.
        """
        images = validate_images(images)
        given = None if boxes is None else _validate_boxes(boxes, len(images), self.device)

        with torch.inference_mode():
            results = self.model.extract_regions(images, given)

        return [
            {name: value.detach().cpu().numpy().astype(OUTPUT_DTYPES[name], copy=False)
             for name, value in result.items()}
            for result in results
        ]


def _names(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    if config["architecture"] == "torchvision_fpn":
        from extractors.frcnn_fpn import coco_category_names

        return coco_category_names(), []

    objects = label_names(config["object_vocab_path"], config["num_classes"],
                          "object_vocab_path", "object")
    attributes = label_names(config["attribute_vocab_path"], config["num_attributes"],
                             "attribute_vocab_path", "attribute")
    return objects, attributes


def _build_model(config: dict[str, Any], weights: str | os.PathLike,
                 strict: bool) -> tuple[torch.nn.Module, str]:
    if os.fspath(weights) == "untrained":
        logger.warning(
            "weights='untrained': detector %r has random weights (seed %d), so its features, "
            "labels and boxes carry no meaning; use it only for tests and demos",
            config["name"], UNTRAINED_SEED,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            return build_model(config), "untrained"

    model = build_model(config)
    return model, load_weights(model, weights, config, strict=strict)


def build_extractor(
    detector: str | os.PathLike = "butd-r101-c4",
    overrides: Mapping[str, Any] | str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    backend: str = "torchvision",
    strict: bool = True,
) -> RegionExtractor:
    """Build a region extractor from a preset, overrides and a weights file.

    Args:
        detector: a preset name (``extractors/presets/<name>.yaml``) or a YAML path.
        overrides: a dict or YAML path of fields replacing the preset's.
        weights: "untrained" (random weights, logged as a warning) or a .pth/.pkl path.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        backend: "torchvision" (this package's models) or "detectron2" (needs detectron2).
        strict: raise on missing or unexpected checkpoint keys (else only log them).

    Raises:
        WeightsError: weights not given, file missing or rejected, keys that do not fit.
        ValueError: invalid preset, override field, vocabulary file, device or backend.
        ImportError: backend="detectron2" without an importable detectron2.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {list(BACKENDS)}")
    if weights is None:
        raise WeightsError(
            "no weights given: pass weights='untrained' explicitly for a randomly "
            "initialised detector (tests and demos only), or the path of a .pth/.pkl file"
        )

    config = load_config(detector, overrides)
    resolved_device = resolve_device(device)
    object_names, attribute_names = _names(config)

    if backend == "detectron2":
        from extractors.backends.detectron2_backend import build_detectron2_extractor

        return build_detectron2_extractor(config, weights, resolved_device, object_names,
                                          attribute_names)

    model, digest = _build_model(config, weights, strict)
    model.prepare_for_inference()
    model.to(resolved_device)
    logger.info("built %s detector on %s (feature size %d, weights %s)", config["name"],
                resolved_device, model.feature_dim, digest)
    return RegionExtractor(model, config, resolved_device, digest, object_names, attribute_names)
