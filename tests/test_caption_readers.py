"""Tests of caption reading: format detection, the six formats, splits and normalisation.

Real files come from the sample data folder (CMSEI_SAMPLE_DATA, default ../shared/data);
those tests skip when it is absent. Everything else writes small files under tmp_path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extractors.captions import CaptionFormatError, normalize_caption, read_captions, truncate_caption

SAMPLE_DATA = Path(os.environ.get("CMSEI_SAMPLE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def sample_file(relative: str) -> Path:
    path = SAMPLE_DATA / relative
    if not path.is_file():
        pytest.skip(f"sample data file {path} not found; set CMSEI_SAMPLE_DATA")
    return path


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# Real files

def test_scan_precomp_real_file():
    table = read_captions(sample_file("text/coco_precomp/testall_caps.txt"))

    assert table.format == "scan"
    assert len(table.records) == 25000
    assert table.skipped == []
    assert len(table.image_ids()) == 5000
    assert table.records[0].image_id == "0"
    assert table.records[4].image_id == "0"
    assert table.records[5].image_id == "1"
    assert table.records[5].caption_index == 0
    assert table.records[-1].image_id == "4999"
    assert table.records[0].split == "testall"
    assert table.records[0].text == "A man with a red helmet on a small moped on a dirt road ."
    assert any("ordinal ids" in note for note in table.notes)


def test_scan_split_argument_overrides_prefix():
    table = read_captions(sample_file("text/coco_precomp/testall_caps.txt"), split="test")

    assert {record.split for record in table.records} == {"test"}


def test_coco_captions_real_file():
    table = read_captions(sample_file("text/captions_val2017.json"))

    assert table.format == "coco"
    assert len(table.records) == 25014
    assert table.skipped == []
    assert len(table.image_ids()) == 5000
    first = table.records[0]
    assert first.image_id == "000000179765.jpg"
    assert first.text == "A black Honda motorcycle parked in front of a garage."
    assert all("\n" not in record.text for record in table.records)
    assert all(record.text == record.text.strip() for record in table.records)


def test_flickr8k_token_real_file():
    table = read_captions(sample_file("text/flickr8k/Flickr8k.token.txt"))

    assert table.format == "flickr-token"
    assert len(table.records) == 40460
    quirk = [record for record in table.records if record.source_line == 6731]
    assert quirk[0].image_id == "2258277193_586949ec62.jpg"
    assert quirk[0].caption_index == 0
    assert any("name.jpg.N#k" in note and "6731" in note for note in table.notes)
    assert len(table.image_ids()) == 8092


def test_flickr8k_split_file():
    token_file = sample_file("text/flickr8k/Flickr8k.token.txt")
    split_file = sample_file("text/flickr8k/Flickr_8k.testImages.txt")

    table = read_captions(token_file, split="test", split_file=split_file)

    test_records = [record for record in table.records if record.split == "test"]
    assert len(test_records) == 5000
    assert len({record.image_id for record in test_records}) == 1000
    assert {record.split for record in table.records} == {"test", None}


def test_jsonl_real_file():
    table = read_captions(sample_file("captions.jsonl"))

    assert table.format == "jsonl"
    assert len(table.records) == 157 * 5
    assert table.records[0].image_id == "000000000139.jpg"
    assert [record.caption_index for record in table.records[:6]] == [0, 1, 2, 3, 4, 0]
    assert table.records[0].source_line == 1


# Karpathy split files

KARPATHY = {
    "dataset": "coco",
    "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
         "sentences": [{"raw": "A man riding a bike.", "tokens": ["a", "man"]}, {"raw": "  "}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "restval",
         "sentences": [{"raw": "Food on a plate."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000025.jpg", "split": "train",
         "sentences": [{"raw": "A giraffe eating leaves."}]},
    ],
}


def test_karpathy_ids_and_splits(tmp_path):
    path = write(tmp_path, "dataset_coco.json", json.dumps(KARPATHY))

    table = read_captions(path)

    assert table.format == "karpathy"
    assert [record.image_id for record in table.records] == [
        "val2014/COCO_val2014_000000391895.jpg", "train2014/COCO_train2014_000000000009.jpg",
        "train2014/COCO_train2014_000000000025.jpg"]
    assert [record.split for record in table.records] == ["test", "restval", "train"]
    assert len(table.skipped) == 1
    assert table.skipped[0].reason == "empty caption"
    assert table.skipped[0].caption_index == 1


def test_karpathy_without_filepath(tmp_path):
    data = {"images": [{"filename": "1000092795.jpg", "split": "train", "sentences": [{"raw": "Two young guys."}]}]}
    path = write(tmp_path, "dataset_flickr30k.json", json.dumps(data))

    table = read_captions(path)

    assert table.records[0].image_id == "1000092795.jpg"


def test_karpathy_split_selects(tmp_path):
    path = write(tmp_path, "dataset_coco.json", json.dumps(KARPATHY))

    table = read_captions(path, split="restval")

    assert [record.split for record in table.records] == ["restval"]
    assert any("kept split 'restval'" in note for note in table.notes)


def test_karpathy_unknown_split_raises(tmp_path):
    path = write(tmp_path, "dataset_coco.json", json.dumps(KARPATHY))

    with pytest.raises(ValueError, match="splits found"):
        read_captions(path, split="val")


def test_karpathy_split_file_rejected(tmp_path):
    path = write(tmp_path, "dataset_coco.json", json.dumps(KARPATHY))
    listing = write(tmp_path, "ids.txt", "a.jpg\n")

    with pytest.raises(ValueError, match="Karpathy"):
        read_captions(path, split="test", split_file=listing)


def test_karpathy_missing_raw_names_path(tmp_path):
    data = {"images": [{"filename": "a.jpg", "sentences": [{"raw": "ok"}, {"tokens": ["no", "raw"]}]}]}
    path = write(tmp_path, "dataset_flickr8k.json", json.dumps(data))

    with pytest.raises(CaptionFormatError) as error:
        read_captions(path)

    message = str(error.value)
    assert "dataset_flickr8k.json" in message
    assert "images[0].sentences[1]" in message
    assert "'raw'" in message


# COCO captions JSON

def test_coco_synthetic_maps_ids_and_skips_unknown(tmp_path):
    data = {
        "info": {}, "type": "captions",
        "images": [{"id": 7, "file_name": "000000000007.jpg"}, {"id": 9, "file_name": "000000000009.jpg"}],
        "annotations": [
            {"image_id": 9, "id": 1, "caption": "A dog."},
            {"image_id": 7, "id": 2, "caption": "A cat\non a mat."},
            {"image_id": 9, "id": 3, "caption": "A dog again."},
            {"image_id": 8, "id": 4, "caption": "Orphan caption."},
        ],
    }
    path = write(tmp_path, "captions_val.json", json.dumps(data))

    table = read_captions(path)

    assert [(r.image_id, r.caption_index) for r in table.records] == [
        ("000000000009.jpg", 0), ("000000000007.jpg", 0), ("000000000009.jpg", 1)]
    assert table.records[1].text == "A cat on a mat."
    assert len(table.skipped) == 1
    assert "image_id 8" in table.skipped[0].reason


def test_coco_missing_caption_field(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}
    path = write(tmp_path, "instances.json", json.dumps(data))

    with pytest.raises(CaptionFormatError) as error:
        read_captions(path)

    assert "annotations[0]" in str(error.value)
    assert "caption" in str(error.value)


def test_coco_caption_wrong_type(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": 5}]}
    path = write(tmp_path, "captions.json", json.dumps(data))

    with pytest.raises(CaptionFormatError, match=r"annotations\[0\]\.caption must be a string"):
        read_captions(path)


def test_malformed_json_names_position(tmp_path):
    path = write(tmp_path, "captions.json", '{"images": [{"id": 1, "file_name": "a.jpg"}],\n "annotations": [}\n')

    with pytest.raises(CaptionFormatError) as error:
        read_captions(path)

    message = str(error.value)
    assert "captions.json" in message
    assert "line 2" in message
    assert "column" in message


def test_unrecognised_json_raises(tmp_path):
    path = write(tmp_path, "other.json", json.dumps({"images": [{"id": 1}], "categories": []}))

    with pytest.raises(CaptionFormatError, match="format="):
        read_captions(path)


# JSON lines

def test_jsonl_single_caption_key_and_int_ids(tmp_path):
    lines = [json.dumps({"image": 12, "caption": "A red bus.", "extra": 1}), "",
             json.dumps({"image": "b.jpg", "captions": ["One.", "Two."]})]
    path = write(tmp_path, "caps.jsonl", "\n".join(lines) + "\n")

    table = read_captions(path)

    assert table.format == "jsonl"
    assert [(r.image_id, r.caption_index, r.source_line) for r in table.records] == [
        ("12", 0, 1), ("b.jpg", 0, 3), ("b.jpg", 1, 3)]


def test_jsonl_bad_line_names_line(tmp_path):
    lines = [json.dumps({"image": "a.jpg", "captions": ["ok"]}), '{"image": "b.jpg", "captions": ["x"',]
    path = write(tmp_path, "caps.jsonl", "\n".join(lines))

    with pytest.raises(CaptionFormatError, match="line 2"):
        read_captions(path)


def test_jsonl_missing_image_key(tmp_path):
    path = write(tmp_path, "caps.jsonl", json.dumps({"file": "a.jpg", "captions": ["x"]}) + "\n")

    with pytest.raises(CaptionFormatError, match="image_column="):
        read_captions(path, format="jsonl")


def test_jsonl_u2028_stays_one_caption(tmp_path):
    caption = "A dog\u2028on a\u00a0sofa\u2029next to a cat."
    lines = [json.dumps({"image": "a.jpg", "captions": [caption]}, ensure_ascii=False),
             json.dumps({"image": "b.jpg", "captions": ["Second image."]})]
    path = write(tmp_path, "caps.jsonl", "\n".join(lines) + "\n")

    table = read_captions(path)

    assert [record.text for record in table.records] == ["A dog on a sofa next to a cat.", "Second image."]
    assert table.records[1].source_line == 2


# Flickr token files

def test_flickr_token_duplicate_and_blank(tmp_path):
    content = "a.jpg#0\tFirst.\n\na.jpg#1\t   \na.jpg#0\tRepeated.\nb.jpg.1#0\tQuirk.\n"
    path = write(tmp_path, "results.token", content)

    table = read_captions(path)

    assert table.format == "flickr-token"
    assert [(r.image_id, r.caption_index, r.source_line) for r in table.records] == [
        ("a.jpg", 0, 1), ("b.jpg", 0, 5)]
    reasons = {skipped.reason for skipped in table.skipped}
    assert "empty caption" in reasons
    assert any("duplicate" in reason and "line 1" in reason for reason in reasons)


def test_flickr_token_malformed_line(tmp_path):
    path = write(tmp_path, "Flickr8k.token.txt", "a.jpg#0\tFine.\nthis line has no id\n")

    with pytest.raises(CaptionFormatError, match="line 2"):
        read_captions(path, format="flickr-token")


# SCAN precomp files

def test_scan_ids_per_image(tmp_path):
    write(tmp_path, "dev_ids.txt", "391895\n522418\n")
    path = write(tmp_path, "dev_caps.txt", "a\nb\nc\nd\n")

    table = read_captions(path, captions_per_image=2)

    assert [r.image_id for r in table.records] == ["391895", "391895", "522418", "522418"]
    assert [r.split for r in table.records] == ["dev"] * 4


def test_scan_ids_per_caption(tmp_path):
    write(tmp_path, "train_ids.txt", "5\n5\n5\n8\n")
    path = write(tmp_path, "train_caps.txt", "a\nb\nc\nd\n")

    table = read_captions(path, captions_per_image=2)

    assert [(r.image_id, r.caption_index) for r in table.records] == [("5", 0), ("5", 1), ("5", 2), ("8", 0)]


def test_scan_ids_count_mismatch(tmp_path):
    write(tmp_path, "test_ids.txt", "1\n2\n3\n")
    path = write(tmp_path, "test_caps.txt", "a\nb\nc\nd\n")

    with pytest.raises(CaptionFormatError, match="test_ids.txt"):
        read_captions(path, captions_per_image=2)


def test_scan_empty_line_keeps_alignment(tmp_path):
    path = write(tmp_path, "test_caps.txt", "one\n\nthree\nfour\r\n")

    table = read_captions(path, captions_per_image=2)

    assert [(r.image_id, r.caption_index, r.text) for r in table.records] == [
        ("0", 0, "one"), ("1", 0, "three"), ("1", 1, "four")]
    assert table.skipped[0].reason == "empty caption"
    assert table.skipped[0].source_line == 2


def test_scan_line_count_not_multiple(tmp_path):
    path = write(tmp_path, "test_caps.txt", "a\nb\nc\n")

    with pytest.raises(CaptionFormatError, match="captions_per_image"):
        read_captions(path, captions_per_image=2)


def test_scan_u2028_does_not_split_line(tmp_path):
    path = write(tmp_path, "test_caps.txt", "a dog\u2028on a sofa\nsecond\n")

    table = read_captions(path, captions_per_image=1)

    assert [r.text for r in table.records] == ["a dog on a sofa", "second"]


# CSV and TSV

def test_csv_quoted_multiline_field(tmp_path):
    content = 'image,caption,source\na.jpg,"A dog, running",x\nb.jpg,"Two\nlines",y\na.jpg,Third,z\n,orphan,w\n'
    path = write(tmp_path, "caps.csv", content)

    table = read_captions(path)

    assert table.format == "csv"
    assert [(r.image_id, r.caption_index, r.text, r.source_line) for r in table.records] == [
        ("a.jpg", 0, "A dog, running", 2), ("b.jpg", 0, "Two lines", 3), ("a.jpg", 1, "Third", 5)]
    assert table.skipped[0].source_line == 6
    assert "empty 'image'" in table.skipped[0].reason


def test_tsv_custom_columns_keep_quotes(tmp_path):
    content = 'file\ttext\nx.jpg\tA sign that says "stop"\ny.jpg\t\n'
    path = write(tmp_path, "caps.tsv", content)

    table = read_captions(path, image_column="file", caption_column="text")

    assert [r.text for r in table.records] == ['A sign that says "stop"']
    assert table.skipped[0].reason == "empty caption"
    assert table.skipped[0].image_id == "y.jpg"


def test_csv_missing_column_lists_found(tmp_path):
    path = write(tmp_path, "caps.csv", "img,sentence\na.jpg,hello\n")

    with pytest.raises(CaptionFormatError) as error:
        read_captions(path)

    assert "caption_column=" in str(error.value)
    assert "img" in str(error.value)


def test_csv_forced_missing_column(tmp_path):
    path = write(tmp_path, "caps.txt", "img,sentence\na.jpg,hello\n")

    with pytest.raises(CaptionFormatError, match="columns found"):
        read_captions(path, format="csv")


def test_csv_na_strings_stay_text(tmp_path):
    path = write(tmp_path, "caps.csv", "image,caption\nNA,None\n")

    table = read_captions(path)

    assert (table.records[0].image_id, table.records[0].text) == ("NA", "None")


# Encodings, normalisation, truncation, arguments

def test_bad_utf8_names_line_and_encoding(tmp_path):
    path = write(tmp_path, "test_caps.txt", b"fine line\ncaf\xe9 au lait\n")

    with pytest.raises(CaptionFormatError) as error:
        read_captions(path, captions_per_image=1)

    message = str(error.value)
    assert "test_caps.txt" in message
    assert "line 2" in message
    assert "encoding=" in message


def test_latin1_encoding_decodes(tmp_path):
    path = write(tmp_path, "test_caps.txt", b"fine line\ncaf\xe9 au lait\n")

    table = read_captions(path, captions_per_image=1, encoding="latin-1")

    assert table.records[1].text == "café au lait"


def test_unknown_encoding_raises(tmp_path):
    path = write(tmp_path, "test_caps.txt", "a\n")

    with pytest.raises(ValueError, match="unknown text encoding"):
        read_captions(path, captions_per_image=1, encoding="no-such-codec")


def test_utf8_bom_is_dropped(tmp_path):
    path = write(tmp_path, "caps.csv", "\ufeffimage,caption\na.jpg,hello\n")

    table = read_captions(path)

    assert table.records[0].image_id == "a.jpg"


def test_nfc_and_whitespace_folding(tmp_path):
    caption = "  Cafe\u0301\t\tterrace\r\nwith  \u00a0chairs\u2029 "
    path = write(tmp_path, "caps.jsonl", json.dumps({"image": "a.jpg", "captions": [caption]}) + "\n")

    table = read_captions(path)

    assert table.records[0].text == "Caf\u00e9 terrace with chairs"


def test_truncation_counted(tmp_path):
    long_caption = "word " * 50
    path = write(tmp_path, "caps.jsonl", json.dumps({"image": "a.jpg", "captions": [long_caption, "short"]}) + "\n")

    table = read_captions(path, max_chars=22)

    assert table.truncated == 1
    assert table.records[0].text == "word word word word"
    assert table.records[1].text == "short"
    assert any("truncated" in note for note in table.notes)


def test_split_file_labels_listed_images(tmp_path):
    path = write(tmp_path, "caps.csv", "image,caption\na.jpg,one\nb.jpg,two\n")
    listing = write(tmp_path, "val_images.txt", "b.jpg\nc.jpg\n")

    table = read_captions(path, split="val", split_file=listing)

    assert [(r.image_id, r.split) for r in table.records] == [("a.jpg", None), ("b.jpg", "val")]
    assert any("1 of the 2 ids" in note for note in table.notes)


def test_split_file_requires_split(tmp_path):
    path = write(tmp_path, "caps.csv", "image,caption\na.jpg,one\n")
    listing = write(tmp_path, "val_images.txt", "a.jpg\n")

    with pytest.raises(ValueError, match="split=NAME"):
        read_captions(path, split_file=listing)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        read_captions(tmp_path / "nothere.txt")


def test_unknown_format_raises(tmp_path):
    path = write(tmp_path, "caps.csv", "image,caption\na.jpg,one\n")

    with pytest.raises(ValueError, match="unknown caption format"):
        read_captions(path, format="xml")


def test_empty_file_raises(tmp_path):
    path = write(tmp_path, "caps.txt", " \n\n")

    with pytest.raises(CaptionFormatError, match="empty"):
        read_captions(path)


def test_tab_line_without_layout_raises(tmp_path):
    path = write(tmp_path, "caps.txt", "a.jpg\tsomething\n")

    with pytest.raises(CaptionFormatError, match="format="):
        read_captions(path)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_normalize_properties(text):
    normalised = normalize_caption(text)

    assert normalised == normalize_caption(normalised)
    assert "  " not in normalised
    assert normalised == normalised.strip()
    assert "\n" not in normalised
    assert "\u2028" not in normalised


@given(st.lists(st.text(alphabet="abcdé", min_size=1, max_size=8), min_size=1, max_size=12),
       st.integers(min_value=1, max_value=40))
def test_truncate_properties(words, max_chars):
    text = " ".join(words)

    cut, was_cut = truncate_caption(text, max_chars)

    assert len(cut) <= max_chars
    assert was_cut == (len(text) > max_chars)
    assert text.startswith(cut)
    if was_cut and " " in text[:max_chars]:
        assert text[len(cut)] == " "
