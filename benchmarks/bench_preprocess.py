"""Benchmark ``desi_anomaly.preprocess.preprocess`` on synthetic DESI-like batches, on one core.

    OMP_NUM_THREADS=1 python benchmarks/bench_preprocess.py [--batch 150] [--batches 20]

Prints spectra/s (CPU time and wall time, median over batches and best batch) and the peak memory
of one ``preprocess`` call (tracemalloc, numpy allocations included) and of the process (ru_maxrss).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import tracemalloc
from collections import Counter

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from threadpoolctl import threadpool_limits

from desi_anomaly.preprocess import PreprocessConfig, preprocess
from desi_anomaly.preprocess.synthetic import synthetic_spectra

#: DR1 QSO redshift quantiles (design notes) for inverse-CDF sampling.
Z_QUANTILES = (
    [0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1],
    [0.1, 0.38, 0.69, 1.24, 1.71, 2.21, 2.99, 3.66, 5.0],
)


def dr1_like_batch(n: int, rng: np.random.Generator):
    """Synthetic spectra with DR1-like redshifts and median per-pixel S/N (1%: ~0.3, 50%: ~2.3)."""
    z = np.interp(rng.random(n), *Z_QUANTILES)
    return synthetic_spectra(n, rng, z=z, snr=rng.lognormal(1.4, 0.86, n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=150, help="spectra per batch (one healpix)")
    parser.add_argument("--batches", type=int, default=20, help="number of timed batches")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    batches = [dr1_like_batch(args.batch, rng) for _ in range(args.batches)]
    config = PreprocessConfig()
    with threadpool_limits(limits=1):
        preprocess(batches[0], config)  # warm-up
        cpu, wall, kept, drops = [], [], 0, Counter()
        for spectra in batches:
            t0, c0 = time.perf_counter(), time.process_time()
            cleaned = preprocess(spectra, config)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
            kept += len(cleaned)
            drops.update(cleaned.drop_counts())
        tracemalloc.start()
        preprocess(batches[0], config)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    n = args.batch
    npix = len(batches[0].wave)
    print(f"preprocess: {args.batches} batches x {n} spectra x {npix} pixels, grid {config.grid}")
    print(f"  kept {kept} / {n * args.batches} spectra; dropped: {dict(+drops) or 'none'}")
    for name, times in (("CPU time ", cpu), ("wall time", wall)):
        median, best = n / np.median(times), n / np.min(times)
        print(f"  {name}: {median:8.0f} spectra/s median, {best:8.0f} best batch")
    print(f"  peak memory of one call (tracemalloc): {peak / 2**20:.1f} MiB")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS of the benchmark process: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
