"""torchvision's COCO Faster R-CNN (ResNet-50 FPN) as a region-feature detector.

Shapes: N images, P_i proposals of image i, R_i stored regions, K = 90 COCO classes
(torchvision's 91 outputs less background, "N/A" placeholders included), D = 1024.

The model is built like ``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)``
but with frozen batch norm, so a state dict saved from the pretrained model loads as is.
Nothing is downloaded. Detection follows torchvision's post-processing with
count clamping (``extractors.regions.select_detections``); the region feature is the
box head's 1024-d output pooled at each final detection box.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, FasterRCNN_ResNet50_FPN_Weights
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from extractors.regions import select_detections
from extractors.rpn import clip_boxes

logger = logging.getLogger(__name__)


def coco_category_names() -> list[str]:
    """Return torchvision's 90 COCO category names (background dropped, "N/A" kept)."""
    return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])


def _ratios(resized: tuple[int, int], original: tuple[int, int],
            device: torch.device) -> torch.Tensor:
    """Return per-coordinate factors (4,) from original to resized pixels.

    Each axis has its own ratio, as in torchvision's ``resize_boxes``.
    """
    ratio_y = resized[0] / original[0]
    ratio_x = resized[1] / original[1]
    return torch.tensor([ratio_x, ratio_y, ratio_x, ratio_y], device=device)


class TorchvisionFPNDetector(nn.Module):
    """Wrapper around torchvision's ``FasterRCNN`` that returns region features."""

    feature_dim = 1024

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = config
        norm_layer = partial(FrozenBatchNorm2d, eps=config["batchnorm_eps"])
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                       norm_layer=norm_layer, trainable_layers=3)
        scale = 255.0
        self.model = FasterRCNN(
            backbone,
            num_classes=config["num_classes"] + 1,
            min_size=config["min_size_test"],
            max_size=config["max_size_test"],
            image_mean=[value / scale for value in config["pixel_mean"]],
            image_std=[value / scale for value in config["pixel_std"]],
            rpn_pre_nms_top_n_test=config["rpn_pre_nms_topk"],
            rpn_post_nms_top_n_test=config["rpn_post_nms_topk"],
            rpn_nms_thresh=config["rpn_nms_thresh"],
        )

    def state_dict_target(self) -> nn.Module:
        """Return the module whose parameter names checkpoints use (torchvision's names)."""
        return self.model

    def prepare_for_inference(self) -> None:
        self.eval()
        self.requires_grad_(False)
        if self.config["channels_last"]:
            self.to(memory_format=torch.channels_last)

    def _image_tensors(self, images: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
        tensors = []
        for image in images:
            array = image if image.flags.writeable else image.copy()
            tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
            tensor = tensor.permute(2, 0, 1).float() / 255.0
            if self.config["input_format"] == "BGR":
                tensor = tensor.flip(0)
            tensors.append(tensor)
        return tensors

    def _heads(self, features: dict, boxes: list[torch.Tensor], image_sizes: list[tuple[int, int]],
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pool at boxes and run the box head: features (R, 1024), logits, box regression."""
        roi_heads = self.model.roi_heads
        pooled = roi_heads.box_roi_pool(features, boxes, image_sizes)
        region = roi_heads.box_head(pooled)
        class_logits, box_regression = roi_heads.box_predictor(region)
        return region, class_logits, box_regression

    def _decode(self, box_regression: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Decode class-specific deltas (R, 4 (K + 1)) into boxes (R, K + 1, 4), R may be 0."""
        decoded = self.model.roi_heads.box_coder.decode(box_regression, boxes)
        return decoded.reshape(box_regression.shape[0], self.config["num_classes"] + 1, 4)

    def _detect(self, features: dict, image_list) -> list[tuple[torch.Tensor, ...]]:
        """Run RPN and box head, then select the final detections of each image.

        Returns:
            Per image: boxes float (R_i, 4) in resized pixels, class indices int64 (R_i,)
            into the 90 COCO names, scores float (R_i,). An image without proposals gets
            the whole-image box and None for classes and scores; the caller classifies it.
        """
        proposals, _ = self.model.rpn(image_list, features)
        _, class_logits, box_regression = self._heads(features, proposals, image_list.image_sizes)
        class_boxes = self._decode(box_regression, proposals)
        class_probs = class_logits.softmax(dim=1)

        detections = []
        start = 0
        for index, image_proposals in enumerate(proposals):
            rows = slice(start, start + image_proposals.shape[0])
            start += image_proposals.shape[0]
            height, width = image_list.image_sizes[index]
            if image_proposals.shape[0] == 0:
                logger.debug("image %d has no proposal; using the whole image", index)
                whole = class_boxes.new_tensor([[0.0, 0.0, float(width), float(height)]])
                detections.append((whole, None, None))
                continue
            boxes = clip_boxes(class_boxes[rows, 1:], height, width)
            probs = class_probs[rows, 1:]
            regions, classes = select_detections(boxes, probs, self.config)
            detections.append((boxes[regions, classes], classes, probs[regions, classes]))
        return detections

    def _given_regions(self, boxes: torch.Tensor, features: torch.Tensor, class_probs: torch.Tensor,
                       class_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Describe regions at given boxes: predicted class, score and class-regressed box."""
        object_scores, object_ids = class_probs[:, 1:].max(dim=1)
        arange = torch.arange(object_ids.shape[0], device=object_ids.device)
        return {
            "boxes": boxes,
            "features": features,
            "object_ids": object_ids,
            "object_scores": object_scores,
            "class_boxes": class_boxes[arange, object_ids + 1],
        }

    def extract_regions(self, images: list[np.ndarray],
                        boxes: list[torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
        """Detect (or pool at given boxes) and describe the regions of a batch of images.

        Args:
            images: N validated RGB uint8 arrays (H_i, W_i, 3).
            boxes: None, or N float32 tensors (B_i, 4) in original pixels on the model's device.

        Returns:
            N dicts of tensors, as ``C4Detector.extract_regions``. In detection mode the
            stored boxes are the class-regressed detections, so class_boxes equals boxes.
            There is no attribute head, so attribute_ids are -1 and attribute_scores 0.
        """
        device = next(self.parameters()).device
        image_list, _ = self.model.transform(self._image_tensors(images, device))
        tensor = image_list.tensors
        if self.config["channels_last"]:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        features = self.model.backbone(tensor)

        originals = [(image.shape[0], image.shape[1]) for image in images]
        factors = [_ratios(size, original, device)
                   for size, original in zip(image_list.image_sizes, originals)]
        if boxes is None:
            detections = self._detect(features, image_list)
            resized_boxes = [detection[0] for detection in detections]
        else:
            resized_boxes = [
                clip_boxes(b * f, size[0], size[1])
                for b, f, size in zip(boxes, factors, image_list.image_sizes)
            ]

        region, class_logits, box_regression = self._heads(features, resized_boxes,
                                                           image_list.image_sizes)
        class_boxes = self._decode(box_regression, resized_boxes)
        class_probs = class_logits.softmax(dim=1)

        results = []
        start = 0
        for index, image_boxes in enumerate(resized_boxes):
            rows = slice(start, start + image_boxes.shape[0])
            start += image_boxes.shape[0]
            heads = (region[rows], class_probs[rows], class_boxes[rows])
            detection = detections[index] if boxes is None else None
            given = boxes[index] if boxes is not None else None
            results.append(self._image_regions(image_boxes, heads, factors[index],
                                               originals[index], detection, given))
        return results

    def _image_regions(self, image_boxes: torch.Tensor, heads: tuple[torch.Tensor, ...],
                       factor: torch.Tensor, original: tuple[int, int],
                       detection: tuple | None, given: torch.Tensor | None) -> dict:
        """Assemble one image's regions in original pixels.

        Args:
            image_boxes: float (R_i, 4) pooled boxes in resized pixels.
            heads: features (R_i, 1024), class probabilities (R_i, K + 1) and class
                boxes (R_i, K + 1, 4) at ``image_boxes``.
            factor: float (4,) original-to-resized ratios.
            original: (H_i, W_i).
            detection: the image's entry of ``_detect``, or None with given boxes.
            given: the given boxes (R_i, 4) in original pixels, or None.
        """
        features, class_probs, class_boxes = heads
        height, width = original
        if detection is not None and detection[1] is not None:
            _, classes, scores = detection
            original_boxes = clip_boxes(image_boxes / factor, height, width)
            regions = {
                "boxes": original_boxes,
                "features": features,
                "object_ids": classes,
                "object_scores": scores,
                "class_boxes": original_boxes,
            }
        else:
            if given is None:
                given = clip_boxes(image_boxes / factor, height, width)
            regions = self._given_regions(given, features, class_probs, class_boxes)
            regions["class_boxes"] = clip_boxes(regions["class_boxes"] / factor, height, width)

        regions["attribute_ids"] = torch.full_like(regions["object_ids"], -1)
        regions["attribute_scores"] = torch.zeros_like(regions["object_scores"])
        if not self.config["store_class_boxes"]:
            del regions["class_boxes"]
        return regions
