"""Benchmark: DuckDB latents table and exact cosine similarity search at catalogue size.

Generates ``--n`` random 128-d float32 latents in per-partition Parquet files of ``--per-file``
rows (DR1: ~1.55M QSOs in ~11k healpix files, ~145 per file), then, each in a fresh process so its
peak memory is its own:

- ``build_latents_db``: time, database size, peak resident memory;
- ``similar`` (k=10) for ``--queries`` random TARGETIDs: median / max latency, peak memory.

    python benchmarks/bench_similarity.py              # 1.6M latents
    python benchmarks/bench_similarity.py --n 100000
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine

from desi_anomaly.catalog import build_latents_db, similar


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(latents_dir: Path, n: int, per_file: int, dim: int, seed: int) -> int:
    """Write random latents files ``main-dark-{i}.parquet``; returns the number of files."""
    latents_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_files = -(-n // per_file)
    for i in range(n_files):
        m = min(per_file, n - i * per_file)
        key = f"main-dark-{i}"
        vec = rng.standard_normal((m, dim), dtype=np.float32)
        table = pa.table(
            {
                "TARGETID": pa.array(np.arange(i * per_file, i * per_file + m, dtype=np.int64)),
                "PARTITION": pa.array([key] * m),
                "LATENT": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), dim),
            }
        )
        pq.write_table(table, latents_dir / f"{key}.parquet")
    return n_files


def _build(db: Path, latents_dir: Path) -> tuple[float, int, float]:
    start = time.perf_counter()
    n = build_latents_db(db, latents_dir)
    return time.perf_counter() - start, n, _peak_mib()


def _query(db: Path, targetids: list[int], k: int) -> tuple[list[float], float]:
    times = []
    for tid in targetids:
        start = time.perf_counter()
        similar(db, tid, k=k)
        times.append(time.perf_counter() - start)
    return times, _peak_mib()


def _in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_600_000, help="number of latents")
    parser.add_argument("--per-file", type=int, default=145, help="latents per partition file")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_similarity_"))
    latents_dir, db = work / "latents", work / "latents.duckdb"
    try:
        print(f"# similarity search, {machine()}")
        start = time.perf_counter()
        n_files = generate(latents_dir, args.n, args.per_file, args.dim, seed=0)
        parquet_mib = sum(p.stat().st_size for p in latents_dir.iterdir()) / 2**20
        print(
            f"generated {args.n:,} x {args.dim} latents in {n_files:,} files "
            f"({parquet_mib:,.0f} MiB Parquet) in {time.perf_counter() - start:.1f} s"
        )
        seconds, n, peak = _in_fresh_process(_build, db, latents_dir)
        print(
            f"build_latents_db: {n:,} rows in {seconds:.1f} s, "
            f"DB {db.stat().st_size / 2**20:,.0f} MiB, peak RSS {peak:,.0f} MiB"
        )
        rng = np.random.default_rng(1)
        tids = rng.choice(args.n, size=args.queries, replace=False).tolist()
        times, peak = _in_fresh_process(_query, db, tids, args.k)
        ms = np.array(times) * 1e3
        print(
            f"similar(k={args.k}) over {args.queries} queries: median {np.median(ms):.0f} ms, "
            f"first {ms[0]:.0f} ms, max {ms.max():.0f} ms, peak RSS {peak:,.0f} MiB"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
