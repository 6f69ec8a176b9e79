"""Benchmark caption parsing: cmsei's CaptionParser against the SceneGraphParser package.

Both parse the same captions with the same spaCy model, on one process. CaptionParser runs
`nlp.pipe` in batches with unused pipes excluded; SceneGraphParser (PyPI package
`SceneGraphParser`, module `sng_parser`) is called once per caption, as its API offers.
The script prints a Markdown report and writes it to docs/benchmarks-captions.md.

Run: .venv/bin/python benchmarks/bench_captions.py [--limit N] [--spacy-model NAME]
SceneGraphParser is in the `bench` extra: pip install SceneGraphParser.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import spacy  # noqa: E402

from extractors.captions import CaptionParser, read_captions  # noqa: E402
from extractors.captions.parser import default_model  # noqa: E402

logger = logging.getLogger("bench_captions")

SAMPLE_DATA = Path(os.environ.get("CMSEI_SAMPLE_DATA", REPO_ROOT.parent / "shared" / "data"))
DEFAULT_CAPTIONS = SAMPLE_DATA / "text" / "coco_precomp" / "testall_caps.txt"
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks-captions.md"
WARMUP_CAPTIONS = 50


@dataclass
class Measurement:
    """Throughput and yield of one parser over the measured captions."""

    name: str
    captions: int
    seconds: float
    load_seconds: float
    with_relation: int
    relations: int
    objects: int

    @property
    def captions_per_second(self) -> float:
        return self.captions / self.seconds


def measure_cmsei(texts: list[str], model: str, batch_size: int) -> Measurement:
    """Parse every caption with CaptionParser.parse_many and count the relations found."""
    started = time.perf_counter()
    parser = CaptionParser(model, batch_size=batch_size)
    list(parser.parse_many(texts[:WARMUP_CAPTIONS]))
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    parses = list(parser.parse_many(texts))
    seconds = time.perf_counter() - started
    return Measurement("cmsei CaptionParser (nlp.pipe)", len(texts), seconds, load_seconds,
                       sum(1 for parse in parses if parse.relations), sum(len(parse.relations) for parse in parses),
                       sum(len(parse.objects) for parse in parses))


def measure_scene_graph_parser(texts: list[str], model: str) -> Measurement:
    """Parse every caption with one SceneGraphParser.parse call each and count the relations found."""
    import sng_parser

    started = time.perf_counter()
    parser = sng_parser.Parser("spacy", model=model)
    for text in texts[:WARMUP_CAPTIONS]:
        parser.parse(text)
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    graphs = [parser.parse(text) for text in texts]
    seconds = time.perf_counter() - started
    return Measurement("SceneGraphParser (parse per caption)", len(texts), seconds, load_seconds,
                       sum(1 for graph in graphs if graph["relations"]), sum(len(graph["relations"]) for graph in graphs),
                       sum(len(graph["entities"]) for graph in graphs))


def format_report(results: list[Measurement], captions_path: Path, read_seconds: float, total: int,
                  model: str, command: str) -> str:
    """Render the measurements as a Markdown page."""
    cmsei, baseline = results
    lines = [
        "# Caption parsing benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"- Captions: {cmsei.captions:,} of the {total:,} in `{captions_path.name}`, the same captions for both "
        "parsers; reading and normalising the file took " + f"{read_seconds:.2f} s (not in the figures below).",
        f"- Machine: {platform.platform()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
        f"spaCy {spacy.__version__}, model `{model}`, one process.",
        "- Timed: parsing only, after loading the model and parsing "
        f"{WARMUP_CAPTIONS} warm-up captions (load column).",
        "",
        "| parser | captions/s | seconds | load s | captions with >= 1 relation | relations | objects |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        share = 100.0 * result.with_relation / result.captions
        lines.append(
            f"| {result.name} | {result.captions_per_second:,.0f} | {result.seconds:.1f} | {result.load_seconds:.1f} | "
            f"{result.with_relation:,} ({share:.1f} %) | {result.relations:,} | {result.objects:,} |"
        )
    speedup = cmsei.captions_per_second / baseline.captions_per_second
    lines += [
        "",
        f"Speed-up of CaptionParser over SceneGraphParser: {speedup:.2f}x.",
        "",
        "Objects are noun phrases for CaptionParser and noun-chunk entities for SceneGraphParser, so the two",
        "object counts are not the same measure. The figures come from one run on a shared machine and vary",
        "between runs.",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS, help="caption file (any supported format)")
    parser.add_argument("--limit", type=int, default=None, help="parse only the first N captions with both parsers")
    parser.add_argument("--spacy-model", default=None, help="spaCy model for both parsers (default: CaptionParser's)")
    parser.add_argument("--batch-size", type=int, default=256, help="nlp.pipe batch size of CaptionParser")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown report to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if not args.captions.is_file():
        logger.error("caption file not found: %s; set CMSEI_SAMPLE_DATA or pass --captions", args.captions)
        return 2
    model = args.spacy_model or default_model()

    started = time.perf_counter()
    table = read_captions(args.captions)
    read_seconds = time.perf_counter() - started
    texts = [record.text for record in table.records]
    if args.limit is not None:
        texts = texts[: args.limit]

    logger.info("parsing %d captions with CaptionParser", len(texts))
    cmsei = measure_cmsei(texts, model, args.batch_size)
    logger.info("parsing %d captions with SceneGraphParser", len(texts))
    baseline = measure_scene_graph_parser(texts, model)

    command = "python benchmarks/bench_captions.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = format_report([cmsei, baseline], args.captions, read_seconds, len(table.records), model,
                           command.strip())
    sys.stdout.write(report)
    write_atomic(args.output, report)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
