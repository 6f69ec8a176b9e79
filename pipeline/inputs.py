"""Find the input images of a run: walk a folder or read a list file.

An image id is the image's path relative to the images folder (or to the list file's
folder), with its extension, in POSIX form and Unicode NFC. Ids key every shard row and
manifest entry, so the same input always yields the same ids in the same order.

Discovery only looks at names and file types. Whether a file decodes is decided later
by `extractors.images.decode_image`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
"""Suffixes treated as images, compared in lower case."""

REASON_NOT_IMAGE_EXTENSION = "not an image file extension"
REASON_NOT_FOUND = "file not found"
REASON_BROKEN_SYMLINK = "broken symbolic link"
REASON_NOT_REGULAR_FILE = "not a regular file"
REASON_LISTED_FOLDER = "listed path is a folder; list image files or pass the folder as the source"
REASON_FOLDER_ALREADY_LISTED = "symlinked folder already listed under another path"
REASON_DUPLICATE_ID = "image id already used by another file after Unicode NFC normalisation"
REASON_INVALID_UTF8_NAME = "file name is not valid UTF-8"
REASON_UNREADABLE_FOLDER = "folder cannot be read"


@dataclass(frozen=True)
class ImageEntry:
    """One input image.

    Attributes:
        image_id: POSIX path relative to the images folder (or list file's folder), NFC.
        path: absolute path as found on disk; symlinks are not resolved.
    """

    image_id: str
    path: Path


@dataclass(frozen=True)
class SkippedFile:
    """A file that discovery found but will not process.

    Attributes:
        image_id: the id the file would have had.
        path: the file's path.
        reason: why it was skipped, in words.
    """

    image_id: str
    path: Path
    reason: str


@dataclass
class InputListing:
    """The images of one run and the files left out.

    Attributes:
        entries: images sorted by image_id (plain Python string order), ids unique.
        skipped: files left out, sorted by image_id then path.
        source: absolute POSIX path of the folder or list file that was read.
    """

    entries: list[ImageEntry] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    source: str = ""

    def listing_digest(self) -> str:
        """Return the hex SHA-256 of the sorted image ids, to detect a changed input on resume.

        Each id is hashed as its UTF-8 bytes followed by a NUL byte, which no file name
        can contain, so different id lists never hash the same bytes.
        """
        digest = hashlib.sha256()
        for image_id in sorted(entry.image_id for entry in self.entries):
            digest.update(image_id.encode("utf-8"))
            digest.update(b"\0")
        return digest.hexdigest()


def discover_images(source: str | os.PathLike) -> InputListing:
    """List the images of a folder or of a list file.

    A folder is walked recursively. Hidden files and folders (name starting with ".")
    are ignored. Files with a suffix in IMAGE_EXTENSIONS (any case) become entries and
    other files become SkippedFile. A symlinked file is listed under the link's own path.
    Real folders are walked first. Each symlinked folder is then followed unless its
    target was already walked, which also stops symlink loops.

    A list file contains one path per line, absolute or relative to the list file's
    folder. Blank lines and lines starting with "#" are ignored, and surrounding
    whitespace is stripped. The id is the path relative to the list file's folder when
    it lies inside it (compared lexically, without resolving symlinks), else the
    absolute normalised POSIX path. Repeated paths are listed once.

    Ids are NFC-normalised, so a name stored decomposed (NFD, as macOS HFS+ does) gets
    the same id as its composed form. When two files map to one id, the first in path
    order is kept and the other is skipped. Names that are not valid UTF-8 are skipped.

    Args:
        source: images folder or UTF-8 text list file.

    Returns:
        InputListing; an empty folder gives an empty listing.

    Raises:
        FileNotFoundError: when `source` does not exist.
        PermissionError: when the source folder itself cannot be read.
        ValueError: when `source` is an image file itself or a list file that is not
            valid UTF-8 text.
    """
    source_path = Path(os.path.abspath(source))
    if not source_path.exists():
        raise FileNotFoundError(
            f"Input source not found: {str(source_path)!r}. Pass an images folder or a text "
            "file listing one image path per line."
        )

    if source_path.is_dir():
        candidates, skipped = _walk_folder(source_path)
    else:
        candidates, skipped = _read_list_file(source_path)

    entries, duplicates = _unique_entries(candidates)
    skipped.extend(duplicates)
    listing = InputListing(
        entries=entries,
        skipped=sorted(skipped, key=lambda item: (item.image_id, str(item.path))),
        source=source_path.as_posix(),
    )
    logger.info(
        "Found %d images in %s (%d files skipped).",
        len(listing.entries),
        listing.source,
        len(listing.skipped),
    )
    return listing


def _walk_folder(root: Path) -> tuple[list[ImageEntry], list[SkippedFile]]:
    """Collect candidate entries under `root`: real folders first, then symlinked ones."""
    candidates: list[ImageEntry] = []
    skipped: list[SkippedFile] = []
    visited: set[tuple[int, int]] = set()
    pending_links: list[Path] = []

    _walk_real_folders(root, root, visited, pending_links, candidates, skipped)

    while pending_links:
        pending_links.sort()
        link = pending_links.pop(0)
        try:
            target = link.stat()
        except OSError:
            skipped.append(SkippedFile(_relative_id(link, root), link, REASON_BROKEN_SYMLINK))
            continue

        if (target.st_dev, target.st_ino) in visited:
            logger.debug("Not following %s: its target is already listed.", link)
            skipped.append(SkippedFile(_relative_id(link, root), link, REASON_FOLDER_ALREADY_LISTED))
            continue

        _walk_real_folders(link, root, visited, pending_links, candidates, skipped)

    return candidates, skipped


def _walk_real_folders(
    start: Path,
    root: Path,
    visited: set[tuple[int, int]],
    pending_links: list[Path],
    candidates: list[ImageEntry],
    skipped: list[SkippedFile],
) -> None:
    """Walk `start` without following folder symlinks, which go to `pending_links`."""
    stack = [start]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
            children = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            if folder == root:
                raise PermissionError(
                    f"Cannot read the images folder {str(root)!r}: {error}. Check its permissions."
                ) from error
            logger.warning("Skipping unreadable folder %s: %s", folder, error)
            skipped.append(SkippedFile(_relative_id(folder, root), folder, REASON_UNREADABLE_FOLDER))
            continue

        if (info.st_dev, info.st_ino) in visited:
            continue
        visited.add((info.st_dev, info.st_ino))

        for child in children:
            if child.name.startswith("."):
                continue

            path = Path(child.path)
            if child.is_symlink() and child.is_dir(follow_symlinks=True):
                pending_links.append(path)
            elif child.is_dir(follow_symlinks=False):
                stack.append(path)
            else:
                _classify_file(path, _relative_id(path, root), candidates, skipped)


def _read_list_file(list_path: Path) -> tuple[list[ImageEntry], list[SkippedFile]]:
    """Collect candidate entries from a list file, one path per line."""
    if list_path.suffix.lower() in IMAGE_EXTENSIONS:
        raise ValueError(
            f"Input source {str(list_path)!r} is an image file. Pass its folder, or a text "
            "file that lists image paths one per line."
        )

    try:
        text = list_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"Input list file {str(list_path)!r} is not valid UTF-8 text ({error}). Pass a "
            "UTF-8 text file with one image path per line, or an images folder."
        ) from error

    base = Path(os.path.abspath(list_path.parent))
    candidates: list[ImageEntry] = []
    skipped: list[SkippedFile] = []
    seen: set[str] = set()

    for line in text.splitlines():
        entry_text = line.strip()
        if not entry_text or entry_text.startswith("#"):
            continue

        path = Path(os.path.normpath(base / entry_text))
        if str(path) in seen:
            continue
        seen.add(str(path))

        image_id = _list_entry_id(path, base)
        if not path.exists() and not path.is_symlink():
            skipped.append(SkippedFile(image_id, path, REASON_NOT_FOUND))
        elif path.is_dir():
            skipped.append(SkippedFile(image_id, path, REASON_LISTED_FOLDER))
        else:
            _classify_file(path, image_id, candidates, skipped)

    return candidates, skipped


def _classify_file(
    path: Path, image_id: str, candidates: list[ImageEntry], skipped: list[SkippedFile]
) -> None:
    """Append `path` to `candidates` when it is an image file, else to `skipped` with the reason."""
    reason = _skip_reason(path, image_id)
    if reason is None:
        candidates.append(ImageEntry(image_id, path))
    elif reason == REASON_INVALID_UTF8_NAME:
        printable_id = os.fsencode(image_id).decode("utf-8", errors="backslashreplace")
        skipped.append(SkippedFile(printable_id, path, reason))
    else:
        skipped.append(SkippedFile(image_id, path, reason))


def _skip_reason(path: Path, image_id: str) -> str | None:
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return REASON_INVALID_UTF8_NAME

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return REASON_BROKEN_SYMLINK if path.is_symlink() else REASON_NOT_FOUND

    if not stat.S_ISREG(mode):
        return REASON_NOT_REGULAR_FILE

    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return REASON_NOT_IMAGE_EXTENSION

    return None


def _unique_entries(candidates: list[ImageEntry]) -> tuple[list[ImageEntry], list[SkippedFile]]:
    """Sort by id; keep the first path per id and skip the others."""
    ordered = sorted(candidates, key=lambda entry: (entry.image_id, str(entry.path)))
    entries: list[ImageEntry] = []
    duplicates: list[SkippedFile] = []

    for entry in ordered:
        if entries and entries[-1].image_id == entry.image_id:
            logger.warning(
                "Skipping %s: image id %r is already used by %s.",
                entry.path,
                entry.image_id,
                entries[-1].path,
            )
            duplicates.append(SkippedFile(entry.image_id, entry.path, REASON_DUPLICATE_ID))
        else:
            entries.append(entry)

    return entries, duplicates


def _relative_id(path: Path, root: Path) -> str:
    return _normalise_id(path.relative_to(root).as_posix())


def _list_entry_id(path: Path, base: Path) -> str:
    if path.is_relative_to(base):
        return _normalise_id(path.relative_to(base).as_posix())
    return _normalise_id(path.as_posix())


def _normalise_id(image_id: str) -> str:
    # Names that are not valid UTF-8 carry surrogate escapes; leave them for _skip_reason.
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return image_id
    return unicodedata.normalize("NFC", image_id)
