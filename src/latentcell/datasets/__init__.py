"""Real counts that ship with scanpy, and seeded synthetic counts with a known truth."""

from latentcell.datasets._pbmc import pbmc68k_counts
from latentcell.datasets._synthetic import synthetic_counts, synthetic_perturbation

__all__ = ["pbmc68k_counts", "synthetic_counts", "synthetic_perturbation"]
