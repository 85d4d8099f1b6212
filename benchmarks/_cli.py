"""Command-line options shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

#: The shared datasets (``../shared/data`` beside the repository, or ``$LATENTCELL_DATA``).
DATA_DIR = Path(
    os.environ.get(
        "LATENTCELL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
)

#: ``--device`` value -> Lightning accelerator.
DEVICE_TO_ACCELERATOR = {"cuda": "gpu", "cpu": "cpu"}


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--accelerator`` (Lightning's name) and its alias ``--device cuda|cpu``."""
    parser.add_argument(
        "--accelerator", default=None, help="Lightning accelerator (cpu, gpu, ...); default cpu"
    )
    parser.add_argument(
        "--device",
        choices=sorted(DEVICE_TO_ACCELERATOR),
        default=None,
        help="torch-style alias of --accelerator: cuda (= gpu) or cpu",
    )


def resolve_accelerator(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Accelerator named by ``--accelerator`` or ``--device`` (they must agree); default cpu."""
    from_device = DEVICE_TO_ACCELERATOR[args.device] if args.device else None
    if args.accelerator and from_device and args.accelerator != from_device:
        parser.error(
            f"--device {args.device} means --accelerator {from_device}, "
            f"but --accelerator {args.accelerator} was given"
        )
    args.accelerator = args.accelerator or from_device or "cpu"
    return args.accelerator


def write_results(out_dir: str | Path, name: str, results: dict, table: str) -> None:
    """Write ``<name>.json`` (the results) and ``<name>.md`` (the table) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{name}.md").write_text(table + "\n")
