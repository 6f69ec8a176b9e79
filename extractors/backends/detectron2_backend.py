"""detectron2 backend: the C4 presets run by detectron2's own ``GeneralizedRCNN``.

Shapes: N images, P_i proposals (or given boxes) of image i, R_i stored regions,
D = 8 * res2_out_channels, K object classes, A attributes.

The model comes from detectron2's config system (``Res5ROIHeads``). It gets the three
changes that py-bottom-up-attention made for the Visual Genome weights:

* the Caffe max pool in the stem (padding 0, ceil_mode);
* the non-halving res5 (first block stride 1, 3x3 convolutions dilated);
* the attribute head, as extra modules of ``box_predictor`` named as in its checkpoints
  (``cls_embedding``, ``fc_attr``, ``attr_score``).
 Region selection and the
output format are shared with the native backend, so both return the same dicts.

detectron2's ResNet builds only depths 50, 101 and 152 with a 3-block res5, so ``tiny``
does not run here. Images are resized as float32, which detectron2 does with
``F.interpolate`` (bilinear), the same as the native backend.
"""

from __future__ import annotations

import logging
import os
import types

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from extractors.checkpoint import DETECTRON2_EXTRAS, WeightsError, read_state_dict, sha256_file
from extractors.regions import select_butd_regions
from extractors.rpn import apply_deltas, clip_boxes

try:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.data import transforms as T
    from detectron2.modeling import build_model as build_detectron2_model
    from detectron2.structures import Boxes
except ImportError as error:  # pragma: no cover - exercised only without detectron2
    DETECTRON2_IMPORT_ERROR: ImportError | None = error
else:
    DETECTRON2_IMPORT_ERROR = None

logger = logging.getLogger(__name__)

DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


def _require_detectron2() -> None:
    if DETECTRON2_IMPORT_ERROR is not None:
        raise ImportError(
            "backend='detectron2' needs the detectron2 package, which failed to import "
            f"({DETECTRON2_IMPORT_ERROR}); install detectron2 from source or use "
            "backend='torchvision'"
        )


def detectron2_config(config: dict):
    """Translate a resolved C4 preset into a detectron2 ``CfgNode``.

    Raises:
        ValueError: for presets detectron2 cannot express (architecture, depth, res5 size).
    """
    if config["architecture"] != "c4":
        raise ValueError(
            f"backend='detectron2' supports architecture 'c4' only, got {config['architecture']!r}"
        )
    depth = DEPTHS.get(tuple(config["stage_blocks"]))
    if depth is None or config["stage_blocks"][3] != 3:
        raise ValueError(
            f"backend='detectron2' needs stage_blocks of ResNet-50/101/152 ({list(DEPTHS)}), "
            f"got {config['stage_blocks']}"
        )

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.PIXEL_MEAN = list(config["pixel_mean"])
    cfg.MODEL.PIXEL_STD = list(config["pixel_std"])
    cfg.INPUT.FORMAT = config["input_format"]

    resnets = cfg.MODEL.RESNETS
    resnets.DEPTH = depth
    resnets.NORM = "FrozenBN"
    resnets.OUT_FEATURES = ["res4"]
    resnets.STEM_OUT_CHANNELS = config["stem_out_channels"]
    resnets.RES2_OUT_CHANNELS = config["res2_out_channels"]
    resnets.NUM_GROUPS = 1
    resnets.WIDTH_PER_GROUP = config["res2_bottleneck_channels"]
    resnets.STRIDE_IN_1X1 = config["stride_in_1x1"]

    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [list(config["anchor_sizes"])]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [list(config["anchor_aspect_ratios"])]
    cfg.MODEL.ANCHOR_GENERATOR.OFFSET = config["anchor_offset"]
    cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE = config["rpn_min_box_size"]
    rpn = cfg.MODEL.RPN
    rpn.IN_FEATURES = ["res4"]
    rpn.CONV_DIMS = [config["rpn_hidden_channels"]]
    rpn.BBOX_REG_WEIGHTS = tuple(config["rpn_bbox_reg_weights"])
    rpn.PRE_NMS_TOPK_TEST = config["rpn_pre_nms_topk"]
    rpn.POST_NMS_TOPK_TEST = config["rpn_post_nms_topk"]
    rpn.NMS_THRESH = config["rpn_nms_thresh"]

    cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = config["num_classes"]
    box_head = cfg.MODEL.ROI_BOX_HEAD
    box_head.POOLER_TYPE = config["pooler_type"]
    box_head.POOLER_RESOLUTION = config["pooler_resolution"]
    box_head.POOLER_SAMPLING_RATIO = config["pooler_sampling_ratio"]
    box_head.BBOX_REG_WEIGHTS = tuple(config["roi_bbox_reg_weights"])
    return cfg


def _caffe_stem_forward(stem: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = F.relu_(stem.conv1(x))
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


def _patch_model(model: nn.Module, config: dict) -> None:
    """Apply the bottom-up-attention changes to a freshly built detectron2 model."""
    if config["caffe_maxpool"]:
        model.backbone.stem.forward = types.MethodType(_caffe_stem_forward, model.backbone.stem)

    if not config["res5_halve"]:
        dilation = config["res5_dilation"]
        first = model.roi_heads.res5[0]
        first.conv1.stride = (1, 1)
        first.conv2.stride = (1, 1)
        first.shortcut.stride = (1, 1)
        for block in model.roi_heads.res5:
            block.conv2.padding = (dilation, dilation)
            block.conv2.dilation = (dilation, dilation)

    if config["num_attributes"] > 0:
        predictor = model.roi_heads.box_predictor
        in_features = predictor.cls_score.in_features
        predictor.cls_embedding = nn.Embedding(config["num_classes"] + 1,
                                               config["attribute_embedding_dim"])
        predictor.fc_attr = nn.Linear(in_features + config["attribute_embedding_dim"],
                                      config["attribute_hidden_dim"])
        predictor.attr_score = nn.Linear(config["attribute_hidden_dim"],
                                         config["num_attributes"] + 1)


class Detectron2Detector(nn.Module):
    """detectron2 ``GeneralizedRCNN`` wrapped to return region dicts like ``C4Detector``."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = config
        self.model = build_detectron2_model(detectron2_config(config))
        _patch_model(self.model, config)
        self.feature_dim = config["res2_out_channels"] * 8
        self.resize = T.ResizeShortestEdge(
            [config["min_size_test"], config["min_size_test"]], config["max_size_test"]
        )

    def _inputs(self, images: list[np.ndarray]) -> tuple[list[dict], list[tuple[float, float]]]:
        inputs, scales = [], []
        for image in images:
            pixels = image[:, :, ::-1] if self.config["input_format"] == "BGR" else image
            pixels = np.ascontiguousarray(pixels, dtype=np.float32)
            resized = self.resize.get_transform(pixels).apply_image(pixels)
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
            inputs.append({"image": tensor, "height": image.shape[0], "width": image.shape[1]})
            scales.append((resized.shape[0] / image.shape[0], resized.shape[1] / image.shape[1]))
        return inputs, scales

    def _attributes(self, features: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
        predictor = self.model.roi_heads.box_predictor
        embedded = predictor.cls_embedding(class_logits.argmax(dim=1))
        hidden = F.relu(predictor.fc_attr(torch.cat([features, embedded], dim=1)))
        return predictor.attr_score(hidden)

    def extract_regions(self, images: list[np.ndarray],
                        boxes: list[torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
        """Detect (or pool at given boxes) as ``C4Detector.extract_regions`` does."""
        device = next(self.parameters()).device
        inputs, scales = self._inputs(images)
        image_list = self.model.preprocess_image(inputs)
        features = self.model.backbone(image_list.tensor)

        if boxes is None:
            proposals, _ = self.model.proposal_generator(image_list, features, None)
            resized = [p.proposal_boxes.tensor for p in proposals]
        else:
            resized = []
            for index, given in enumerate(boxes):
                scale_y, scale_x = scales[index]
                factors = given.new_tensor([scale_x, scale_y, scale_x, scale_y])
                height, width = image_list.image_sizes[index]
                resized.append(clip_boxes(given.to(device) * factors, height, width))

        for index, image_boxes in enumerate(resized):
            if image_boxes.shape[0] == 0 and boxes is None:
                height, width = image_list.image_sizes[index]
                resized[index] = image_boxes.new_tensor([[0.0, 0.0, float(width), float(height)]])

        in_features = [features[name] for name in self.model.roi_heads.in_features]
        box_lists = [Boxes(image_boxes) for image_boxes in resized]
        pooled = self.model.roi_heads._shared_roi_transform(in_features, box_lists)
        region = pooled.mean(dim=(2, 3))
        class_logits, box_deltas = self.model.roi_heads.box_predictor(region)
        attribute_logits = None
        if self.config["num_attributes"] > 0:
            attribute_logits = self._attributes(region, class_logits)

        results, start = [], 0
        for index, image_boxes in enumerate(resized):
            rows = slice(start, start + image_boxes.shape[0])
            start += image_boxes.shape[0]
            results.append(self._image_regions(
                image_boxes, region[rows], class_logits[rows], box_deltas[rows],
                None if attribute_logits is None else attribute_logits[rows],
                scales[index], images[index].shape[:2], image_list.image_sizes[index],
                None if boxes is None else boxes[index],
            ))
        return results

    def _image_regions(self, proposals, region, class_logits, box_deltas, attribute_logits,
                       scale, original_size, resized_size, given) -> dict:
        """Select and describe the regions of one image, as ``C4Detector._image_regions``."""
        scale_y, scale_x = scale
        factors = proposals.new_tensor([scale_x, scale_y, scale_x, scale_y])
        original = clip_boxes(proposals / factors, original_size[0], original_size[1])
        class_probs = class_logits.softmax(dim=1)
        if given is None:
            keep = select_butd_regions(original, class_probs, self.config)
        else:
            keep = torch.arange(proposals.shape[0], device=proposals.device)

        object_scores, object_ids = class_probs[keep, :-1].max(dim=1)
        regions = {
            "boxes": original[keep] if given is None else given,
            "features": region[keep],
            "object_ids": object_ids,
            "object_scores": object_scores,
            "attribute_ids": torch.full_like(object_ids, -1),
            "attribute_scores": torch.zeros_like(object_scores),
        }
        if attribute_logits is not None:
            probs = attribute_logits[keep].softmax(dim=1)[:, :-1]
            regions["attribute_scores"], regions["attribute_ids"] = probs.max(dim=1)
        if self.config["store_class_boxes"]:
            deltas = box_deltas[keep].view(keep.shape[0], self.config["num_classes"], 4)
            deltas = deltas[torch.arange(keep.shape[0], device=keep.device), object_ids]
            decoded = apply_deltas(deltas, proposals[keep], self.config["roi_bbox_reg_weights"])
            decoded = clip_boxes(decoded, resized_size[0], resized_size[1])
            regions["class_boxes"] = clip_boxes(decoded / factors, original_size[0],
                                                original_size[1])
        return regions


def build_detectron2_extractor(config: dict, weights: str | os.PathLike, device: torch.device,
                               object_names: list[str], attribute_names: list[str]):
    """Build a ``RegionExtractor`` whose model is detectron2's ``GeneralizedRCNN``.

    Raises:
        ImportError: detectron2 cannot be imported.
        ValueError: the preset has no detectron2 equivalent.
        WeightsError: the weights file is missing, rejected or does not fit.
    """
    _require_detectron2()
    from extractors.extractor import UNTRAINED_SEED, RegionExtractor

    if os.fspath(weights) == "untrained":
        logger.warning("weights='untrained': detectron2 detector %r has random weights (seed "
                       "%d); its features carry no meaning", config["name"], UNTRAINED_SEED)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            detector = Detectron2Detector(config)
        digest = "untrained"
    else:
        # The restricted reader checks the file first, because detectron2's checkpointer
        # unpickles .pkl files without restrictions.
        state = read_state_dict(weights)
        detector = Detectron2Detector(config)
        _check_keys(list(state), detector.model, weights)
        DetectionCheckpointer(detector.model).load(os.fspath(weights))
        digest = sha256_file(weights)

    detector.eval()
    detector.requires_grad_(False)
    detector.to(device)
    return RegionExtractor(detector, config, device, digest, object_names, attribute_names)


def _check_keys(names: list[str], model: nn.Module, weights: str | os.PathLike) -> None:
    """Raise WeightsError unless the file's names fit the detectron2 model.

    Old detectron2 buffers (pixel statistics, cell anchors) may be present, and batch-norm
    running statistics may be absent: detectron2's FrozenBatchNorm2d fills them with 0 / 1.
    """
    expected = set(model.state_dict())
    present = set(names)
    missing = sorted(
        name for name in expected - present
        if not (name.endswith(("running_mean", "running_var"))
                and name.rsplit(".", 1)[0] + ".weight" in present)
    )
    unexpected = sorted(name for name in present - expected
                        if not DETECTRON2_EXTRAS.fullmatch(name)
                        and not name.endswith("num_batches_tracked"))
    if missing or unexpected:
        raise WeightsError(
            f"weights {weights} do not fit the detectron2 model: {len(missing)} missing keys "
            f"{missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
        )
