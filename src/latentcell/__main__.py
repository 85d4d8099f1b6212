"""Command line: ``latentcell demo`` (also ``python -m latentcell demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``latentcell`` console script."""
    parser = argparse.ArgumentParser(prog="latentcell", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train on real counts, generate every cell type, write AnnData, figure, metrics",
    )
    demo.add_argument("--data", help=".h5ad file of counts (default: scanpy's pbmc68k counts)")
    demo.add_argument(
        "--layer", help="layer holding counts (default: .X, or 'counts' for the bundled data)"
    )
    demo.add_argument("--labels-key", help="obs column of cell labels")
    demo.add_argument("--out", default="latentcell_demo", help="output folder")
    demo.add_argument("--max-epochs", type=int, help="maximum epochs of each stage")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from latentcell._demo import run_demo

        run_demo(
            data=args.data,
            layer=args.layer,
            labels_key=args.labels_key,
            out=args.out,
            max_epochs=args.max_epochs,
            seed=args.seed,
            progress_bar=not args.no_progress,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
