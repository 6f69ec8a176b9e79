"""ResNet C4 backbone with frozen batch norm, in detectron2's MSRA/Caffe variant.

Shapes: N images, C channels, H x W the padded input size. ``ResNetC4`` maps images
(N, 3, H, W) to res4 features (N, 4 * res2_out_channels, ~H/16, ~W/16). ``build_res5``
builds the res5 stage that the RoI head runs on each pooled region.

Module names follow torchvision's ResNet (``conv1``/``bn1``, ``downsample.0``/``.1``);
``extractors.checkpoint`` maps detectron2 names onto them. ``fold_batchnorm`` merges every
frozen batch norm into the preceding convolution after the weights are loaded.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops.misc import FrozenBatchNorm2d

logger = logging.getLogger(__name__)


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1,
          padding: int = 0, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels, out_channels, kernel_size=kernel, stride=stride, padding=padding,
        dilation=dilation, bias=False,
    )


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, norm: nn.Module) -> nn.Identity:
    """Fold a frozen batch norm into ``conv`` in place and return its replacement.

    y = (conv(x) - mean) * weight / sqrt(var + eps) + bias, so the convolution weight is
    scaled per output channel and the shift becomes the convolution bias.
    """
    if not isinstance(norm, FrozenBatchNorm2d):
        raise TypeError(f"expected FrozenBatchNorm2d after {conv}, got {type(norm).__name__}")

    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale

    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(shift.clone(), requires_grad=False)
    return nn.Identity()


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3, 1x1) with frozen batch norm.

    With ``stride_in_1x1`` the stride sits in the first 1x1 convolution, as in the
    original MSRA/Caffe ResNet; otherwise in the 3x3 one. A projection shortcut exists
    whenever the channel count changes, as in detectron2.
    """

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, *,
                 stride: int, stride_in_1x1: bool, dilation: int, eps: float) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)

        self.conv1 = _conv(in_channels, bottleneck_channels, 1, stride=stride_1x1)
        self.bn1 = FrozenBatchNorm2d(bottleneck_channels, eps=eps)
        self.conv2 = _conv(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3,
                           padding=dilation, dilation=dilation)
        self.bn2 = FrozenBatchNorm2d(bottleneck_channels, eps=eps)
        self.conv3 = _conv(bottleneck_channels, out_channels, 1)
        self.bn3 = FrozenBatchNorm2d(out_channels, eps=eps)

        self.downsample: nn.Sequential | None = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(
                _conv(in_channels, out_channels, 1, stride=stride),
                FrozenBatchNorm2d(out_channels, eps=eps),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))

        shortcut = x if self.downsample is None else self.downsample(x)
        out += shortcut
        return F.relu(out, inplace=True)

    def fold_batchnorm(self) -> None:
        self.bn1 = _fold_pair(self.conv1, self.bn1)
        self.bn2 = _fold_pair(self.conv2, self.bn2)
        self.bn3 = _fold_pair(self.conv3, self.bn3)
        if self.downsample is not None:
            self.downsample[1] = _fold_pair(self.downsample[0], self.downsample[1])


class Stem(nn.Module):
    """7x7 stride-2 convolution, frozen batch norm, ReLU and a stride-2 3x3 max pool.

    ``caffe_maxpool`` uses Caffe's pooling (padding 0, ceil_mode=True) instead of
    detectron2's (padding 1, floor), which shifts the res2 grid by one pixel.
    """

    def __init__(self, out_channels: int, caffe_maxpool: bool, eps: float) -> None:
        super().__init__()
        self.conv1 = _conv(3, out_channels, 7, stride=2, padding=3)
        self.bn1 = FrozenBatchNorm2d(out_channels, eps=eps)
        self.caffe_maxpool = caffe_maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        if self.caffe_maxpool:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    def fold_batchnorm(self) -> None:
        self.bn1 = _fold_pair(self.conv1, self.bn1)


def make_stage(num_blocks: int, in_channels: int, bottleneck_channels: int, out_channels: int,
               *, first_stride: int, stride_in_1x1: bool, dilation: int,
               eps: float) -> nn.Sequential:
    """Build one ResNet stage; only its first block changes stride and channel count."""
    blocks = []
    for index in range(num_blocks):
        blocks.append(Bottleneck(
            in_channels if index == 0 else out_channels,
            bottleneck_channels,
            out_channels,
            stride=first_stride if index == 0 else 1,
            stride_in_1x1=stride_in_1x1,
            dilation=dilation,
            eps=eps,
        ))
    return nn.Sequential(*blocks)


class ResNetC4(nn.Module):
    """Stem, res2, res3 and res4 of a ResNet: images (N, 3, H, W) to stride-16 features."""

    stride = 16

    def __init__(self, config: dict) -> None:
        super().__init__()
        eps = config["batchnorm_eps"]
        bottleneck = config["res2_bottleneck_channels"]
        out = config["res2_out_channels"]
        blocks = config["stage_blocks"]
        common = {"stride_in_1x1": config["stride_in_1x1"], "dilation": 1, "eps": eps}

        self.stem = Stem(config["stem_out_channels"], config["caffe_maxpool"], eps)
        self.res2 = make_stage(blocks[0], config["stem_out_channels"], bottleneck, out,
                               first_stride=1, **common)
        self.res3 = make_stage(blocks[1], out, bottleneck * 2, out * 2, first_stride=2, **common)
        self.res4 = make_stage(blocks[2], out * 2, bottleneck * 4, out * 4, first_stride=2,
                               **common)
        self.out_channels = out * 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(images))))


def build_res5(config: dict) -> nn.Sequential:
    """Build the res5 stage of the C4 RoI head.

    With ``res5_halve`` false (bottom-up-attention) the first block keeps stride 1 and every
    3x3 convolution is dilated by ``res5_dilation``, so a 14x14 RoI stays 14x14. With
    ``res5_halve`` true it is upstream detectron2's stage: stride 2, no dilation.
    """
    halve = config["res5_halve"]
    out = config["res2_out_channels"]
    return make_stage(
        config["stage_blocks"][3],
        out * 4,
        config["res2_bottleneck_channels"] * 8,
        out * 8,
        first_stride=2 if halve else 1,
        stride_in_1x1=config["stride_in_1x1"],
        dilation=1 if halve else config["res5_dilation"],
        eps=config["batchnorm_eps"],
    )


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every frozen batch norm of ``module`` into its convolution, in place.

    Returns:
        The number of stems and blocks folded.
    """
    folded = 0
    for child in list(module.modules()):
        if isinstance(child, (Bottleneck, Stem)):
            child.fold_batchnorm()
            folded += 1
    logger.debug("folded frozen batch norm in %d stems and blocks", folded)
    return folded
