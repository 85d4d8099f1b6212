"""Run every benchmark: ``python benchmarks/run.py [--accelerator gpu]``.

Writes JSON and markdown under ``benchmarks/results`` and prints the tables. Not part of the
test suite: speed is measured here, as ratios against baselines run in the same process.
"""

from __future__ import annotations

import argparse

import generation_pbmc3k
import speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generation_pbmc3k.main(["--accelerator", args.accelerator, "--seed", str(args.seed)])
    n = "50000" if args.accelerator != "cpu" else "5000"
    speed.main(["--accelerator", args.accelerator, "--n-cells", n, "--n-sample", n])


if __name__ == "__main__":
    main()
