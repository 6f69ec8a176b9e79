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
    captions: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0
    with_relation: int = 0
    relations: int = 0
    objects: int = 0

    @property
    def captions_per_second(self) -> float:
        return self.captions / self.seconds

    def add(self, seconds: float, relation_counts: list[int], object_count: int) -> None:
        """Add the figures of one timed chunk of captions."""
        self.captions += len(relation_counts)
        self.seconds += seconds
        self.with_relation += sum(1 for count in relation_counts if count)
        self.relations += sum(relation_counts)
        self.objects += object_count


class CmseiRunner:
    """CaptionParser.parse_many over each chunk, in nlp.pipe batches."""

    def __init__(self, model: str, batch_size: int, warmup: list[str]) -> None:
        started = time.perf_counter()
        self.parser = CaptionParser(model, batch_size=batch_size)
        list(self.parser.parse_many(warmup))
        self.result = Measurement("cmsei CaptionParser (nlp.pipe)", load_seconds=time.perf_counter() - started)

    def run(self, texts: list[str]) -> None:
        started = time.perf_counter()
        parses = list(self.parser.parse_many(texts))
        seconds = time.perf_counter() - started
        self.result.add(seconds, [len(parse.relations) for parse in parses], sum(len(p.objects) for p in parses))


class SceneGraphRunner:
    """SceneGraphParser.parse once per caption, as its API offers."""

    def __init__(self, model: str, warmup: list[str]) -> None:
        import sng_parser

        started = time.perf_counter()
        self.parser = sng_parser.Parser("spacy", model=model)
        for text in warmup:
            self.parser.parse(text)
        self.result = Measurement("SceneGraphParser (parse per caption)", load_seconds=time.perf_counter() - started)

    def run(self, texts: list[str]) -> None:
        started = time.perf_counter()
        graphs = [self.parser.parse(text) for text in texts]
        seconds = time.perf_counter() - started
        self.result.add(seconds, [len(graph["relations"]) for graph in graphs],
                        sum(len(graph["entities"]) for graph in graphs))


def measure(texts: list[str], model: str, batch_size: int, chunk_size: int) -> list[Measurement]:
    """Time both parsers on the same captions, alternating chunk by chunk.

    Alternating spreads the load of other processes on a shared machine over both parsers,
    so the ratio of their throughputs is steadier than with one long run each.
    """
    warmup = texts[:WARMUP_CAPTIONS]
    runners = [CmseiRunner(model, batch_size, warmup), SceneGraphRunner(model, warmup)]
    for start in range(0, len(texts), chunk_size):
        chunk = texts[start:start + chunk_size]
        for runner in runners:
            runner.run(chunk)
        logger.info("parsed %d of %d captions with both parsers", start + len(chunk), len(texts))
    return [runner.result for runner in runners]


def format_report(results: list[Measurement], captions_path: Path, read_seconds: float, total: int,
                  model: str, command: str, chunk_size: int, load_averages: tuple[float, float]) -> str:
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
        f"{WARMUP_CAPTIONS} warm-up captions (load column). The parsers alternate on chunks of "
        f"{chunk_size:,} captions.",
        f"- 1-minute load average of the machine: {load_averages[0]:.1f} at the start, {load_averages[1]:.1f} "
        "at the end (other processes shared the CPUs).",
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
    parser.add_argument("--chunk-size", type=int, default=1000,
                        help="captions per alternation between the two parsers")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown report to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.chunk_size < 1 or (args.limit is not None and args.limit < 1):
        logger.error("--chunk-size and --limit must be at least 1")
        return 2
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

    load_at_start = os.getloadavg()[0]
    results = measure(texts, model, args.batch_size, args.chunk_size)
    load_averages = (load_at_start, os.getloadavg()[0])

    command = "python benchmarks/bench_captions.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = format_report(results, args.captions, read_seconds, len(table.records), model, command.strip(),
                           args.chunk_size, load_averages)
    sys.stdout.write(report)
    write_atomic(args.output, report)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
