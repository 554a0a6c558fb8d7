"""Benchmark: anomaly types (``find_anomaly_types``: UMAP + HDBSCAN + naming) at catalogue size.

Synthetic inputs shaped as ``desi_anomaly.discovery.cluster_anomalies`` passes them: ``--n``
significant anomalies (128-d latents, rest-frame residuals and coverage on the pipeline's default
4000-pixel grid, feature columns with Z), a reference sample of ``--n-reference`` normal latents
(``synthetic_latents``) and a feature population of ``--n-population`` rows. A share ``--grouped``
of the anomalies falls into ``--groups`` planted groups (tight in latent space, each with its own
rest-frame residual feature) so that HDBSCAN has clusters to find; the others are scattered
(``synthetic_latents`` anomalies, pure-noise residuals).

Each size runs in a fresh (spawned) process: a small warm-up call first (imports, numba JIT), then
the timed call. Wall and CPU seconds (the machine may be shared) and the peak resident memory of
the call (VmHWM, reset after the inputs are built; inputs included) are printed and written to the
``clustering`` section of ``--doc``.

    python benchmarks/bench_clustering.py                   # 5,000 and 20,000 anomalies
    python benchmarks/bench_clustering.py --sizes 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, reset_peak_rss, status_mib, update_section

from desi_anomaly.ml import anomaly_types
from desi_anomaly.ml.detectors import synthetic_latents
from desi_anomaly.preprocess.grid import DESI_OBS_MAX, DESI_OBS_MIN
from desi_anomaly.preprocess.pipeline import DEFAULT_GRID

LINES = ("LYA", "CIV", "CIII", "MGII", "HBETA")


@dataclass
class Inputs:
    """Arguments of ``find_anomaly_types`` and the planted group of each anomaly (-1: scattered)."""

    latents_anom: np.ndarray
    latents_ref: np.ndarray
    residuals: np.ndarray
    coverage: np.ndarray
    features: pd.DataFrame
    features_ref: pd.DataFrame
    group: np.ndarray


def _features(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Z, S/N and the line / continuum feature columns the naming rules read (DR1-like scales)."""
    cols: dict[str, np.ndarray] = {
        "Z": np.clip(rng.lognormal(np.log(1.71), 0.4, n), 0.05, 6.8),
        "SNR_MEDIAN": np.clip(rng.lognormal(np.log(2.3), 1.05, n), 0.1, 200.0),
        "ALPHA_CONT": rng.normal(-1.5, 0.5, n),
        "BI_CIV": np.where(rng.random(n) < 0.1, rng.exponential(1500.0, n), 0.0),
    }
    for line in LINES:
        cols[f"EW_{line}"] = rng.lognormal(np.log(40.0), 0.5, n)
        cols[f"FWHM_{line}"] = rng.lognormal(np.log(4000.0), 0.4, n)
    cols["BAL_FLAG"] = cols["BI_CIV"] > 0
    return pd.DataFrame(cols)


def make_inputs(
    n: int, n_reference: int, n_population: int, groups: int, grouped: float, seed: int
) -> Inputs:
    rng = np.random.default_rng(seed)
    wave = DEFAULT_GRID.centres
    features = _features(n, rng)
    group = np.where(rng.random(n) < grouped, rng.integers(0, groups, n), -1)

    latents = synthetic_latents(n, seed=seed + 1, anomaly_fraction=1.0).latents
    centres = rng.normal(0.0, 3.0, size=(groups, latents.shape[1])).astype(np.float32)
    inside = group >= 0
    latents[inside] = centres[group[inside]] + rng.normal(
        0.0, 0.3, (inside.sum(), latents.shape[1])
    )

    # residuals in noise units on the rest grid, covered where the spectrum's observed range falls
    one_plus_z = 1.0 + features["Z"].to_numpy()[:, None]
    coverage = (wave >= DESI_OBS_MIN / one_plus_z) & (wave <= DESI_OBS_MAX / one_plus_z)
    residuals = rng.standard_normal((n, len(wave)), dtype=np.float32)
    centre_wave = rng.uniform(1300.0, 3000.0, groups)
    amplitude = rng.choice([-1.0, 1.0], groups) * rng.uniform(1.0, 3.0, groups)
    for g in range(groups):
        feature = amplitude[g] * np.exp(-0.5 * ((wave - centre_wave[g]) / 30.0) ** 2)
        residuals[group == g] += feature.astype(np.float32)
    residuals[~coverage] = 0.0

    reference = synthetic_latents(n_reference, seed=seed + 2).latents
    return Inputs(
        latents, reference, residuals, coverage, features, _features(n_population, rng), group
    )


def _call(inputs: Inputs, seed: int) -> anomaly_types.AnomalyTypes:
    """As ``cluster_anomalies`` calls it (its defaults: min_cluster_size 20, seed 0)."""
    return anomaly_types.find_anomaly_types(
        inputs.latents_anom,
        inputs.latents_ref,
        inputs.residuals,
        inputs.features,
        DEFAULT_GRID.centres,
        coverage=inputs.coverage,
        features_ref=inputs.features_ref,
        min_cluster_size=20,
        seed=seed,
    )


def _timed(owner: Any, name: str, seconds: dict[str, float]) -> None:
    """Wrap ``owner.name`` to add its wall seconds to ``seconds[name]`` (breakdown only)."""
    fn: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def run(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: warm up, build the inputs, time one call."""
    import hdbscan

    start, cpu = time.perf_counter(), time.process_time()
    _call(make_inputs(300, 200, 300, 3, 0.7, args.seed), args.seed)
    warmup, warmup_cpu = time.perf_counter() - start, time.process_time() - cpu

    start = time.perf_counter()
    inputs = make_inputs(n, args.n_reference, args.n_population, args.groups, args.grouped, 0)
    generate = time.perf_counter() - start
    rss_before = status_mib("VmRSS")

    parts: dict[str, float] = {}
    _timed(anomaly_types, "_embed", parts)
    _timed(hdbscan.HDBSCAN, "fit_predict", parts)
    reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    types = _call(inputs, args.seed)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu

    labels = types.assignments["CLUSTER"].to_numpy()
    planted = inputs.group >= 0
    return {
        "n": n,
        "warmup": warmup,
        "warmup_cpu": warmup_cpu,
        "generate": generate,
        "seconds": seconds,
        "cpu": cpu,
        "umap": parts.get("_embed", 0.0),
        "hdbscan": parts.get("fit_predict", 0.0),
        "rss_before": rss_before,
        "peak": status_mib("VmHWM"),
        "clusters": len(types.clusters),
        "noise": float(np.mean(labels < 0)),
        "planted_clustered": float(np.mean(labels[planted] >= 0)),
        "types": types.assignments["TYPE"].value_counts().to_dict(),
    }


def _in_fresh_process(n: int, args: argparse.Namespace) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run, n, args).result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5_000, 20_000], help="anomalies")
    ap.add_argument("--n-reference", type=int, default=2000, help="as cluster_anomalies")
    ap.add_argument("--n-population", type=int, default=20_000, help="features_ref rows")
    ap.add_argument("--groups", type=int, default=8, help="planted groups")
    ap.add_argument("--grouped", type=float, default=0.7, help="share of anomalies in groups")
    ap.add_argument("--seed", type=int, default=0, help="find_anomaly_types seed")
    ap.add_argument(
        "--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    )
    args = ap.parse_args()
    print(f"# anomaly types, {machine()}")
    results = []
    for n in args.sizes:
        r = _in_fresh_process(n, args)
        results.append(r)
        print(
            f"n={n:,} (+{args.n_reference:,} reference): {r['seconds']:.1f} s "
            f"(CPU {r['cpu']:.1f} s; UMAP {r['umap']:.1f} s, HDBSCAN {r['hdbscan']:.1f} s), "
            f"RSS before {r['rss_before']:,.0f} MiB, peak RSS {r['peak']:,.0f} MiB; "
            f"{r['clusters']} clusters, noise {r['noise']:.0%}, planted clustered "
            f"{r['planted_clustered']:.0%}; warm-up {r['warmup']:.1f} s "
            f"(CPU {r['warmup_cpu']:.1f} s)",
            flush=True,
        )
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = "\n".join(
        f"| {r['n']:,} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['umap']:.1f} | "
        f"{r['hdbscan']:.1f} | {r['rss_before']:,.0f} | {r['peak']:,.0f} | {r['clusters']} | "
        f"{r['noise']:.0%} | {r['planted_clustered']:.0%} |"
        for r in results
    )
    update_section(
        args.doc,
        "clustering",
        f"""## Anomaly types: UMAP + HDBSCAN + naming (`find_anomaly_types`)

Command: `{" ".join(["python", *sys.argv])}` at niceness
{os.nice(0)} ({machine()}). Synthetic inputs as `cluster_anomalies` passes them: n anomalies
(128-d latents; float32 residuals and coverage on the default {len(DEFAULT_GRID.centres)}-pixel
rest grid; feature columns), {args.n_reference:,} reference latents, {args.n_population:,}-row
feature population; {args.grouped:.0%} of the anomalies in {args.groups} planted groups. Seed
{args.seed} (UMAP single-threaded, as in the pipeline). Each size in a fresh process, after a
small warm-up call (imports, numba JIT: {results[0]["warmup"]:.0f} s, CPU
{results[0]["warmup_cpu"]:.0f} s, paid once per process). Peak RSS: VmHWM during the call; "RSS
before": the process (imports, warm-up, inputs) just before it. Shared machine: load average
(1 / 5 / 15 min) at the end {load}; CPU seconds are the process's own.

| anomalies | wall s | CPU s | UMAP s | HDBSCAN s | RSS before (MiB) | peak RSS (MiB) | clusters \
| noise | planted clustered |
|---|---|---|---|---|---|---|---|---|---|
{rows}
""",
    )


if __name__ == "__main__":
    main()
