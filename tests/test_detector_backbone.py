"""Tests of the C4 building blocks: backbone, batch-norm folding, anchors, RPN and RoI head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from extractors.backbone import ResNetC4, build_res5, fold_batchnorm
from extractors.config import load_config
from extractors.detector import build_model
from extractors.model_input import build_batch, resized_size
from extractors.roi_heads import Res5RoIHead
from extractors.rpn import RegionProposalNetwork, apply_deltas, cell_anchors, grid_anchors


def _randomise_norms(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for child in module.modules():
            if isinstance(child, FrozenBatchNorm2d):
                size = child.weight.shape
                child.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                child.bias.copy_(torch.randn(size, generator=generator) * 0.2)
                child.running_mean.copy_(torch.randn(size, generator=generator) * 0.2)
                child.running_var.copy_(torch.rand(size, generator=generator) + 0.5)


def test_fold_batchnorm_keeps_outputs():
    torch.manual_seed(0)
    backbone = ResNetC4(load_config("tiny")).eval()
    _randomise_norms(backbone, 1)
    images = torch.randn(2, 3, 96, 128)

    with torch.no_grad():
        before = backbone(images)
        folded = fold_batchnorm(backbone)
        after = backbone(images)

    assert folded == 1 + 3  # stem + one block in each of res2, res3, res4
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("halve, side", [(False, 14), (True, 7)])
def test_res5_output_size(halve, side):
    config = load_config("tiny", {"res5_halve": halve})
    res5 = build_res5(config).eval()

    with torch.no_grad():
        out = res5(torch.randn(2, config["res2_out_channels"] * 4, 14, 14))

    assert out.shape == (2, config["res2_out_channels"] * 8, side, side)


def test_res5_dilated_convolutions():
    res5 = build_res5(load_config("butd-r101-c4"))

    assert res5[0].conv1.stride == (1, 1)
    assert res5[0].downsample[0].stride == (1, 1)
    assert all(block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2) for block in res5)
    assert res5[0].conv3.out_channels == 2048


@pytest.mark.parametrize("caffe, width", [(True, 225), (False, 226)])
def test_caffe_maxpool_grid(caffe, width):
    backbone = ResNetC4(load_config("tiny", {"caffe_maxpool": caffe})).eval()

    with torch.no_grad():
        out = backbone.stem(torch.randn(1, 3, 64, 901))

    # conv1 gives 451 columns; Caffe pooling (pad 0, ceil) gives 225, detectron2's 226.
    assert out.shape[-1] == width


def test_stride_in_1x1():
    backbone = ResNetC4(load_config("butd-r101-c4"))

    assert backbone.res3[0].conv1.stride == (2, 2)
    assert backbone.res3[0].conv2.stride == (1, 1)


def test_cell_anchor_order():
    anchors = cell_anchors([64, 128], [0.5, 1.0, 2.0])

    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    # For each size, for each aspect ratio (h / w): detectron2's order.
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0] * 2))
    torch.testing.assert_close(widths * heights, torch.tensor([64.0**2] * 3 + [128.0**2] * 3))
    assert widths[0].item() == pytest.approx(math.sqrt(64**2 / 0.5))


def test_grid_anchor_order():
    base = cell_anchors([32], [0.5, 1.0, 2.0])

    anchors = grid_anchors(base, grid_height=2, grid_width=3, stride=16, offset=0.0)

    assert anchors.shape == (2 * 3 * 3, 4)
    # Index (y * Wf + x) * A + a: cell (y=1, x=2), anchor 1 is centred at (32, 16).
    centre = (anchors[(1 * 3 + 2) * 3 + 1, :2] + anchors[(1 * 3 + 2) * 3 + 1, 2:]) / 2
    torch.testing.assert_close(centre, torch.tensor([32.0, 16.0]))


def test_apply_deltas():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])

    unchanged = apply_deltas(torch.zeros(1, 8), boxes, [10.0, 10.0, 5.0, 5.0])
    shifted = apply_deltas(torch.tensor([[10.0, 0.0, 5.0 * math.log(2.0), 0.0]]), boxes,
                           [10.0, 10.0, 5.0, 5.0])

    torch.testing.assert_close(unchanged, boxes.repeat(1, 2))
    torch.testing.assert_close(shifted, torch.tensor([[20.0, 20.0, 60.0, 60.0]]))


def test_rpn_proposals_clipped_and_limited():
    torch.manual_seed(1)
    config = load_config("tiny", {"rpn_post_nms_topk": 20})
    rpn = RegionProposalNetwork(config, in_channels=128, stride=16).eval()
    features = torch.randn(2, 128, 10, 14)

    with torch.no_grad():
        proposals = rpn(features, [(160, 224), (100, 120)])

    for (boxes, scores), (height, width) in zip(proposals, [(160, 224), (100, 120)]):
        assert 0 < boxes.shape[0] <= 20
        assert torch.all(boxes[:, 2] <= width)
        assert torch.all(boxes[:, 3] <= height)
        assert torch.all(boxes[:, 2] > boxes[:, 0])
        assert torch.all(scores[:-1] >= scores[1:])


@pytest.mark.parametrize("pooler", ["ROIPool", "ROIAlignV2"])
def test_roi_chunks_match_single_pass(pooler):
    torch.manual_seed(2)
    config = load_config("tiny", {"roi_chunk_size": 3, "pooler_type": pooler})
    chunked = Res5RoIHead(config, in_channels=128, stride=16).eval()
    whole = Res5RoIHead({**config, "roi_chunk_size": 1000}, in_channels=128, stride=16).eval()
    whole.load_state_dict(chunked.state_dict())
    features = torch.randn(2, 128, 12, 16)
    rois = torch.tensor([[0, 0, 0, 100, 90], [1, 30, 20, 200, 150], [0, 5, 5, 40, 60],
                         [1, 0, 0, 255, 191], [0, 100, 50, 180, 120], [1, 60, 60, 61, 61],
                         [0, 10, 10, 250, 180]], dtype=torch.float32)

    with torch.no_grad():
        a = chunked(features, rois)
        b = whole(features, rois)

    torch.testing.assert_close(a.features, b.features)
    torch.testing.assert_close(a.class_logits, b.class_logits)
    torch.testing.assert_close(a.attribute_logits, b.attribute_logits)
    assert a.class_logits.shape == (7, config["num_classes"] + 1)
    assert a.box_deltas.shape == (7, config["num_classes"] * 4)
    assert a.attribute_logits.shape == (7, config["num_attributes"] + 1)


def test_resized_size():
    assert resized_size(480, 640, 600, 1000) == (600, 800)
    assert resized_size(100, 1000, 600, 1000) == (100, 1000)
    assert resized_size(1, 10000, 600, 1000) == (1, 1000)
    assert resized_size(1, 1, 600, 1000) == (600, 600)


def test_batch_padding_and_bgr():
    config = load_config("tiny")
    red = np.zeros((10, 20, 3), np.uint8)
    red[..., 0] = 255
    batch = build_batch([red, np.zeros((20, 10, 3), np.uint8)], config, torch.device("cpu"))

    # The 1:2 images hit max_size_test (480) before min_size_test (320).
    assert batch.image_sizes == [(240, 480), (480, 240)]
    assert batch.tensor.shape == (2, 3, 480, 480)
    # BGR order: red lands in channel 2, normalised by the third mean.
    assert batch.tensor[0, 2, 0, 0].item() == pytest.approx(255 - config["pixel_mean"][2])
    assert batch.tensor[0, :, 300, 0].abs().max().item() == 0.0


def test_model_feature_dim():
    assert build_model(load_config("tiny")).feature_dim == 256
