"""Benchmark: DuckDB latents table and exact cosine similarity search at catalogue size.

Generates ``--n`` random 128-d float32 latents in per-partition Parquet files of ``--per-file``
rows (DR1: ~1.55M QSOs in ~11k healpix files, ~145 per file), then, each in a fresh process so its
peak memory is its own:

- ``build_latents_db``: time, database size, peak resident memory;
- ``similar`` (k=10) for ``--queries`` random TARGETIDs: median / max latency, peak memory.

Wall and CPU seconds (the machine may be shared) are printed and written to the ``similarity``
section of ``--doc``.

    python benchmarks/bench_similarity.py              # 1.6M latents
    python benchmarks/bench_similarity.py --n 100000
"""

from __future__ import annotations

import argparse
import os
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
from report import machine, status_mib, update_section

from desi_anomaly.catalog import build_latents_db, similar


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


def _build(db: Path, latents_dir: Path) -> tuple[float, float, int, float]:
    start, cpu = time.perf_counter(), time.process_time()
    n = build_latents_db(db, latents_dir)
    return time.perf_counter() - start, time.process_time() - cpu, n, status_mib("VmHWM")


def _query(db: Path, targetids: list[int], k: int) -> tuple[list[float], float, float]:
    times, cpu = [], time.process_time()
    for tid in targetids:
        start = time.perf_counter()
        similar(db, tid, k=k)
        times.append(time.perf_counter() - start)
    return times, time.process_time() - cpu, status_mib("VmHWM")


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
    parser.add_argument(
        "--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    )
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_similarity_"))
    latents_dir, db = work / "latents", work / "latents.duckdb"
    try:
        print(f"# similarity search, {machine()}")
        start = time.perf_counter()
        n_files = generate(latents_dir, args.n, args.per_file, args.dim, seed=0)
        gen_seconds = time.perf_counter() - start
        parquet_mib = sum(p.stat().st_size for p in latents_dir.iterdir()) / 2**20
        print(
            f"generated {args.n:,} x {args.dim} latents in {n_files:,} files "
            f"({parquet_mib:,.0f} MiB Parquet) in {gen_seconds:.1f} s"
        )
        seconds, cpu, n, build_peak = _in_fresh_process(_build, db, latents_dir)
        db_mib = db.stat().st_size / 2**20
        print(
            f"build_latents_db: {n:,} rows in {seconds:.1f} s (CPU {cpu:.1f} s), "
            f"DB {db_mib:,.0f} MiB, peak RSS {build_peak:,.0f} MiB"
        )
        rng = np.random.default_rng(1)
        tids = rng.choice(args.n, size=args.queries, replace=False).tolist()
        times, query_cpu, peak = _in_fresh_process(_query, db, tids, args.k)
        ms = np.array(times) * 1e3
        print(
            f"similar(k={args.k}) over {args.queries} queries: median {np.median(ms):.0f} ms, "
            f"first {ms[0]:.0f} ms, max {ms.max():.0f} ms, CPU {1e3 * query_cpu / len(ms):.0f} "
            f"ms per query, peak RSS {peak:,.0f} MiB"
        )
        load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
        build_row = (
            f"| `build_latents_db`, {n:,} rows (DB {db_mib:,.0f} MiB) | {seconds:.1f} s | "
            f"{cpu:.1f} s | {build_peak:,.0f} |"
        )
        query_row = (
            f"| `similar(k={args.k})`, {args.queries} queries: median / first / max | "
            f"{np.median(ms):.0f} / {ms[0]:.0f} / {ms.max():.0f} ms | "
            f"{1e3 * query_cpu / len(ms):.0f} ms per query | {peak:,.0f} |"
        )
        update_section(
            args.doc,
            "similarity",
            f"""## Similarity search: DuckDB latents table, exact cosine `similar(TARGETID, k)`

Command: `{" ".join(["python", *sys.argv])}` at niceness
{os.nice(0)} ({machine()}). n = {args.n:,} random {args.dim}-d float32 latents in {n_files:,}
Parquet files of {args.per_file} ({parquet_mib:,.0f} MiB, written in {gen_seconds:.0f} s). Build
and queries each in a fresh process (peak RSS = VmHWM of that process). Shared machine:
load average (1 / 5 / 15 min) at the end {load}; CPU seconds are the process's own (all threads).

| step | wall | CPU | peak RSS (MiB) |
|---|---|---|---|
{build_row}
{query_row}
""",
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
