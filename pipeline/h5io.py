"""HDF5 helpers shared by every shard format: ragged appends, strings, attributes.

Ragged per-image data is stored as flat arrays plus an ``offsets`` array of length
N + 1 (N images), so image ``i`` owns rows ``offsets[i]:offsets[i + 1]``. Numeric bulk
data never uses HDF5 variable-length types; only string columns do.
"""

from __future__ import annotations

import json
from typing import Any

import h5py
import numpy as np

STRING_DTYPE = h5py.string_dtype(encoding="utf-8")


def create_appendable(
    h5: h5py.File,
    name: str,
    row_shape: tuple[int, ...],
    dtype: Any,
    compression: str | None = "gzip",
    chunk_rows: int = 1024,
) -> h5py.Dataset:
    """Create an empty dataset that grows along axis 0, chunked and compressed.

    Args:
        h5: open, writable file.
        name: dataset name.
        row_shape: shape of one row, e.g. ``(4,)`` for boxes or ``()`` for scalars.
        dtype: numpy dtype, or :data:`STRING_DTYPE`.
        compression: ``"gzip"``, ``"lzf"`` or ``None``.
        chunk_rows: rows per chunk.
    """
    options: dict[str, Any] = {}
    if compression == "gzip":
        options = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    elif compression == "lzf":
        options = {"compression": "lzf", "shuffle": True}
    elif compression is not None:
        raise ValueError(f"unknown compression {compression!r}; use 'gzip', 'lzf' or None")

    return h5.create_dataset(
        name,
        shape=(0, *row_shape),
        maxshape=(None, *row_shape),
        chunks=(chunk_rows, *row_shape),
        dtype=dtype,
        **options,
    )


def append_rows(dataset: h5py.Dataset, rows: np.ndarray | list) -> None:
    """Append ``rows`` (shape ``(M, *row_shape)``) to an appendable dataset."""
    count = len(rows)
    if count == 0:
        return
    start = dataset.shape[0]
    dataset.resize(start + count, axis=0)
    dataset[start:] = rows


def write_strings(h5: h5py.File, name: str, values: list[str]) -> None:
    """Store a list of strings as a UTF-8 string dataset."""
    h5.create_dataset(name, data=np.array(values, dtype=object), dtype=STRING_DTYPE)


def read_strings(dataset: h5py.Dataset) -> list[str]:
    """Read a UTF-8 string dataset as Python strings."""
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in dataset[()]]


def set_json_attr(h5: h5py.File, name: str, value: Any) -> None:
    """Store a JSON-serialisable value as a string attribute."""
    h5.attrs[name] = json.dumps(value, sort_keys=True)


def get_json_attr(h5: h5py.File, name: str) -> Any:
    """Load a value stored by :func:`set_json_attr`."""
    raw = h5.attrs[name]
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


def check_offsets(offsets: np.ndarray, num_images: int, num_rows: int) -> str | None:
    """Return a description of what is wrong with an offsets array, or None when valid."""
    if offsets.shape != (num_images + 1,):
        return f"offsets has shape {offsets.shape}, expected ({num_images + 1},)"
    if num_images + 1 > 0 and offsets[0] != 0:
        return f"offsets[0] is {offsets[0]}, expected 0"
    if np.any(np.diff(offsets) < 0):
        return "offsets decrease somewhere"
    if offsets[-1] != num_rows:
        return f"offsets end at {offsets[-1]} but the data has {num_rows} rows"
    return None
