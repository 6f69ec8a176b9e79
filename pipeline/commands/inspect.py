"""``cmsei-prep inspect``: print what a dataset folder holds, stage by stage."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.inspect import inspect_dataset

MAX_LISTED = 20


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="print image, region, caption and graph counts of a dataset folder")
    parser.add_argument("data", help="dataset folder")
    parser.add_argument("--json", action="store_true", help="print the full summary as JSON")


def run(args: argparse.Namespace) -> int:
    summary = inspect_dataset(args.data)
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(format_summary(summary))
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    """Render the summary as readable text: scalar counts, then listed failures."""
    lines = [f"dataset {summary['dataset']}"]
    if not summary["stages"]:
        lines.append("  no stage has run here yet")
    for stage, figures in summary["stages"].items():
        lines.append(f"{stage}:")
        for key, value in figures.items():
            if isinstance(value, list):
                lines.append(f"  {key}: {len(value)}")
                for item in value[:MAX_LISTED]:
                    lines.append(f"    - {_format_item(item)}")
                if len(value) > MAX_LISTED:
                    lines.append(f"    ... {len(value) - MAX_LISTED} more (use --json)")
            elif isinstance(value, dict):
                inner = ", ".join(f"{k}={v}" for k, v in value.items())
                lines.append(f"  {key}: {inner}")
            else:
                lines.append(f"  {key}: {value}")
    return "\n".join(lines) + "\n"


def _format_item(item: Any) -> str:
    if isinstance(item, dict) and "image_id" in item:
        return f"{item['image_id']}: {item.get('reason', '')}"
    return str(item)
