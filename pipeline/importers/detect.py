"""Detect the format of a precomputed feature source from its content.

File names are not trusted: a TSV is recognised by its field count and integer fields,
an ``.npy`` or ``.npz`` by its header and members. Only the SCAN layout is named by
files (``{split}_ims.npy``), and there the array header must be 3-D as well.
``cmsei-prep import --format`` skips detection.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.importers import IMPORT_FORMATS
from pipeline.importers.butd_tsv import BUTD_FIELDS
from pipeline.importers.lxmert_tsv import LXMERT_FIELDS
from pipeline.importers.npz_dirs import list_files, npy_header_of, zip_member_names
from pipeline.importers.scan_precomp import FEATURES_SUFFIX

logger = logging.getLogger(__name__)

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
MAX_PROBE_LINE_BYTES = 64 << 20
"""Maximum length of the first line read for detection; a 100 x 2048 TSV row is about 1.1 MB."""

MAX_PROBE_FILES = 8
"""Per-image files opened when a folder's first files are unreadable."""


def detect_format(source: str | Path) -> str:
    """Return the import format of ``source``, one of ``IMPORT_FORMATS``.

    Args:
        source: a TSV file, a SCAN precomp folder or ``{split}_ims.npy`` file, a folder
            of per-image ``.npz`` or ``.npy`` files, or one ``.npz`` file.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: the content matches no format; the message describes what was found.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"import source not found: {path}")
    found = _detect_folder(path) if path.is_dir() else _detect_file(path)
    logger.info("detected format %s for %s", found, path)
    return found


def _detect_file(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(8)
        handle.seek(0)
        line = handle.readline(MAX_PROBE_LINE_BYTES)
        while line and not line.strip():
            line = handle.readline(MAX_PROBE_LINE_BYTES)

    if head.startswith(NPY_MAGIC):
        header = npy_header_of(path)
        if header and len(header[0]) == 3 and path.name.endswith(FEATURES_SUFFIX):
            return "scan"
        shape = header[0] if header else "unknown"
        raise ValueError(f"{path} is an .npy array of shape {shape}; only SCAN {{split}}{FEATURES_SUFFIX} (images, regions, D) files import on their own")
    if head.startswith(ZIP_MAGIC):
        if "x.npy" in zip_member_names(path):
            return "butd-npz"
        raise ValueError(f"{path} is a zip file without an 'x' array, not a bottom-up-attention .npz; pass --format to force one")
    return _detect_tsv(path, line)


def _detect_tsv(path: Path, line: bytes) -> str:
    if not line:
        raise ValueError(f"{path} is empty")
    values = line.rstrip(b"\r\n").split(b"\t")
    layouts = {"lxmert-tsv": (LXMERT_FIELDS, ("img_h", "img_w", "num_boxes")),
               "butd-tsv": (BUTD_FIELDS, ("image_w", "image_h", "num_boxes"))}
    for name, (fields, integer_fields) in layouts.items():
        if len(values) == len(fields) and all(_is_int(values[fields.index(field)]) for field in integer_fields):
            return name
    raise ValueError(
        f"cannot detect the format of {path}: its first line has {len(values)} tab-separated fields; "
        f"expected {len(LXMERT_FIELDS)} (lxmert-tsv) or {len(BUTD_FIELDS)} (butd-tsv) with integer sizes. "
        f"Pass --format, one of {', '.join(IMPORT_FORMATS)}"
    )


def _detect_folder(path: Path) -> str:
    for features in sorted(path.glob(f"*{FEATURES_SUFFIX}")):
        header = npy_header_of(features)
        if header and len(header[0]) == 3:
            return "scan"

    for archive in list_files(path, lambda name: name.endswith(".npz"))[:MAX_PROBE_FILES]:
        if "x.npy" in zip_member_names(archive):
            return "butd-npz"

    candidates = list_files(path, lambda name: name.endswith(".npy") and not name.endswith(("_info.npy", "_full.npy")))
    for features in candidates[:MAX_PROBE_FILES]:
        header = npy_header_of(features)
        info = features.with_name(features.name[: -len(".npy")] + "_info.npy")
        if header and len(header[0]) == 2 and not header[2].hasobject and info.exists():
            return "mmf-npy"

    raise ValueError(
        f"cannot detect the format of folder {path}: no 3-D {{split}}{FEATURES_SUFFIX}, no .npz with an 'x' array "
        f"and no .npy with an _info.npy beside it. Pass --format, one of {', '.join(IMPORT_FORMATS)}"
    )


def _is_int(value: bytes) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True
