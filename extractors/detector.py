"""Model assembly: the C4 region detector and the architecture dispatch.

Shapes: N images, P_i proposals (or given boxes) of image i, R_i stored regions,
D feature size, K object classes, A attributes.

``C4Detector.extract_regions`` runs backbone, RPN, RoI head and bottom-up-attention
region selection on a padded batch and returns, per image, tensors in original-image
pixels. When no proposal of an image survives the RPN filters (clipping, then
``rpn_min_box_size``), the whole image becomes its only proposal. The image then still
gets a region unless ``min_boxes`` is 0 and that region scores below ``conf_thresh``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from extractors.backbone import ResNetC4, fold_batchnorm
from extractors.model_input import ImageBatch, build_batch
from extractors.regions import select_butd_regions
from extractors.roi_heads import Res5RoIHead, RoIOutputs
from extractors.rpn import RegionProposalNetwork, apply_deltas, clip_boxes

logger = logging.getLogger(__name__)


def boxes_to_original(boxes: torch.Tensor, batch: ImageBatch, index: int) -> torch.Tensor:
    """Map boxes (B, 4) from resized to original pixels of image ``index`` and clip them."""
    scale_y, scale_x = batch.scale(index)
    factors = boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
    height, width = batch.original_sizes[index]
    return clip_boxes(boxes / factors, height, width)


def boxes_to_resized(boxes: torch.Tensor, batch: ImageBatch, index: int) -> torch.Tensor:
    """Map boxes (B, 4) from original to resized pixels of image ``index`` and clip them."""
    scale_y, scale_x = batch.scale(index)
    factors = boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
    height, width = batch.image_sizes[index]
    return clip_boxes(boxes * factors, height, width)


class C4Detector(nn.Module):
    """ResNet C4 Faster R-CNN with an optional attribute head (bottom-up-attention layout)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNetC4(config)
        self.rpn = RegionProposalNetwork(config, self.backbone.out_channels, ResNetC4.stride)
        self.roi_heads = Res5RoIHead(config, self.backbone.out_channels, ResNetC4.stride)
        self.feature_dim = self.roi_heads.out_channels

    def prepare_for_inference(self) -> None:
        """Switch to eval mode and apply the configured speed-ups (BN folding, channels_last)."""
        self.eval()
        self.requires_grad_(False)
        if self.config["fold_batchnorm"]:
            fold_batchnorm(self)
        if self.config["channels_last"]:
            self.to(memory_format=torch.channels_last)

    def _proposals(self, features: torch.Tensor, batch: ImageBatch) -> list[torch.Tensor]:
        proposals = []
        for index, (boxes, _) in enumerate(self.rpn(features, batch.image_sizes)):
            if boxes.shape[0] == 0:
                height, width = batch.image_sizes[index]
                logger.debug("image %d (%dx%d resized) has no proposal; using the whole image",
                             index, width, height)
                boxes = boxes.new_tensor([[0.0, 0.0, float(width), float(height)]])
            proposals.append(boxes)
        return proposals

    def _image_regions(self, outputs: RoIOutputs, proposals: torch.Tensor, batch: ImageBatch,
                       index: int, given: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Select regions of one image and gather their outputs in original pixels."""
        class_probs = outputs.class_logits.softmax(dim=1)
        proposals_original = boxes_to_original(proposals, batch, index)
        if given is None:
            keep = select_butd_regions(proposals_original, class_probs, self.config)
        else:
            keep = torch.arange(proposals.shape[0], device=proposals.device)

        object_scores, object_ids = class_probs[keep, :-1].max(dim=1)
        regions = {
            "boxes": proposals_original[keep] if given is None else given,
            "features": outputs.features[keep],
            "object_ids": object_ids,
            "object_scores": object_scores,
        }

        if outputs.attribute_logits is not None:
            attribute_probs = outputs.attribute_logits[keep].softmax(dim=1)[:, :-1]
            regions["attribute_scores"], regions["attribute_ids"] = attribute_probs.max(dim=1)
        else:
            regions["attribute_ids"] = torch.full_like(object_ids, -1)
            regions["attribute_scores"] = torch.zeros_like(object_scores)

        if self.config["store_class_boxes"]:
            deltas = outputs.box_deltas[keep].view(keep.shape[0], self.config["num_classes"], 4)
            deltas = deltas[torch.arange(keep.shape[0], device=keep.device), object_ids]
            decoded = apply_deltas(deltas, proposals[keep], self.config["roi_bbox_reg_weights"])
            height, width = batch.image_sizes[index]
            regions["class_boxes"] = boxes_to_original(clip_boxes(decoded, height, width),
                                                       batch, index)
        return regions

    def extract_regions(self, images: list[np.ndarray],
                        boxes: list[torch.Tensor] | None = None) -> list[dict[str, torch.Tensor]]:
        """Detect (or pool at given boxes) and describe the regions of a batch of images.

        Args:
            images: N validated RGB uint8 arrays (H_i, W_i, 3).
            boxes: None, or N float32 tensors (B_i, 4) in original pixels, on the model's
                device, to pool at instead of running the RPN and region selection.

        Returns:
            N dicts of tensors on the model's device: boxes (R_i, 4) in original pixels,
            features (R_i, D), object_ids/object_scores (R_i,), attribute_ids/
            attribute_scores (R_i,), and class_boxes (R_i, 4) when store_class_boxes is set.
        """
        device = next(self.parameters()).device
        batch = build_batch(images, self.config, device)
        tensor = batch.tensor
        if self.config["channels_last"]:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        features = self.backbone(tensor)

        if boxes is None:
            proposals = self._proposals(features, batch)
        else:
            proposals = [boxes_to_resized(b, batch, i) for i, b in enumerate(boxes)]

        counts = [p.shape[0] for p in proposals]
        batch_index = torch.repeat_interleave(
            torch.arange(len(proposals), device=device, dtype=torch.float32),
            torch.tensor(counts, device=device),
        )
        rois = torch.cat([batch_index[:, None], torch.cat(proposals, dim=0)], dim=1)
        outputs = self.roi_heads(features, rois)

        results = []
        start = 0
        for index, count in enumerate(counts):
            rows = slice(start, start + count)
            start += count
            image_outputs = RoIOutputs(
                outputs.features[rows],
                outputs.class_logits[rows],
                outputs.box_deltas[rows],
                None if outputs.attribute_logits is None else outputs.attribute_logits[rows],
            )
            given = None if boxes is None else boxes[index]
            results.append(self._image_regions(image_outputs, proposals[index], batch, index,
                                               given))
        return results


def build_model(config: dict) -> nn.Module:
    """Build the untrained detector for a resolved config (weights are loaded separately).

    Raises:
        ValueError: for an unknown ``architecture``.
    """
    if config["architecture"] == "c4":
        return C4Detector(config)
    if config["architecture"] == "torchvision_fpn":
        from extractors.frcnn_fpn import TorchvisionFPNDetector

        return TorchvisionFPNDetector(config)
    raise ValueError(
        f"unknown architecture {config['architecture']!r}; use 'c4' or 'torchvision_fpn'"
    )
