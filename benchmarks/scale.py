"""Memory and time against the number of cells: backed training, encoding and streamed sampling.

For each size N (``--sizes``, default 10k and 100k cells; add 1000000 for a million), synthetic
counts with realistic sparsity (2000 genes, gamma-Poisson around log-normal gene means, about
10% non-zero, ~1,500 counts per cell) are written to an ``.h5ad`` on disk block by block. Each
(mode, N) then runs in a fresh Python process, which reports the peak resident memory of
each phase above the memory it had after importing everything (polled every 10 ms from
``/proc/self/statm``) and its seconds:

- ``backed`` (latentcell's path for data that does not fit in memory): the file opened with
  ``backed="r"``; ``setup_anndata`` (counts checked block by block); the VAE stage for
  ``--steps`` minibatches of 128 through scvi-tools' ``AnnDataLoader``; encoding every cell
  (``get_latent_representation``); one epoch of the flow; then ``sample(N, out_path=...)``,
  N cells streamed to an ``.h5ad`` (midpoint, ``--n-steps`` steps);
- ``in memory`` (the baseline): the same file read whole (``ad.read_h5ad``), the same steps,
  sampling into memory.

Ratios printed: each phase's memory against the smallest N of the same mode (flat means
bounded by the batch), seconds per cell against the smallest N (constant means linear time),
and backed against in-memory memory at the same N.

The in-memory baseline is skipped above ``--in-memory-max`` cells (default 100k): a million
cells read whole would need more memory than the 24 GiB machines this runs on.

Usage: ``python benchmarks/scale.py [--sizes 10000 100000 1000000] [--steps 200]``.
Writes ``results/scale.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import write_results

PAGE = os.sysconf("SC_PAGE_SIZE")
PHASES = ("setup", "vae", "encode", "flow", "sample")


def write_counts(path: Path, n_cells: int, n_genes: int = 2000, seed: int = 0) -> None:
    """Write synthetic counts to ``path`` in blocks of 20k cells (CSR ``X``)."""
    import anndata as ad
    import h5py
    from anndata.io import sparse_dataset, write_elem
    from scipy import sparse

    rng = np.random.default_rng(seed)
    means = np.exp(rng.normal(-2.6, 1.6, n_genes))
    means *= 1500 / means.sum()
    labels = rng.integers(0, 5, n_cells)
    skeleton = ad.AnnData(
        sparse.csr_matrix((n_cells, n_genes), dtype=np.float32),
        obs={"cell_type": np.asarray([f"type_{i}" for i in labels])},
    )
    skeleton.var_names = [f"gene_{i}" for i in range(n_genes)]
    skeleton.write_h5ad(path)
    shifts = np.exp(rng.normal(0, 0.7, (5, n_genes)))
    with h5py.File(path, "r+") as f:
        del f["X"]
        x = None
        for start in range(0, n_cells, 20_000):
            stop = min(start + 20_000, n_cells)
            mu = means * shifts[labels[start:stop]] * rng.lognormal(0, 0.3, (stop - start, 1))
            block = rng.poisson(rng.gamma(2.0, mu / 2.0)).astype(np.float32)
            block[block.sum(1) == 0, 0] = 1.0
            block = sparse.csr_matrix(block)
            if x is None:
                write_elem(f, "X", block)
                x = sparse_dataset(f["X"])
            else:
                x.append(block)


class PeakMemory:
    """Peak resident memory (MiB) while the block runs, polled in a thread."""

    def __init__(self):
        self.peak = 0.0

    @staticmethod
    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20

    def __enter__(self):
        self.running = True
        self.peak = self.rss()

        def poll():
            while self.running:
                self.peak = max(self.peak, self.rss())
                time.sleep(0.01)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())


def child(path: str, mode: str, steps: int, n_steps: int, accelerator: str) -> dict:
    """One (mode, N) run in this process; returns seconds and memory per phase."""
    import logging
    import warnings

    import anndata as ad
    import torch

    import latentcell as lc

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    base = PeakMemory.rss()
    out = {}

    def record(name, m):
        out[name] = {"seconds": m.seconds, "peak_mib": m.peak - base}

    trainer = dict(
        accelerator=accelerator,
        devices=1,
        enable_progress_bar=False,
        early_stopping=False,
        train_size=1.0,
        limit_train_batches=steps,
    )
    with PeakMemory() as m:
        adata = ad.read_h5ad(path, backed="r" if mode == "backed" else None)
        lc.LatentDiffusionModel.setup_anndata(adata, labels_key="cell_type")
        model = lc.LatentDiffusionModel(adata, flow_n_hidden=128, flow_n_layers=4)
    record("setup", m)
    with PeakMemory() as m:
        model.train(stage="vae", max_epochs=1, load_in_memory=mode != "backed", **trainer)
    record("vae", m)
    with PeakMemory() as m:
        z = model.get_latent_representation(key_added=None, batch_size=4096)
    record("encode", m)
    with PeakMemory() as m:
        model.train(stage="flow", flow_max_epochs=1, flow_batch_size=1024, **trainer)
    record("flow", m)
    target = Path(path).with_suffix(".generated.h5ad")
    with PeakMemory() as m:
        generated = model.sample(
            adata.n_obs,
            n_steps=n_steps,
            seed=0,
            batch_size=4096,
            progress_bar=False,
            out_path=target if mode == "backed" else None,
        )
    record("sample", m)
    assert generated.n_obs == adata.n_obs and np.isfinite(z).all()
    out["n_cells"] = int(adata.n_obs)
    out["vae_cells_per_second"] = steps * 128 / out["vae"]["seconds"]
    target.unlink(missing_ok=True)
    return out


def markdown(results: dict) -> str:
    sizes = sorted({int(n) for n in results["runs"]})
    lines = [
        "| mode | cells | "
        + " | ".join(f"{p} MiB" for p in PHASES)
        + " | VAE cells/s | encode s | sample s | encode s/cell vs smallest |",
        "|---|---:|" + "---:|" * (len(PHASES) + 4),
    ]
    for mode in ("backed", "in memory"):
        first = results["runs"][str(sizes[0])].get(mode)
        for n in sizes:
            r = results["runs"][str(n)].get(mode)
            if r is None or first is None:
                lines.append(f"| {mode} | {n:,} | not run (above --in-memory-max) |")
                continue
            per_cell = (r["encode"]["seconds"] / n) / (first["encode"]["seconds"] / sizes[0])
            lines.append(
                f"| {mode} | {n:,} | "
                + " | ".join(f"{r[p]['peak_mib']:.0f}" for p in PHASES)
                + f" | {r['vae_cells_per_second']:.0f} | {r['encode']['seconds']:.1f} | "
                f"{r['sample']['seconds']:.1f} | {per_cell:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--steps", type=int, default=200, help="VAE/flow minibatches timed")
    parser.add_argument("--n-steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument(
        "--in-memory-max", type=int, default=100_000, help="largest N for the in-memory baseline"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--child", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        res = child(args.child[0], args.child[1], args.steps, args.n_steps, args.accelerator)
        print("RESULT " + json.dumps(res))
        return res
    results = {
        "protocol": __doc__,
        "steps": args.steps,
        "n_steps": args.n_steps,
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(args.sizes):
            path = Path(tmp) / f"counts_{n}.h5ad"
            t0 = time.time()
            write_counts(path, n)
            print(f"{n:,} cells written in {time.time() - t0:.0f} s", flush=True)
            results["runs"][str(n)] = {}
            modes = ("backed", "in memory") if n <= args.in_memory_max else ("backed",)
            for mode in modes:
                cmd = [sys.executable, __file__, "--child", str(path), mode]
                cmd += ["--steps", str(args.steps), "--n-steps", str(args.n_steps)]
                cmd += ["--accelerator", args.accelerator]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    raise RuntimeError(f"{mode} run at {n} cells failed:\n{proc.stderr[-3000:]}")
                results["runs"][str(n)][mode] = json.loads(line[0][7:])
                r = results["runs"][str(n)][mode]
                print(
                    f"{mode} {n:,}: "
                    + ", ".join(
                        f"{p} {r[p]['peak_mib']:.0f} MiB/{r[p]['seconds']:.1f} s" for p in PHASES
                    ),
                    flush=True,
                )
    table = markdown(results)
    print(table)
    write_results(args.out, "scale", results, table)
    return results


if __name__ == "__main__":
    main()
