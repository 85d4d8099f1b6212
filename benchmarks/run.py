"""Run every benchmark: ``python benchmarks/run.py [--device cuda|cpu]``.

``--device cuda`` is the same as ``--accelerator gpu`` (and ``--device cpu`` as
``--accelerator cpu``); either is passed on to every benchmark: generation on pbmc3k, speed,
perturbation on Kang 2018 (seeds 0-2) and on synthetic data. Writes JSON and markdown under
``benchmarks/results`` and prints the tables. Not part of the test suite: speed is measured
here, as ratios against baselines run in the same process.
"""

from __future__ import annotations

import argparse

import generation_pbmc3k
import perturbation_kang
import perturbation_synthetic
import speed
from _cli import add_device_arguments, resolve_accelerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    accelerator = resolve_accelerator(parser, args)
    generation_pbmc3k.main(["--accelerator", accelerator, "--seed", str(args.seed)])
    n = "50000" if accelerator != "cpu" else "5000"
    speed.main(["--accelerator", accelerator, "--n-cells", n, "--n-sample", n])
    perturbation_kang.main(["--accelerator", accelerator, "--seeds", "0", "1", "2"])
    perturbation_synthetic.main(["--accelerator", accelerator, "--seed", str(args.seed)])


if __name__ == "__main__":
    main()
