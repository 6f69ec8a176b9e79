"""The ``cmsei-prep`` command line: one subcommand per stage or tool.

Each subcommand lives in ``pipeline/commands/<name>.py`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``; this module only dispatches and
turns expected errors into one-line messages with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline import __version__

logger = logging.getLogger("cmsei")

COMMANDS = ("synth", "extract", "captions", "parse", "graphs", "train-relations", "show", "inspect", "verify",
            "import", "export")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(prog="cmsei-prep", description="Prepare image-sentence retrieval datasets.")
    parser.add_argument("--version", action="version", version=f"cmsei {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        module_name = "pipeline.commands." + name.replace("-", "_")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue
            raise
        module.add_parser(subparsers)
        subparsers.choices[name].set_defaults(run=module.run)
    return parser


def setup_logging(verbose: bool) -> None:
    """Log to stderr with time, level and module."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cmsei-prep``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        logger.error("interrupted; rerun the same command to resume")
        return 130
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as error:
        if args.verbose:
            logger.exception("%s failed", args.command)
        else:
            logger.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
