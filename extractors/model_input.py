"""Turn decoded RGB images into the resized, normalised, padded batch of the C4 detector.

Shapes: N images, H_i x W_i original sizes, h_i x w_i resized sizes, Hp x Wp the padded
batch size (the largest h_i and w_i, at least ``MIN_PADDED_SIDE``).

Resizing follows detectron2's ``ResizeShortestEdge`` at test time (shorter side to
``min_size_test`` unless the longer side would exceed ``max_size_test``; sides rounded
half up). Interpolation is bilinear without antialiasing, like the ``cv2.resize`` call of
the original Caffe bottom-up-attention; detectron2 resizes with PIL instead, which
differs slightly when shrinking. Padding is 0 after normalisation (the mean colour), as
in detectron2's ``ImageList``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

logger = logging.getLogger(__name__)

# Smallest padded side: below it the stride-2 stem and Caffe max pool leave no res4 cell.
MIN_PADDED_SIDE = 32


@dataclass
class ImageBatch:
    """A padded batch and the geometry needed to map boxes back to original pixels."""

    tensor: torch.Tensor                    # float (N, 3, Hp, Wp), normalised
    image_sizes: list[tuple[int, int]]      # resized (h_i, w_i) before padding
    original_sizes: list[tuple[int, int]]   # original (H_i, W_i)

    def scale(self, index: int) -> tuple[float, float]:
        """Return (scale_y, scale_x) from original to resized pixels of image ``index``."""
        height, width = self.image_sizes[index]
        original_height, original_width = self.original_sizes[index]
        return height / original_height, width / original_width


def validate_images(images: object) -> list[np.ndarray]:
    """Check that ``images`` is a non-empty list of RGB uint8 arrays (H, W, 3).

    Raises:
        ValueError: naming the index of the first bad image and what is wrong with it.
    """
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list of RGB uint8 arrays (H, W, 3)")

    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray):
            raise ValueError(f"images[{index}] must be a numpy array, got {type(image).__name__}")
        if image.dtype != np.uint8:
            raise ValueError(f"images[{index}] must have dtype uint8, got {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images[{index}] must have shape (H, W, 3), got {image.shape}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"images[{index}] is empty: shape {image.shape}")
    return list(images)


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Return the (h, w) that ``ResizeShortestEdge`` gives, each side at least 1 pixel."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    new_height = max(1, int(height * scale + 0.5))
    new_width = max(1, int(width * scale + 0.5))
    return new_height, new_width


def _normalise(image: np.ndarray, config: dict, device: torch.device) -> torch.Tensor:
    """Resize one RGB uint8 image (H, W, 3) and return it normalised as float (3, h, w)."""
    height, width = image.shape[:2]
    new_height, new_width = resized_size(height, width, config["min_size_test"],
                                         config["max_size_test"])

    # torch.from_numpy needs a writable array; decoded images are often read-only views.
    array = image if image.flags.writeable else image.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    tensor = tensor.permute(2, 0, 1).float()
    if config["input_format"] == "BGR":
        tensor = tensor.flip(0)

    if (new_height, new_width) != (height, width):
        tensor = F.interpolate(tensor[None], size=(new_height, new_width), mode="bilinear",
                               align_corners=False)[0]

    mean = torch.tensor(config["pixel_mean"], device=device).view(3, 1, 1)
    std = torch.tensor(config["pixel_std"], device=device).view(3, 1, 1)
    return (tensor - mean) / std


def build_batch(images: list[np.ndarray], config: dict, device: torch.device) -> ImageBatch:
    """Resize, normalise and zero-pad ``images`` into one batch on ``device``.

    Args:
        images: N RGB uint8 arrays (H_i, W_i, 3), already validated.
        config: a resolved C4 detector config.
        device: where the batch tensor lives.
    """
    tensors = [_normalise(image, config, device) for image in images]
    image_sizes = [(t.shape[1], t.shape[2]) for t in tensors]
    padded_height = max(MIN_PADDED_SIDE, max(size[0] for size in image_sizes))
    padded_width = max(MIN_PADDED_SIDE, max(size[1] for size in image_sizes))

    batch = tensors[0].new_zeros((len(tensors), 3, padded_height, padded_width))
    for index, tensor in enumerate(tensors):
        batch[index, :, : tensor.shape[1], : tensor.shape[2]] = tensor

    original_sizes = [(image.shape[0], image.shape[1]) for image in images]
    return ImageBatch(batch, image_sizes, original_sizes)
