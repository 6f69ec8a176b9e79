"""Tests for pipeline.inputs.discover_images on real folders, symlinks and list files."""

from __future__ import annotations

import hashlib
import logging
import os
import unicodedata
from pathlib import Path

import pytest

import imagecases
from pipeline.inputs import (
    REASON_BROKEN_SYMLINK,
    REASON_DUPLICATE_ID,
    REASON_FOLDER_ALREADY_LISTED,
    REASON_INVALID_UTF8_NAME,
    REASON_LISTED_FOLDER,
    REASON_NOT_FOUND,
    REASON_NOT_IMAGE_EXTENSION,
    ImageEntry,
    InputListing,
    discover_images,
)

logger = logging.getLogger(__name__)


def entry_ids(listing: InputListing) -> list[str]:
    return [entry.image_id for entry in listing.entries]


def skipped_reasons(listing: InputListing) -> dict[str, str]:
    return {item.image_id: item.reason for item in listing.skipped}


def touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    imagecases.write_two_colour_image(path, 4, 4)
    return path


@pytest.fixture()
def bad_inputs(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    folder = tmp_path / "images"
    return folder, imagecases.write_bad_inputs(folder)


def test_folder_listing_matches_cases(bad_inputs):
    folder, expected = bad_inputs

    listing = discover_images(folder)

    listed = {image_id: "entry" for image_id in entry_ids(listing)}
    listed.update({image_id: imagecases.SKIPPED for image_id in skipped_reasons(listing)})
    assert set(listed) == set(expected)
    for image_id, outcome in expected.items():
        if outcome == imagecases.SKIPPED:
            assert listed[image_id] == imagecases.SKIPPED, image_id
        else:
            assert listed[image_id] == "entry", image_id


def test_entries_sorted_and_unique(bad_inputs):
    folder, _ = bad_inputs

    listing = discover_images(folder)

    ids = entry_ids(listing)
    assert ids == sorted(ids)
    assert len(ids) == len(set(ids))
    assert "a.jpg" in ids
    assert "a.png" in ids
    assert "nested/deep/inner.png" in ids
    assert "UPPER.JPG" in ids


def test_paths_are_absolute_and_exist(bad_inputs, monkeypatch):
    folder, _ = bad_inputs
    monkeypatch.chdir(folder.parent)

    listing = discover_images("images")

    assert listing.source == folder.resolve().as_posix()
    for entry in listing.entries:
        assert entry.path.is_absolute(), entry.image_id
        assert entry.path.is_file(), entry.image_id


def test_non_images_skipped_with_reason(bad_inputs):
    folder, _ = bad_inputs

    reasons = skipped_reasons(discover_images(folder))

    assert reasons["notes.txt"] == REASON_NOT_IMAGE_EXTENSION
    assert reasons["meta.json"] == REASON_NOT_IMAGE_EXTENSION


def test_hidden_files_and_folders_ignored(tmp_path):
    touch_image(tmp_path / "visible.jpg")
    touch_image(tmp_path / ".hidden.jpg")
    touch_image(tmp_path / ".cache" / "inside.jpg")
    (tmp_path / ".notes.txt").write_text("hidden", encoding="utf-8")

    listing = discover_images(tmp_path)

    assert entry_ids(listing) == ["visible.jpg"]
    assert listing.skipped == []


def test_symlinked_file_keeps_link_path(bad_inputs):
    folder, _ = bad_inputs

    listing = discover_images(folder)

    link = next(entry for entry in listing.entries if entry.image_id == "link_to_a.jpg")
    assert link.path == folder.resolve() / "link_to_a.jpg"
    assert link.path.is_symlink()


def test_broken_symlink_skipped(tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")

    listing = discover_images(tmp_path)

    assert listing.entries == []
    assert skipped_reasons(listing) == {"dangling.jpg": REASON_BROKEN_SYMLINK}


def test_symlink_loop_followed_once(tmp_path):
    touch_image(tmp_path / "sub" / "one.jpg")
    os.symlink("..", tmp_path / "sub" / "up")
    os.symlink("sub", tmp_path / "again")

    listing = discover_images(tmp_path)

    assert entry_ids(listing) == ["sub/one.jpg"]
    reasons = skipped_reasons(listing)
    assert reasons == {"again": REASON_FOLDER_ALREADY_LISTED, "sub/up": REASON_FOLDER_ALREADY_LISTED}


def test_real_folder_wins_over_link(tmp_path):
    touch_image(tmp_path / "zeta" / "one.jpg")
    os.symlink("zeta", tmp_path / "alpha_link")

    listing = discover_images(tmp_path)

    assert entry_ids(listing) == ["zeta/one.jpg"]


def test_symlinked_outside_folder_listed_under_link(tmp_path):
    outside = tmp_path / "outside"
    touch_image(outside / "far.png")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "linked")

    listing = discover_images(root)

    assert entry_ids(listing) == ["linked/far.png"]
    assert listing.entries[0].path == root.resolve() / "linked" / "far.png"


def test_unicode_names_are_nfc(tmp_path):
    decomposed = unicodedata.normalize("NFD", "café_日本.jpg")
    touch_image(tmp_path / decomposed)

    listing = discover_images(tmp_path)

    assert entry_ids(listing) == [unicodedata.normalize("NFC", "café_日本.jpg")]
    assert listing.entries[0].path.name == decomposed
    assert listing.entries[0].path.is_file()


def test_nfc_collision_skips_second(tmp_path):
    composed = unicodedata.normalize("NFC", "café.jpg")
    decomposed = unicodedata.normalize("NFD", "café.jpg")
    touch_image(tmp_path / composed)
    touch_image(tmp_path / decomposed)

    listing = discover_images(tmp_path)

    assert entry_ids(listing) == [composed]
    assert [item.reason for item in listing.skipped] == [REASON_DUPLICATE_ID]
    assert {listing.entries[0].path.name, listing.skipped[0].path.name} == {composed, decomposed}


def test_invalid_utf8_name_skipped(tmp_path):
    raw_name = os.fsencode(tmp_path) + b"/bad\xff.jpg"
    with open(raw_name, "wb") as handle:
        handle.write(b"data")

    listing = discover_images(tmp_path)

    assert listing.entries == []
    assert skipped_reasons(listing) == {"bad\\xff.jpg": REASON_INVALID_UTF8_NAME}


def test_missing_source_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="Input source not found") as raised:
        discover_images(tmp_path / "absent")

    assert "absent" in str(raised.value)


def test_empty_folder_gives_empty_listing(tmp_path):
    listing = discover_images(tmp_path)

    assert listing.entries == []
    assert listing.skipped == []
    assert listing.listing_digest() == hashlib.sha256(b"").hexdigest()


def test_list_file_entries(tmp_path):
    base = tmp_path / "lists"
    touch_image(base / "imgs" / "one.jpg")
    touch_image(base / "two.png")
    outside = touch_image(tmp_path / "elsewhere" / "three.jpg")
    (base / "folder_entry").mkdir()
    (base / "readme.txt").write_text("text", encoding="utf-8")
    list_path = base / "inputs.txt"
    list_path.write_text(
        "\n".join(
            [
                "# images for the run",
                "imgs/one.jpg",
                "",
                "   two.png   ",
                str(base / "imgs" / "one.jpg"),
                "./imgs/one.jpg",
                str(outside),
                "missing.jpg",
                "folder_entry",
                "readme.txt",
            ]
        )
        + "\n",
        encoding="utf-8",
    )

    listing = discover_images(list_path)

    assert entry_ids(listing) == sorted(["imgs/one.jpg", "two.png", outside.as_posix()])
    assert skipped_reasons(listing) == {
        "missing.jpg": REASON_NOT_FOUND,
        "folder_entry": REASON_LISTED_FOLDER,
        "readme.txt": REASON_NOT_IMAGE_EXTENSION,
    }
    assert listing.source == list_path.as_posix()


def test_list_file_parent_path_gets_absolute_id(tmp_path):
    image = touch_image(tmp_path / "up.jpg")
    list_path = tmp_path / "lists" / "inputs.txt"
    list_path.parent.mkdir()
    list_path.write_text("../up.jpg\n", encoding="utf-8")

    listing = discover_images(list_path)

    assert entry_ids(listing) == [image.as_posix()]


def test_list_file_with_bom(tmp_path):
    touch_image(tmp_path / "one.jpg")
    list_path = tmp_path / "inputs.txt"
    list_path.write_bytes("\ufeffone.jpg\r\n".encode("utf-8"))

    assert entry_ids(discover_images(list_path)) == ["one.jpg"]


def test_list_file_bad_utf8_raises(tmp_path):
    list_path = tmp_path / "inputs.txt"
    list_path.write_bytes(b"one.jpg\n\xff\xfe.jpg\n")

    with pytest.raises(ValueError, match="not valid UTF-8"):
        discover_images(list_path)


def test_image_as_source_raises(tmp_path):
    image = touch_image(tmp_path / "single.jpg")

    with pytest.raises(ValueError, match="is an image file"):
        discover_images(image)


def test_digest_ignores_order_and_source(tmp_path):
    for name in ("b.jpg", "a.jpg", "c/d.png"):
        touch_image(tmp_path / "images" / name)
    list_path = tmp_path / "images" / "list.txt"
    list_path.write_text("c/d.png\nb.jpg\na.jpg\n", encoding="utf-8")

    from_list = discover_images(list_path)
    (tmp_path / "images" / "list.txt").unlink()
    from_folder = discover_images(tmp_path / "images")

    assert entry_ids(from_list) == entry_ids(from_folder)
    assert from_list.listing_digest() == from_folder.listing_digest()


def test_digest_changes_with_listing(tmp_path):
    touch_image(tmp_path / "a.jpg")
    before = discover_images(tmp_path).listing_digest()
    assert discover_images(tmp_path).listing_digest() == before

    touch_image(tmp_path / "b.jpg")
    after = discover_images(tmp_path).listing_digest()

    assert after != before
    assert len(after) == 64


def test_digest_separates_ids():
    joined = InputListing(entries=[], skipped=[], source="x")
    split = InputListing(entries=[], skipped=[], source="x")

    joined.entries.append(ImageEntry("ab.jpg", Path("/ab.jpg")))
    split.entries.extend([ImageEntry("a", Path("/a")), ImageEntry("b.jpg", Path("/b.jpg"))])

    assert joined.listing_digest() != split.listing_digest()


def test_real_sample_images_listed(sample_data):
    images = sample_data / "images"
    if not images.is_dir():
        pytest.skip(f"images folder not found in {sample_data}; set CMSEI_SAMPLE_DATA")

    listing = discover_images(images)

    assert len(listing.entries) == 157
    assert all(entry.image_id.endswith(".jpg") for entry in listing.entries)
    assert listing.skipped == []
