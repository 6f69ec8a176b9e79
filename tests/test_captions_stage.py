"""The captions stage end to end: real caption files, the real spaCy model, real Ray and HDF5."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from extractors.captions.records import CaptionFormatError
from extractors.captions.vocab import Vocabulary
from pipeline.caption_shards import CaptionShard
from pipeline.captions_stage import CaptionsOptions, build_captions
from pipeline.cli import main
from pipeline.inspect import inspect_dataset, verify_dataset
from pipeline.ray_runner import RayOptions

CAPTIONS = [
    {"image": "a.jpg", "captions": ["a man riding on a bike", "", "a dog that is sitting on a couch next to a pillow"]},
    {"image": "b.jpg", "captions": ["the lamp is on top of the cabinet", "   ", "A cat sleeping\non a sofa."]},
    {"image": "c.jpg", "captions": ["a frisbee is caught by a dog"]},
]


def _write_jsonl(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries), encoding="utf-8")
    return path


def _options(captions: Path, out: Path, **kwargs) -> CaptionsOptions:
    return CaptionsOptions(captions=captions, out=out, ray=RayOptions(workers=1, cpus_per_worker=1), **kwargs)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, ray_local):
    folder = tmp_path_factory.mktemp("captions")
    captions = _write_jsonl(folder / "captions.jsonl", CAPTIONS)
    out = folder / "data"
    summary = build_captions(_options(captions, out, shard_size=3, split="train", vocab_threshold=1))
    return out, summary


def test_counts_and_skips(small_run):
    out, summary = small_run
    index = pd.read_parquet(out / "captions" / "index.parquet")

    assert summary.captions == 5
    assert summary.skipped == 2
    skipped = index[index["status"] == "skipped"]
    assert sorted(zip(skipped["image_id"], skipped["caption_index"])) == [("a.jpg", 1), ("b.jpg", 1)]
    assert all("empty" in reason for reason in skipped["reason"])
    assert summary.shards_total == 2


def test_shards_hold_parses_in_file_order(small_run):
    out, _ = small_run
    with CaptionShard(out / "captions" / "captions-00000.h5") as shard:
        assert shard.image_ids == ["a.jpg", "a.jpg", "b.jpg"]
        assert shard.texts[0] == "a man riding on a bike"
        tokens = shard.tokens(0)
        assert tokens["lower"][:2] == ["a", "man"]
        assert len(tokens["head"]) == len(tokens["text"])
        objects = shard.objects(0)
        relations = shard.relations(0)
        triples = [(objects[r["subject"]]["head_lemma"], r["predicate"], objects[r["object"]]["head_lemma"])
                   for r in relations]
        assert ("man", "ride on", "bike") in triples
        lamp = shard.relations(2)
        lamp_objects = shard.objects(2)
        assert [(lamp_objects[r["subject"]]["head_lemma"], r["predicate"]) for r in lamp] == [("lamp", "on top of")]


def test_newline_caption_parses_like_space(small_run):
    out, _ = small_run
    with CaptionShard(out / "captions" / "captions-00001.h5") as shard:
        row = shard.texts.index("A cat sleeping on a sofa.")
        assert shard.tokens(row)["text"] == ["A", "cat", "sleeping", "on", "a", "sofa", "."]


def test_vocabulary_and_inspect(small_run):
    out, _ = small_run
    vocab = Vocabulary.load(out / "captions" / "vocab.json")
    assert vocab.word_to_id("<pad>") == 0
    assert "lamp" in vocab

    stage = inspect_dataset(out)["stages"]["captions"]
    assert stage["captions"] == 5
    assert stage["captions_skipped"] == 2
    assert stage["relations"] >= 4
    assert stage["splits"] == {"train": 5}
    assert verify_dataset(out) == {"captions": []}


def test_rerun_reuses_shards(small_run, ray_local):
    out, _ = small_run
    shard = out / "captions" / "captions-00000.h5"
    mtime = shard.stat().st_mtime_ns
    summary = build_captions(_options(out.parent / "captions.jsonl", out, shard_size=3, split="train", vocab_threshold=1))
    assert summary.shards_written == 0
    assert shard.stat().st_mtime_ns == mtime


def test_scan_vocabulary_keeps_ids(sample_data, tmp_path, ray_local):
    captions = _write_jsonl(tmp_path / "c.jsonl", CAPTIONS)
    scan_vocab = sample_data / "labels" / "coco_precomp_vocab.json"
    build_captions(_options(captions, tmp_path / "data", vocab_file=scan_vocab))
    loaded = Vocabulary.load(tmp_path / "data" / "captions" / "vocab.json")
    assert loaded == Vocabulary.load(scan_vocab)


def test_bad_utf8_is_one_line_error(tmp_path, caplog):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"image": "a.jpg", "captions": ["caf\xe9 au lait"]}\n')
    with pytest.raises(CaptionFormatError, match="line 1"):
        build_captions(_options(bad, tmp_path / "data"))
    assert main(["captions", "--captions", str(bad), "--out", str(tmp_path / "data")]) == 2


def test_real_captions_link_to_regions(sample_data, tmp_path, ray_local):
    out = tmp_path / "data"
    regions = out / "regions"
    regions.mkdir(parents=True)
    (regions / "manifest.json").write_text("{}", encoding="utf-8")
    ids = [json.loads(line)["image"] for line in (sample_data / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    pd.DataFrame({"image_id": ids[:-1], "status": "ok"}).to_parquet(regions / "index.parquet")

    summary = build_captions(_options(sample_data / "captions.jsonl", out))
    assert summary.captions == 5 * len(ids)
    assert summary.skipped == 0
    assert summary.unmatched_images == 1
