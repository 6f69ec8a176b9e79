"""Write region shards as a SCAN precomp split with the GSMN box companions.

Shapes: N exported images, k regions per image, D feature size.

Files written to the output folder for split ``{split}``:

- ``{split}_ims.npy``: (N, k, D) float32 features;
- ``{split}_ims_bbx.npy``: (N, k, 4) float32 boxes x1 y1 x2 y2 in pixels (GSMN);
- ``{split}_ims_size.npy``: (N,) object array of dicts ``{"image_h", "image_w"}`` (GSMN),
  which its readers load with ``np.load(allow_pickle=True)``;
- ``{split}_ids.txt``: the image ids, one per row of the arrays.

SCAN models need the same k for every image. When counts differ, ``num_regions`` sets k
and shorter images are padded with zero features and zero boxes; without it the export
stops. Images with more than k regions are never cut. A dataset imported without boxes
gets no box or size files. Arrays are streamed to disk one image at a time, so memory
does not grow with N.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.exporters import RegionReader, check_outputs_free

logger = logging.getLogger(__name__)


def export_scan(
    reader: RegionReader,
    out_dir: Path,
    split: str,
    image_ids: list[str],
    num_regions: int | None,
    has_boxes: bool,
    overwrite: bool,
) -> tuple[list[Path], dict[str, Any]]:
    """Write ``image_ids`` as SCAN precomp files of ``split`` into ``out_dir``.

    Args:
        reader: open region reader of the dataset.
        out_dir: output folder, created when missing.
        split: prefix of the file names, e.g. ``test``.
        image_ids: N ok image ids in output order.
        num_regions: k; None requires every image to have the same region count.
        has_boxes: False writes no box and size files.
        overwrite: replace existing files.

    Returns:
        The written paths and ``{"regions_per_image": k, "padded_images": ...}``.

    Raises:
        ValueError: unequal counts without ``num_regions``, an image with more than
            ``num_regions`` regions, or existing files without ``overwrite``.
    """
    per_image = _regions_per_image(reader, image_ids, num_regions)
    names = [f"{split}_ims.npy", f"{split}_ids.txt"]
    if has_boxes:
        names += [f"{split}_ims_bbx.npy", f"{split}_ims_size.npy"]
    else:
        logger.warning("the dataset was imported without boxes: no %s_ims_bbx.npy or %s_ims_size.npy written", split, split)
    paths = [out_dir / name for name in names]
    out_dir.mkdir(parents=True, exist_ok=True)
    check_outputs_free(paths, overwrite)

    count, dim = len(image_ids), reader.feature_dim
    padded = 0
    sizes = []
    with contextlib.ExitStack() as publish:
        temporary = {path.name: publish.enter_context(atomic_path(path)) for path in paths}
        with contextlib.ExitStack() as handles:
            features_file = handles.enter_context(open(temporary[names[0]], "wb"))
            _write_npy_header(features_file, (count, per_image, dim))
            boxes_file = None
            if has_boxes:
                boxes_file = handles.enter_context(open(temporary[names[2]], "wb"))
                _write_npy_header(boxes_file, (count, per_image, 4))

            for regions in reader.iter(image_ids):
                padded += int(regions.features.shape[0] < per_image)
                features_file.write(_padded(regions.features, per_image).tobytes())
                if boxes_file is not None:
                    boxes_file.write(_padded(regions.boxes, per_image).tobytes())
                sizes.append({"image_h": int(regions.image_size[0]), "image_w": int(regions.image_size[1])})

        temporary[names[1]].write_text("".join(f"{image_id}\n" for image_id in image_ids), encoding="utf-8")
        if has_boxes:
            size_array = np.empty(count, dtype=object)
            size_array[:] = sizes
            with open(temporary[names[3]], "wb") as handle:
                np.save(handle, size_array, allow_pickle=True)

    if padded:
        logger.info("%d of %d images zero-padded to %d regions", padded, count, per_image)
    return paths, {"regions_per_image": per_image, "padded_images": padded}


def _regions_per_image(reader: RegionReader, image_ids: list[str], num_regions: int | None) -> int:
    counts = {image_id: reader.stored[image_id].num_regions for image_id in image_ids}
    low, high = min(counts.values()), max(counts.values())
    if num_regions is None:
        if low != high:
            raise ValueError(
                f"regions per image vary from {low} to {high}, but SCAN stores a fixed count; "
                f"pass --num-regions {high} to zero-pad, or extract with --num-boxes N"
            )
        return high
    if num_regions < 1:
        raise ValueError(f"--num-regions must be at least 1, got {num_regions}")
    if high > num_regions:
        largest = max(counts, key=counts.get)
        raise ValueError(
            f"image {largest!r} has {high} regions, more than --num-regions {num_regions}; "
            f"pass --num-regions {high} or more (images are never cut)"
        )
    return num_regions


def _write_npy_header(handle: BinaryIO, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(handle, header)


def _padded(rows: np.ndarray, length: int) -> np.ndarray:
    """Return ``rows`` (R, C) as little-endian float32 (length, C), zero rows appended."""
    result = np.zeros((length, rows.shape[1]), dtype="<f4")
    result[: rows.shape[0]] = rows
    return result
