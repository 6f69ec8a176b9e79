"""Detector presets: load a YAML preset, merge overrides and validate every field.

A preset is a flat YAML mapping of the fields in ``FIELDS``. A YAML file may name
another preset or YAML file in ``base`` and then set only the fields it changes.
Which fields apply depends on ``architecture``:

* ``c4``: a ResNet C4 Faster R-CNN in detectron2's layout (bottom-up-attention and ``tiny``).
* ``torchvision_fpn``: torchvision's ``fasterrcnn_resnet50_fpn``.

Every error is a ``ValueError`` that names the field and the file it came from.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "presets"

ARCHITECTURES = ("c4", "torchvision_fpn")
C4 = frozenset({"c4"})
FPN = frozenset({"torchvision_fpn"})
BOTH = C4 | FPN

# Nesting limit for `base` chains, so that a cycle fails with a clear message.
MAX_BASE_DEPTH = 8


@dataclass(frozen=True)
class Field:
    """Schema of one preset field: the architectures it applies to and its check."""

    architectures: frozenset[str]
    check: Callable[[Any], bool]
    expected: str
    optional: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int_at_least(minimum: int) -> Callable[[Any], bool]:
    return lambda value: _is_int(value) and value >= minimum


def _number_in(low: float, high: float) -> Callable[[Any], bool]:
    return lambda value: _is_number(value) and low <= value <= high


def _positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _number_list(length: int, positive: bool) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, list) or len(value) != length:
            return False
        return all(_positive_number(v) if positive else _is_number(v) for v in value)

    return check


def _positive_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_positive_number(v) for v in value)


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda value: value in choices


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_path_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value != "")


FIELDS: dict[str, Field] = {
    "name": Field(BOTH, lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "architecture": Field(BOTH, _one_of(*ARCHITECTURES), f"one of {list(ARCHITECTURES)}"),
    # Label spaces: K object classes and A attributes, background and "no attribute" excluded.
    "num_classes": Field(BOTH, _int_at_least(1), "an integer >= 1"),
    "num_attributes": Field(C4, _int_at_least(0), "an integer >= 0 (0 = no attribute head)"),
    "object_vocab_path": Field(C4, _is_path_or_none, "a file path or null", optional=True),
    "attribute_vocab_path": Field(C4, _is_path_or_none, "a file path or null", optional=True),
    # Input: channel order and normalisation in 0-255 units, resize of the shorter side.
    "input_format": Field(BOTH, _one_of("BGR", "RGB"), "'BGR' or 'RGB'"),
    "pixel_mean": Field(BOTH, _number_list(3, positive=False), "a list of 3 numbers"),
    "pixel_std": Field(BOTH, _number_list(3, positive=True), "a list of 3 numbers > 0"),
    "min_size_test": Field(BOTH, _int_at_least(1), "an integer >= 1 (pixels)"),
    "max_size_test": Field(BOTH, _int_at_least(1), "an integer >= 1 (pixels)"),
    # ResNet C4 backbone.
    "stem_out_channels": Field(C4, _int_at_least(1), "an integer >= 1"),
    "res2_out_channels": Field(C4, _int_at_least(1), "an integer >= 1"),
    "res2_bottleneck_channels": Field(C4, _int_at_least(1), "an integer >= 1"),
    "stage_blocks": Field(
        C4,
        lambda v: isinstance(v, list) and len(v) == 4 and all(_is_int(b) and b >= 1 for b in v),
        "a list of 4 integers >= 1 (blocks in res2, res3, res4, res5)",
    ),
    "stride_in_1x1": Field(C4, _is_bool, "true or false"),
    "caffe_maxpool": Field(C4, _is_bool, "true or false"),
    # torchvision's COCO_V1 weights of fasterrcnn_resnet50_fpn expect eps 0.
    "batchnorm_eps": Field(BOTH, _number_in(0.0, 1.0), "a number in [0, 1]"),
    "res5_halve": Field(C4, _is_bool, "true or false"),
    "res5_dilation": Field(C4, _int_at_least(1), "an integer >= 1"),
    # Region proposal network.
    "rpn_hidden_channels": Field(C4, _int_at_least(1), "an integer >= 1"),
    "anchor_sizes": Field(C4, _positive_list, "a non-empty list of numbers > 0 (pixels)"),
    "anchor_aspect_ratios": Field(C4, _positive_list, "a non-empty list of numbers > 0 (h / w)"),
    "anchor_offset": Field(C4, lambda v: _is_number(v) and 0.0 <= v < 1.0, "a number in [0, 1)"),
    "rpn_bbox_reg_weights": Field(C4, _number_list(4, positive=True), "a list of 4 numbers > 0"),
    "rpn_min_box_size": Field(C4, _number_in(0.0, math.inf), "a number >= 0 (pixels)"),
    "rpn_pre_nms_topk": Field(BOTH, _int_at_least(1), "an integer >= 1"),
    "rpn_post_nms_topk": Field(BOTH, _int_at_least(1), "an integer >= 1"),
    "rpn_nms_thresh": Field(BOTH, _number_in(0.0, 1.0), "a number in [0, 1]"),
    # RoI head.
    "pooler_type": Field(C4, _one_of("ROIPool", "ROIAlignV2"), "'ROIPool' or 'ROIAlignV2'"),
    "pooler_resolution": Field(C4, _int_at_least(1), "an integer >= 1"),
    "pooler_sampling_ratio": Field(C4, _int_at_least(0), "an integer >= 0"),
    "roi_bbox_reg_weights": Field(C4, _number_list(4, positive=True), "a list of 4 numbers > 0"),
    "roi_chunk_size": Field(C4, _int_at_least(1), "an integer >= 1 (RoIs per res5 pass)"),
    "attribute_embedding_dim": Field(C4, _int_at_least(1), "an integer >= 1"),
    "attribute_hidden_dim": Field(C4, _int_at_least(1), "an integer >= 1"),
    # Region selection.
    "selection_nms_thresh": Field(BOTH, _number_in(0.0, 1.0), "a number in [0, 1]"),
    "conf_thresh": Field(BOTH, _number_in(0.0, 1.0), "a number in [0, 1]"),
    "min_boxes": Field(BOTH, _int_at_least(0), "an integer >= 0"),
    "max_boxes": Field(BOTH, _int_at_least(1), "an integer >= 1"),
    "num_boxes": Field(BOTH, lambda v: v is None or (_is_int(v) and v >= 1), "null or >= 1", True),
    "store_class_boxes": Field(BOTH, _is_bool, "true or false"),
    # CPU speed switches; both keep outputs equal to float tolerance.
    "fold_batchnorm": Field(C4, _is_bool, "true or false"),
    "channels_last": Field(BOTH, _is_bool, "true or false"),
}


def _read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML mapping, with errors that name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"detector config file not found: {path}") from None
    except OSError as error:
        raise ValueError(f"cannot read detector config file {path}: {error}") from error

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"invalid YAML in detector config {path}: {error}") from error

    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"detector config {path} must be a YAML mapping, got {type(data).__name__}"
        )
    return data


def preset_names() -> list[str]:
    """Return the names of the presets shipped in ``extractors/presets``."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def _resolve_source(source: str | os.PathLike, relative_to: Path | None) -> Path:
    """Map a preset name or a YAML path to a file path."""
    text = os.fspath(source)
    if (PRESET_DIR / f"{text}.yaml").is_file() and os.sep not in text:
        return PRESET_DIR / f"{text}.yaml"

    path = Path(text).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    if path.suffix not in (".yaml", ".yml"):
        raise ValueError(
            f"unknown detector preset {text!r}: pass one of {preset_names()} "
            "or the path of a .yaml file"
        )
    return path


def _load_with_bases(source: str | os.PathLike, relative_to: Path | None, depth: int) -> dict:
    """Load a YAML file and the chain of files named by its `base` fields."""
    if depth > MAX_BASE_DEPTH:
        raise ValueError(f"detector config 'base' chain is deeper than {MAX_BASE_DEPTH}: {source}")

    path = _resolve_source(source, relative_to)
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"field 'base' in {path} must be a preset name or a YAML path")

    merged = _load_with_bases(base, path.parent, depth + 1)
    merged.update(data)
    return merged


def _load_overrides(overrides: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    if isinstance(overrides, (str, os.PathLike)):
        return _read_yaml(Path(overrides).expanduser())
    raise ValueError(
        f"overrides must be a dict, a YAML file path or None, got {type(overrides).__name__}"
    )


def _normalise(value: Any) -> Any:
    """Turn YAML tuples into lists so that configs compare and serialise as JSON."""
    if isinstance(value, tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def validate_config(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Check every field of a merged config and return a normalised plain dict.

    Args:
        config: field name -> value, after merging preset and overrides.
        source: where the fields came from, for error messages.

    Raises:
        ValueError: on an unknown, missing, misplaced or invalid field; the message names
            the field, the expected value and the source.
    """
    values = {name: _normalise(value) for name, value in config.items()}

    architecture = values.get("architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"field 'architecture' in {source} must be one of {list(ARCHITECTURES)}, "
            f"got {architecture!r}"
        )

    for name in values:
        if name not in FIELDS:
            raise ValueError(
                f"unknown field {name!r} in {source}; valid fields are {sorted(FIELDS)}"
            )
        if architecture not in FIELDS[name].architectures:
            raise ValueError(
                f"field {name!r} in {source} does not apply to architecture {architecture!r}; "
                "remove it"
            )

    for name, field in FIELDS.items():
        if architecture not in field.architectures:
            continue
        if name not in values:
            if field.optional:
                values[name] = None
                continue
            raise ValueError(f"missing field {name!r} in {source}; set it to {field.expected}")
        if not field.check(values[name]):
            raise ValueError(
                f"field {name!r} in {source} must be {field.expected}, got {values[name]!r}"
            )

    _check_cross_fields(values, source)
    return values


def _check_cross_fields(values: dict[str, Any], source: str) -> None:
    if values["min_boxes"] > values["max_boxes"]:
        raise ValueError(
            f"field 'min_boxes' ({values['min_boxes']}) in {source} exceeds "
            f"'max_boxes' ({values['max_boxes']}); lower min_boxes or raise max_boxes"
        )
    if values["min_size_test"] > values["max_size_test"]:
        raise ValueError(
            f"field 'min_size_test' ({values['min_size_test']}) in {source} exceeds "
            f"'max_size_test' ({values['max_size_test']})"
        )
    if values["architecture"] == "torchvision_fpn" and values["num_classes"] != 90:
        # NOTE: torchvision's COCO layout has 91 outputs, background included.
        raise ValueError(
            f"field 'num_classes' in {source} must be 90 for architecture 'torchvision_fpn' "
            f"(the COCO layout of fasterrcnn_resnet50_fpn), got {values['num_classes']}"
        )


def load_config(
    detector: str | os.PathLike,
    overrides: Mapping[str, Any] | str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Resolve a preset name or YAML path plus overrides into a validated config.

    Args:
        detector: a preset name from ``preset_names()`` or the path of a YAML file.
        overrides: a dict or a YAML path whose fields replace those of the preset.

    Returns:
        A plain, JSON-serialisable dict with every field of the architecture.

    Raises:
        ValueError: on a missing file, invalid YAML or an invalid field (named).
    """
    if not isinstance(detector, (str, os.PathLike)) or os.fspath(detector) == "":
        raise ValueError(f"detector must be a preset name or a YAML path, got {detector!r}")

    merged = _load_with_bases(detector, None, depth=0)
    override_values = _load_overrides(overrides)
    merged.update(override_values)
    merged.pop("base", None)

    source = f"detector {os.fspath(detector)!r}"
    if override_values:
        source += f" with overrides {sorted(override_values)}"
    config = validate_config(merged, source)
    logger.debug("resolved detector config %s", config)
    return config
