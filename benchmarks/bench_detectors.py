"""Benchmark: anomaly-detector fit, streamed scoring, conformal p-values and BH at catalogue size.

Synthetic VAE outputs (``desi_anomaly.ml.detectors.synthetic_latents``: 128-d float32 latents,
RECON_RCHI2, DR1-like S/N; redshifts drawn independently) stand in for the encoder. Stages:

- fit ``AnomalyEnsemble`` on a training sample;
- score a calibration sample of normal spectra and fit ``ConformalCalibrator`` (S/N x z strata);
- generate and score ``--n`` spectra (1% planted anomalies) in batches of ``--batch``, keeping only
  ANOMALY_SCORE, S/N and z (never all latents in memory);
- p-values and Benjamini-Hochberg q-values over all ``--n``;
- per-call cost of scoring shard-sized batches (``--shard`` rows, as one healpix partition).

Prints wall and CPU times, rates and the peak resident memory after each stage (``ru_maxrss``),
and writes them to the ``detectors`` section of ``--doc``.

    python benchmarks/bench_detectors.py            # 1.6M spectra
    python benchmarks/bench_detectors.py --n 100000
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, update_section

from desi_anomaly.ml.detectors import AnomalyEnsemble, EnsembleConfig, synthetic_latents
from desi_anomaly.ml.significance import ConformalCalibrator, benjamini_hochberg, snr_dependence

SNR_EDGES = np.array([0.0, 1.0, 2.0, 4.0, 8.0, 16.0, np.inf])
Z_EDGES = np.array([0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 7.0])


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _redshifts(n: int, seed: int) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).lognormal(np.log(1.71), 0.4, n), 0.05, 6.8)


class Stage:
    """Time a block; print its wall and CPU time (the machine may be shared) and the peak RSS."""

    done: ClassVar[list[Stage]] = []

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> Stage:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu_start
        self.peak = _peak_mib()
        Stage.done.append(self)
        print(
            f"{self.name:>34}: {self.seconds:8.2f} s (CPU {self.cpu:8.2f} s)   "
            f"peak RSS {self.peak:6.0f} MiB",
            flush=True,
        )


@dataclass
class Scored:
    """ANOMALY_SCORE, S/N and planted-anomaly flags of a streamed set, and the scoring time."""

    score: np.ndarray
    snr: np.ndarray
    is_anomaly: np.ndarray
    seconds: float = 0.0
    cpu: float = 0.0


def score_stream(
    ensemble: AnomalyEnsemble, n: int, *, seed: int, anomaly_fraction: float, batch: int
) -> Scored:
    """Generate and score ``n`` spectra ``batch`` at a time, timing only ``ensemble.score``."""
    out = Scored(np.empty(n), np.empty(n), np.empty(n, dtype=bool))
    for start in range(0, n, batch):
        part = synthetic_latents(
            min(batch, n - start), seed=seed + start, anomaly_fraction=anomaly_fraction
        )
        rows = slice(start, start + len(part.snr))
        t0, c0 = time.perf_counter(), time.process_time()
        out.score[rows] = ensemble.score(part.latents, part.stats, part.snr)["ANOMALY_SCORE"]
        out.seconds += time.perf_counter() - t0
        out.cpu += time.process_time() - c0
        out.snr[rows], out.is_anomaly[rows] = part.snr, part.is_anomaly
    print(
        f"{'scoring alone':>34}: {out.seconds:8.2f} s (CPU {out.cpu:8.2f} s) = "
        f"{n / out.seconds:,.0f} spectra/s ({n / out.cpu:,.0f} per CPU-second)"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_600_000, help="spectra to score")
    ap.add_argument("--train", type=int, default=200_000, help="training sample size")
    ap.add_argument("--cal", type=int, default=400_000, help="calibration sample size")
    ap.add_argument("--min-per-stratum", type=int, default=25_000)
    ap.add_argument("--batch", type=int, default=20_000, help="rows per streamed batch")
    ap.add_argument("--shard", type=int, default=150, help="rows per shard-sized batch")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--doc", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    )
    args = ap.parse_args()
    print(machine())
    print(
        f"n={args.n:,} train={args.train:,} cal={args.cal:,} batch={args.batch:,} "
        f"min_per_stratum={args.min_per_stratum:,} alpha={args.alpha}"
    )
    config = EnsembleConfig()
    # independent streams: training, calibration, catalogue, shard-sized batches, redshifts
    s_train, s_cal, s_cat, s_shard, s_z = (
        int(v) for v in np.random.SeedSequence(args.seed).generate_state(5)
    )

    train = synthetic_latents(args.train, seed=s_train, anomaly_fraction=0.01)
    with Stage(f"fit on {args.train:,} training rows") as fit:
        ensemble = AnomalyEnsemble(config).fit(train.latents, train.stats, train.snr, seed=s_train)
    del train
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "detector.joblib"
        with Stage("save + load"):
            ensemble.save(path)
            ensemble = AnomalyEnsemble.load(path, latent_dim=128)
        file_mib = path.stat().st_size / 2**20
        print(f"{'detector file':>34}: {file_mib:8.1f} MiB")

    with Stage(f"generate + score {args.cal:,} calibration"):
        cal = score_stream(ensemble, args.cal, seed=s_cal, anomaly_fraction=0.0, batch=args.batch)
    cal_z = _redshifts(args.cal, s_z)
    with Stage("fit calibrator"):
        calibrator = ConformalCalibrator().fit(
            cal.score,
            cal.snr,
            cal_z,
            snr_edges=SNR_EDGES,
            z_edges=Z_EDGES,
            min_per_stratum=args.min_per_stratum,
        )
    print(
        f"{'strata':>34}: {calibrator.n_per_stratum.size}, "
        f"{calibrator.n_per_stratum.min():,}-{calibrator.n_per_stratum.max():,} spectra each"
    )
    print(f"{'Spearman(score, S/N) of normals':>34}: {snr_dependence(cal.score, cal.snr):+.3f}")
    del cal

    with Stage(f"generate + score {args.n:,} (streamed)"):
        cat = score_stream(ensemble, args.n, seed=s_cat, anomaly_fraction=0.01, batch=args.batch)
    z = _redshifts(args.n, s_z + 1)

    with Stage(f"p-values, {args.n:,}"):
        p = calibrator.pvalues(cat.score, cat.snr, z)
    with Stage(f"Benjamini-Hochberg, {args.n:,}"):
        bh = benjamini_hochberg(p, args.alpha)
    found, planted = bh.discoveries, cat.is_anomaly
    floor = 1 / (calibrator.n_per_stratum.max() + 1)
    print(
        f"{'smallest possible p':>34}: {floor:.2e}: BH makes no discovery unless it makes "
        f">= {floor * args.n / args.alpha:,.0f}"
    )
    print(
        f"{'discoveries at q < alpha':>34}: {found.sum():,} (planted {planted.sum():,}, "
        f"found {(found & planted).sum():,}, false {(found & ~planted).sum():,})"
    )

    shard = synthetic_latents(args.shard * 200, seed=s_shard)
    with Stage(f"score 200 batches of {args.shard}") as shards:
        for start in range(0, len(shard.snr), args.shard):
            rows = slice(start, start + args.shard)
            ensemble.score(shard.latents[rows], shard.stats[rows], shard.snr[rows])
    print(f"{'per shard-sized batch':>34}: {1000 * shards.seconds / 200:8.1f} ms")
    print(
        f"summary: fit {fit.seconds:.0f} s (CPU {fit.cpu:.0f} s); score {args.n:,} in "
        f"{cat.seconds:.0f} s (CPU {cat.cpu:.0f} s); "
        f"peak RSS {_peak_mib():.0f} MiB"
    )
    rows = "\n".join(
        f"| {s.name} | {s.seconds:.2f} | {s.cpu:.2f} | {s.peak:,.0f} |" for s in Stage.done
    )
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    update_section(
        args.doc,
        "detectors",
        f"""## Detectors: fit, streamed scoring, conformal p-values, BH

Command: `{" ".join(["python", *sys.argv])}` at niceness
{os.nice(0)} ({machine()}). n = {args.n:,} synthetic 128-d latents (`synthetic_latents`,
1% planted), train {args.train:,} (`fit_detector` samples at most `max_train` = 200,000),
calibration {args.cal:,}, batches of {args.batch:,} (never all latents in memory). Shared
machine: load average (1 / 5 / 15 min) at the end {load}; CPU seconds are the process's own.
Peak RSS is the process's peak so far (`ru_maxrss`) at the end of each stage.

| stage | wall s | CPU s | peak RSS (MiB) |
|---|---|---|---|
{rows}

- fit {fit.seconds:.0f} s (CPU {fit.cpu:.0f} s) on {args.train:,} rows; detector file
  {file_mib:.1f} MiB.
- scoring alone ({args.n:,}): {cat.seconds:.0f} s (CPU {cat.cpu:.0f} s) =
  **{args.n / cat.seconds:,.0f} spectra/s** ({args.n / cat.cpu:,.0f} per CPU second).
- per shard-sized batch of {args.shard}: {1000 * shards.seconds / 200:.1f} ms.
- discoveries at q < {args.alpha}: {found.sum():,} (planted {planted.sum():,}, found
  {(found & planted).sum():,}, false {(found & ~planted).sum():,}); smallest possible p
  {floor:.2e}: BH makes no discovery unless it makes >= {floor * args.n / args.alpha:,.0f}.
- peak RSS of the whole run: **{_peak_mib():,.0f} MiB**.
""",
    )


if __name__ == "__main__":
    main()
