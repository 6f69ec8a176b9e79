"""Load detector weights: file formats, detectron2 name mapping and a restricted unpickler.

Accepted files:

* ``.pth`` / ``.pt``: ``torch.load(..., weights_only=True)``; a state dict, or a dict
  with the state dict under ``"model"`` (detectron2's checkpointer layout).
* ``.pkl``: detectron2 / Caffe-converted pickles, ``{"model": {name: ndarray}, ...}`` or
  a flat ``{name: ndarray}``, read by ``RestrictedUnpickler``, which builds only numpy
  arrays, numpy scalars and plain containers.

Names are either native (this package's module names; torchvision's for the FPN model)
or detectron2's (``GeneralizedRCNN`` with ``Res5ROIHeads`` and py-bottom-up-attention's
attribute head), which ``detectron2_to_native`` maps. Every problem raises
``WeightsError``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

# Keys listed in error messages before "... and N more".
SHOWN_KEYS = 8

# Globals a weights pickle may reference: numpy array and scalar reconstruction, the
# codec that protocol-2 pickles use for raw bytes, and OrderedDict. Both numpy module
# paths are listed because NumPy 2 renamed numpy.core to numpy._core.
ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
})

_BLOCK = r"(backbone\.res[2-4]|roi_heads\.res5)\.(\d+)"
_PARAM = r"(weight|bias)"
_NORM = r"(weight|bias|running_mean|running_var)"

# detectron2 name pattern -> native name template, one row per parameter family.
# NOTE: the names follow the module code of detectron2 and py-bottom-up-attention; the
# released faster_rcnn_from_caffe_attr.pkl itself has not been loaded by these tests.
DETECTRON2_TO_NATIVE = [
    (r"backbone\.stem\.conv1\.weight", "backbone.stem.conv1.weight"),
    (rf"backbone\.stem\.conv1\.norm\.{_NORM}", r"backbone.stem.bn1.\1"),
    (rf"{_BLOCK}\.conv([123])\.weight", r"\1.\2.conv\3.weight"),
    (rf"{_BLOCK}\.conv([123])\.norm\.{_NORM}", r"\1.\2.bn\3.\4"),
    (rf"{_BLOCK}\.shortcut\.weight", r"\1.\2.downsample.0.weight"),
    (rf"{_BLOCK}\.shortcut\.norm\.{_NORM}", r"\1.\2.downsample.1.\3"),
    (rf"proposal_generator\.rpn_head\.conv\.{_PARAM}", r"rpn.head.conv.\1"),
    (rf"proposal_generator\.rpn_head\.objectness_logits\.{_PARAM}", r"rpn.head.cls_logits.\1"),
    (rf"proposal_generator\.rpn_head\.anchor_deltas\.{_PARAM}", r"rpn.head.bbox_pred.\1"),
    (rf"roi_heads\.box_predictor\.cls_score\.{_PARAM}", r"roi_heads.predictor.cls_score.\1"),
    (rf"roi_heads\.box_predictor\.bbox_pred\.{_PARAM}", r"roi_heads.predictor.bbox_pred.\1"),
    (r"roi_heads\.box_predictor\.cls_embedding\.weight",
     "roi_heads.attribute_head.class_embedding.weight"),
    (rf"roi_heads\.box_predictor\.fc_attr\.{_PARAM}", r"roi_heads.attribute_head.fc.\1"),
    (rf"roi_heads\.box_predictor\.attr_score\.{_PARAM}", r"roi_heads.attribute_head.attr_score.\1"),
]

# The inverse table, for writing detectron2-format files and for the detectron2 backend.
NATIVE_TO_DETECTRON2 = [
    (r"backbone\.stem\.conv1\.weight", "backbone.stem.conv1.weight"),
    (rf"backbone\.stem\.bn1\.{_NORM}", r"backbone.stem.conv1.norm.\1"),
    (rf"{_BLOCK}\.conv([123])\.weight", r"\1.\2.conv\3.weight"),
    (rf"{_BLOCK}\.bn([123])\.{_NORM}", r"\1.\2.conv\3.norm.\4"),
    (rf"{_BLOCK}\.downsample\.0\.weight", r"\1.\2.shortcut.weight"),
    (rf"{_BLOCK}\.downsample\.1\.{_NORM}", r"\1.\2.shortcut.norm.\3"),
    (rf"rpn\.head\.conv\.{_PARAM}", r"proposal_generator.rpn_head.conv.\1"),
    (rf"rpn\.head\.cls_logits\.{_PARAM}", r"proposal_generator.rpn_head.objectness_logits.\1"),
    (rf"rpn\.head\.bbox_pred\.{_PARAM}", r"proposal_generator.rpn_head.anchor_deltas.\1"),
    (rf"roi_heads\.predictor\.cls_score\.{_PARAM}", r"roi_heads.box_predictor.cls_score.\1"),
    (rf"roi_heads\.predictor\.bbox_pred\.{_PARAM}", r"roi_heads.box_predictor.bbox_pred.\1"),
    (r"roi_heads\.attribute_head\.class_embedding\.weight",
     "roi_heads.box_predictor.cls_embedding.weight"),
    (rf"roi_heads\.attribute_head\.fc\.{_PARAM}", r"roi_heads.box_predictor.fc_attr.\1"),
    (rf"roi_heads\.attribute_head\.attr_score\.{_PARAM}", r"roi_heads.box_predictor.attr_score.\1"),
]

# detectron2 entries that are not parameters of our model; they are checked, not loaded.
DETECTRON2_EXTRAS = re.compile(
    r"pixel_mean|pixel_std|proposal_generator\.anchor_generator\.cell_anchors\.\d+"
)


class WeightsError(ValueError):
    """A weights file is missing, unreadable, rejected or does not fit the model."""


def _rename(name: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, template in table:
        match = re.fullmatch(pattern, name)
        if match:
            return match.expand(template)
    return None


def detectron2_to_native(name: str) -> str | None:
    """Return the native parameter name for a detectron2 name, or None if none fits."""
    return _rename(name, DETECTRON2_TO_NATIVE)


def native_to_detectron2(name: str) -> str | None:
    """Return the detectron2 parameter name for a native C4 name, or None if none fits."""
    return _rename(name, NATIVE_TO_DETECTRON2)


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``ALLOWED_GLOBALS``.

    Any other global (a function such as ``os.system``, a class with a custom reduce)
    raises ``WeightsError`` before it is imported or called.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise WeightsError(
                f"rejected pickle: it references the global {module}.{name}; weights pickles "
                "may only contain numpy arrays, numbers, strings and containers. Convert "
                "the file with a trusted tool or save it as a .pth state dict"
            )
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core."):]
        return getattr(importlib.import_module(module), name)


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as handle:
        try:
            return RestrictedUnpickler(handle, encoding="latin1").load()
        except WeightsError as error:
            raise WeightsError(f"{path}: {error}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
            raise WeightsError(f"cannot read weights pickle {path}: {error}") from error


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise WeightsError(
            f"rejected weights file {path}: torch.load(weights_only=True) raised "
            f"({error}); save the model's state_dict() instead of a pickled object"
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise WeightsError(f"cannot read weights file {path}: {error}") from error


def _to_tensor(name: str, value: Any, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return torch.from_numpy(np.ascontiguousarray(value))
    raise WeightsError(
        f"entry {name!r} of {path} is a {type(value).__name__}"
        f"{' of dtype ' + str(value.dtype) if isinstance(value, np.ndarray) else ''}, "
        "not a numeric array"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat {name: tensor} dict (CPU).

    Raises:
        WeightsError: missing file, unknown suffix, rejected or unreadable content.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")

    if path.suffix == ".pkl":
        data = _load_pickle(path)
    elif path.suffix in (".pth", ".pt"):
        data = _load_torch(path)
    else:
        raise WeightsError(
            f"unsupported weights file suffix {path.suffix!r} ({path}); use .pth or .pkl"
        )

    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        logger.info("reading weights from %s (author: %s)", path, data.get("__author__", "unknown"))
        data = data["model"]
    if not isinstance(data, dict) or not data:
        raise WeightsError(f"{path} contains no state dict (a mapping of names to arrays)")
    return {str(name): _to_tensor(str(name), value, path) for name, value in data.items()}


def is_detectron2_layout(names: list[str]) -> bool:
    """Tell whether a state dict uses detectron2 names rather than native or torchvision ones.

    Only detectron2 has ``proposal_generator.*`` and norms nested in convolutions
    (``*.conv1.norm.*``); ``roi_heads.box_predictor.*`` exists in torchvision too.
    """
    markers = ("proposal_generator.", "backbone.stem.conv1.norm.", "backbone.res2.0.conv1.norm.")
    return any(name.startswith(markers) for name in names)


def _first(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:SHOWN_KEYS])
    more = len(names) - SHOWN_KEYS
    return shown + (f" ... and {more} more" if more > 0 else "")


def _check_extras(extras: dict[str, torch.Tensor], model: nn.Module, config: dict) -> None:
    """Compare detectron2's pixel statistics and cell anchors with ours; warn on a mismatch."""
    for name, value in extras.items():
        if name in ("pixel_mean", "pixel_std"):
            expected = torch.tensor(config[name], dtype=torch.float32)
            matches = value.numel() == 3 and torch.allclose(value.float().flatten(), expected,
                                                            atol=1e-3)
            if not matches:
                logger.warning("checkpoint %s %s differs from the config's %s; the config is used",
                               name, value.flatten().tolist(), expected.tolist())
        elif hasattr(model, "rpn"):
            anchors = model.rpn.cell_anchors.cpu()
            matches = value.shape == anchors.shape and torch.allclose(value.float(), anchors,
                                                                      atol=1e-3)
            if not matches:
                logger.warning("checkpoint %s do not match the anchors of anchor_sizes and "
                               "anchor_aspect_ratios in the config", name)


def _fill_running_stats(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Add mean 0 / variance 1 where a detectron2 file has a norm's affine terms but no stats.

    detectron2's FrozenBatchNorm2d does the same for checkpoints saved without them.
    """
    filled = 0
    for name in expected:
        for stat, default in (("running_mean", torch.zeros_like), ("running_var", torch.ones_like)):
            if name.endswith("." + stat) and name not in state:
                prefix = name[: -len(stat)]
                if prefix + "weight" in state:
                    state[name] = default(expected[name])
                    filled += 1
    if filled:
        logger.info("filled %d missing batch-norm running statistics with 0 / 1", filled)


def map_state_dict(state: dict[str, torch.Tensor], model: nn.Module,
                   config: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a detectron2-layout state dict to native names.

    Returns:
        The renamed dict and the detectron2 names that no rule maps (unexpected keys).
    """
    mapped: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        if DETECTRON2_EXTRAS.fullmatch(name):
            extras[name] = value
            continue
        native = detectron2_to_native(name)
        if native is None:
            unmapped.append(name)
        else:
            mapped[native] = value

    _check_extras(extras, model, config)
    return mapped, unmapped


def load_weights(model: nn.Module, path: str | os.PathLike, config: dict,
                 strict: bool = True) -> str:
    """Load a weights file into ``model`` and return the file's SHA-256.

    Args:
        model: a freshly built detector (batch norm not folded yet).
        path: a .pth/.pt or .pkl file with native or detectron2 names.
        config: the resolved detector config (for checking pixel statistics).
        strict: if False, missing and unexpected keys are logged instead of raising.

    Raises:
        WeightsError: for a missing or rejected file, shape mismatches, or (with strict)
            missing or unexpected keys; the message lists the first few names.
    """
    state = read_state_dict(path)
    target = model.state_dict_target() if hasattr(model, "state_dict_target") else model
    expected = target.state_dict()

    unexpected: list[str] = []
    layout = "native"
    if config["architecture"] == "c4" and is_detectron2_layout(list(state)):
        layout = "detectron2"
        state, unexpected = map_state_dict(state, model, config)
        _fill_running_stats(state, expected)

    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = [name for name in expected if name not in state]
    unexpected += [name for name in state if name not in expected]
    _check_shapes(state, expected, path)
    _report_keys(missing, unexpected, path, layout, strict)

    fitting = {name: value for name, value in state.items() if name in expected}
    target.load_state_dict(fitting, strict=False)
    digest = sha256_file(path)
    logger.info("loaded %d tensors (%s names) from %s, sha256 %s", len(fitting), layout, path,
                digest)
    return digest


def _check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  path: str | os.PathLike) -> None:
    wrong = [
        f"{name} {tuple(value.shape)} (model {tuple(expected[name].shape)})"
        for name, value in state.items()
        if name in expected and value.shape != expected[name].shape
    ]
    if wrong:
        raise WeightsError(
            f"{len(wrong)} tensors of {path} have the wrong shape: {_first(wrong)}; check "
            "num_classes, num_attributes and the backbone fields of the detector config"
        )


def _report_keys(missing: list[str], unexpected: list[str], path: str | os.PathLike,
                 layout: str, strict: bool) -> None:
    if missing:
        logger.warning("%d keys missing from %s: %s", len(missing), path, _first(missing))
    if unexpected:
        logger.warning("%d unexpected keys in %s: %s", len(unexpected), path, _first(unexpected))
    if strict and (missing or unexpected):
        raise WeightsError(
            f"weights {path} ({layout} names) do not fit the detector: "
            f"{len(missing)} missing keys [{_first(missing)}], "
            f"{len(unexpected)} unexpected keys [{_first(unexpected)}]; pick the matching "
            "detector preset or load with strict=False"
        )
