"""Run every benchmark: ``python benchmarks/run.py [--device cuda|cpu]``.

``--device cuda`` is the same as ``--accelerator gpu`` (and ``--device cpu`` as
``--accelerator cpu``); either is passed on to every benchmark: generation on pbmc3k, speed,
perturbation of a held-out cell type on Kang 2018 and Tal1 (seeds 0-2) and on synthetic
data, RNA -> protein translation on CITE-seq, generation at unseen times and imputation of
an unmeasured tissue region (seeds 0-2), and memory against the number of cells (10k, 100k).
Writes JSON and markdown under
``benchmarks/results`` and prints the tables. Not part of the test suite: speed is measured
here, as ratios against baselines run in the same process.
"""

from __future__ import annotations

import argparse

import generation_pbmc3k
import perturbation_celltype
import perturbation_synthetic
import scale
import spatial_imputation
import speed
import time_trajectory
import translation_citeseq
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
    for dataset in ("kang", "tal1"):
        perturbation_celltype.main(
            ["--accelerator", accelerator, "--dataset", dataset, "--seeds", "0", "1", "2"]
        )
    perturbation_synthetic.main(["--accelerator", accelerator, "--seed", str(args.seed)])
    translation_citeseq.main(["--accelerator", accelerator, "--seeds", "0", "1", "2"])
    time_trajectory.main(["--accelerator", accelerator, "--seeds", "0", "1", "2"])
    spatial_imputation.main(["--accelerator", accelerator, "--seeds", "0", "1", "2"])
    scale.main(["--accelerator", accelerator])


if __name__ == "__main__":
    main()
