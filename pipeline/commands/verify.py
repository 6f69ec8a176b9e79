"""``cmsei-prep verify``: check every shard of a dataset folder; non-zero exit on any fault."""

from __future__ import annotations

import argparse
import logging

from pipeline.inspect import verify_dataset

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("verify", help="check schemas, offsets, counts and readability of every shard")
    parser.add_argument("data", help="dataset folder")


def run(args: argparse.Namespace) -> int:
    problems = verify_dataset(args.data)
    if not problems:
        logger.error("%s contains no stage to verify; run `cmsei-prep extract` first", args.data)
        return 1

    faults = 0
    for stage, stage_problems in problems.items():
        for problem in stage_problems:
            logger.error("%s: %s", stage, problem)
        faults += len(stage_problems)
        if not stage_problems:
            logger.info("%s: ok", stage)
    if faults:
        logger.error("verify found %d faults in %s", faults, args.data)
        return 1
    logger.info("verify: all stages of %s are sound", args.data)
    return 0
